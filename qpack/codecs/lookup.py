"""Dequantization as a table lookup: the CPU fast path shared by the uniform and k-means codecs.

Every b-bit index of a row can only take 2^b values, so a codec computes them once per row
(with exactly its own float32 operations, so the bits are the same) and the elements become
``table[row, index]``: one read of the indices and one write of the values, where the plain
torch code converts, multiplies and adds in separate passes. The lookup itself is a compiled
loop (:mod:`qpack.codecs.lookup_jit`, numba). It saves about 1 ns per element, while
importing numba and loading its first kernel cost about 1.3 s of CPU once per process, so it
only runs once numba is already loaded (by a rANS decode, or by the caller); otherwise, for
small tensors, and for tables bigger than half the tensor, the codec runs its torch code.
The uniform codec's grid needs no table: :func:`affine` computes its two roundings in one
compiled pass that vectorises, where a lookup's gathers do not.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

from ..jit import kernels

__all__ = ["worth_a_kernel", "worth_a_table", "lookup", "affine"]

#: below this many elements the table costs more than the passes it saves
MIN_ELEMENTS = 1 << 14
_INDEX_TYPES = (torch.uint8, torch.int16, torch.int32)


def worth_a_kernel(indices: torch.Tensor) -> bool:
    """Whether the compiled loops (:func:`affine`) would run for these indices."""
    return (indices.device.type == "cpu" and indices.dtype in _INDEX_TYPES and indices.numel() >= MIN_ELEMENTS
            and "numba" in sys.modules and kernels("qpack.codecs.lookup_jit") is not None)


def worth_a_table(indices: torch.Tensor, rows: int, size: int) -> bool:
    """Whether :func:`lookup` would run for these indices and a ``rows x size`` table."""
    return rows * size <= indices.numel() // 2 and worth_a_kernel(indices)


def lookup(indices: torch.Tensor, table: torch.Tensor, row_length: int) -> torch.Tensor:
    """``table[i // row_length, indices[i]]`` as a flat float32 tensor (``table``: float32,
    ``rows x size``, every index below ``size``); call only when :func:`worth_a_table`."""
    jit = kernels("qpack.codecs.lookup_jit")
    flat = indices.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.empty(flat.numel(), dtype=torch.float32)
    # int16 indices of 9..15 bits are non-negative; 16-bit ones come as int32
    jit.lookup_into(flat.numpy(), np.ascontiguousarray(table.numpy()).reshape(-1), row_length,
                    table.shape[1], out.numpy())
    return out


def affine(indices: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, row_length: int) -> torch.Tensor:
    """``lo[r] + step[r] * indices[i]`` (``r = i // row_length``, float32, the multiply rounded
    before the add) as a flat float32 tensor: the uniform grid computed in one vectorised
    pass instead of looked up; call only when :func:`worth_a_kernel`."""
    jit = kernels("qpack.codecs.lookup_jit")
    flat = indices.reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    out = torch.empty(flat.numel(), dtype=torch.float32)
    jit.affine_into(flat.numpy(), np.ascontiguousarray(lo.reshape(-1).numpy()),
                    np.ascontiguousarray(step.reshape(-1).numpy()), row_length, out.numpy())
    return out
