"""Bit packing of unsigned indices, b = 1..16 bits each (spec section "Packed indices").

Bit order: the indices form one little-endian bit stream. Bit ``j`` of index ``i`` is
stream bit ``i * b + j``; stream bit ``k`` is bit ``k % 8`` (value ``1 << (k % 8)``) of byte
``k // 8``. The stream takes ``ceil(count * b / 8)`` bytes; unused high bits of the last
byte are zero.

Both directions work on torch tensors of any device, so the loader can unpack on the GPU.
Every 8 indices fill exactly ``b`` bytes (at most 16), so each group of 8 is assembled in
two 64-bit words with a fixed plan of shifts per column: no loop over elements. The words
are viewed as bytes, which is why the host must be little-endian (checked at import).
"""

from __future__ import annotations

import sys

import torch

__all__ = ["MAX_BITS", "packed_size", "pack_bits", "unpack_bits"]

if sys.byteorder != "little":  # pragma: no cover - no big-endian torch build to test on
    raise ImportError("qpack needs a little-endian host")

MAX_BITS = 16


def packed_size(count: int, bits: int) -> int:
    """Number of bytes that ``count`` indices of ``bits`` bits take when packed."""
    _check_bits(bits)
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    return (count * bits + 7) // 8


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from 1 to {MAX_BITS}, got {bits!r}")


def pack_bits(indices: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned integer indices into a uint8 tensor.

    Args:
        indices: integer tensor of any shape (flattened in C order); every value must lie in
            ``[0, 2**bits)``. Values outside are not checked here (callers guarantee it).
        bits: width of each index, 1..16.

    Returns:
        A 1-D uint8 tensor of ``packed_size(indices.numel(), bits)`` bytes on the same device.
    """
    _check_bits(bits)
    flat = indices.reshape(-1)
    count = flat.numel()
    nbytes = packed_size(count, bits)
    if count == 0:
        return torch.empty(0, dtype=torch.uint8, device=flat.device)
    if bits == 8:
        return flat.to(torch.uint8)
    if bits == 16:
        # int32 -> int16 keeps the low 16 bits, which are the index
        return flat.to(torch.int32).to(torch.int16).view(torch.uint8)
    groups = (count + 7) // 8
    cols = torch.zeros(groups * 8, dtype=torch.int64, device=flat.device)
    cols[:count] = flat
    cols = cols.view(groups, 8)
    words = torch.zeros((groups, 2), dtype=torch.int64, device=flat.device)
    lo, hi = words[:, 0], words[:, 1]
    for j in range(8):
        start = j * bits
        if start < 64:
            # bits shifted past bit 63 are dropped; the high word takes them below
            lo |= cols[:, j] << start
            if start + bits > 64:
                hi |= cols[:, j] >> (64 - start)
        else:
            hi |= cols[:, j] << (start - 64)
    return words.view(torch.uint8).view(groups, 16)[:, :bits].contiguous().view(-1)[:nbytes]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack ``count`` indices of ``bits`` bits from a uint8 tensor.

    Args:
        packed: 1-D uint8 tensor holding at least ``packed_size(count, bits)`` bytes.
        bits: width of each index, 1..16.
        count: number of indices to return.

    Returns:
        A 1-D int32 tensor of ``count`` indices on the same device as ``packed``.

    Raises:
        ValueError: if ``packed`` is shorter than the indices need.
    """
    nbytes = packed_size(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D uint8 tensor")
    if packed.numel() < nbytes:
        raise ValueError(f"{count} indices of {bits} bits need {nbytes} bytes, got {packed.numel()}")
    packed = packed[:nbytes]
    if count == 0:
        return torch.empty(0, dtype=torch.int32, device=packed.device)
    if bits == 8:
        return packed.to(torch.int32)
    if bits == 16:
        return packed.view(torch.int16).to(torch.int32) & 0xFFFF
    groups = (count + 7) // 8
    if groups * bits != nbytes:
        full = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
        full[:nbytes] = packed
        packed = full
    words = torch.zeros((groups, 2), dtype=torch.int64, device=packed.device)
    words.view(torch.uint8).view(groups, 16)[:, :bits] = packed.view(groups, bits)
    lo, hi = words[:, 0], words[:, 1]
    out = torch.empty((groups, 8), dtype=torch.int32, device=packed.device)
    mask = (1 << bits) - 1
    for j in range(8):
        start = j * bits
        if start + bits <= 64:
            out[:, j] = (lo >> start) & mask
        elif start < 64:
            # arithmetic shift drags the sign bit down: keep only the 64 - start real bits
            low_part = (lo >> start) & ((1 << (64 - start)) - 1)
            out[:, j] = (low_part | (hi << (64 - start))) & mask
        else:
            out[:, j] = (hi >> (start - 64)) & mask
    return out.reshape(-1)[:count]


