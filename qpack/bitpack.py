"""Bit packing of unsigned indices, b = 1..16 bits each (spec section 4, "Packed indices").

Bit order: the indices form one little-endian bit stream. Bit ``j`` of index ``i`` is
stream bit ``i * b + j``; stream bit ``k`` is bit ``k % 8`` (value ``1 << (k % 8)``) of byte
``k // 8``. The stream takes ``ceil(count * b / 8)`` bytes; unused high bits of the last
byte are zero.

Both directions are torch code that runs on any device, so the loader can unpack on the
GPU. Every 8 indices fill exactly ``b`` bytes. The indices are laid out as 8 contiguous
columns (one per position in a group) and each of the ``b`` output bytes is an OR of at
most a few shifted columns: a fixed plan per width, no loop over elements. The work is
done in the narrowest integer type that holds the bits (uint8 below 8 bits, int16 up to
16), because these passes are bound by memory traffic.
"""

from __future__ import annotations

import sys
from functools import lru_cache

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


@lru_cache(maxsize=None)
def _byte_plan(bits: int) -> tuple[tuple[tuple[int, int], ...], ...]:
    """For each of the ``bits`` bytes of a group: (index j, shift) with shift = j*bits - 8*byte.

    Byte ``c`` holds stream bits 8c..8c+7; index ``j`` covers j*bits..j*bits+bits-1.
    """
    return tuple(
        tuple((j, j * bits - 8 * c) for j in range(8) if j * bits < 8 * c + 8 and (j + 1) * bits > 8 * c)
        for c in range(bits)
    )


def _work_dtype(bits: int) -> torch.dtype:
    return torch.uint8 if bits < 8 else torch.int16


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
    columns = torch.zeros(groups * 8, dtype=_work_dtype(bits), device=flat.device)
    columns[:count] = flat  # int16 may wrap values >= 2^15; only their low bits are used
    columns = columns.view(groups, 8).t().contiguous()
    out = torch.empty((bits, groups), dtype=torch.uint8, device=flat.device)
    for byte, parts in enumerate(_byte_plan(bits)):
        acc = None
        for j, shift in parts:
            # uint8 left shifts drop the bits that belong to the next byte; for int16 the
            # conversion to uint8 below keeps only the low byte
            term = columns[j] << shift if shift >= 0 else columns[j] >> -shift
            acc = term if acc is None else acc.bitwise_or_(term)
        out[byte] = acc
    return out.t().contiguous().view(-1)[:nbytes]


def unpack_bits(packed: torch.Tensor, bits: int, count: int) -> torch.Tensor:
    """Unpack ``count`` indices of ``bits`` bits from a uint8 tensor.

    Args:
        packed: 1-D uint8 tensor holding at least ``packed_size(count, bits)`` bytes.
        bits: width of each index, 1..16.
        count: number of indices to return.

    Returns:
        A 1-D tensor of ``count`` indices on the same device as ``packed``, in the narrowest
        type that holds them: uint8 for bits <= 8, int16 for 9..15, int32 for 16.

    Raises:
        ValueError: if ``packed`` is not a 1-D uint8 tensor or is shorter than needed.
    """
    nbytes = packed_size(count, bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError("packed must be a 1-D uint8 tensor")
    if packed.numel() < nbytes:
        raise ValueError(f"{count} indices of {bits} bits need {nbytes} bytes, got {packed.numel()}")
    packed = packed[:nbytes]
    if count == 0:
        return torch.empty(0, dtype=torch.uint8 if bits <= 8 else torch.int16, device=packed.device)
    if bits == 8:
        return packed
    if bits == 16:
        return packed.view(torch.int16).to(torch.int32) & 0xFFFF
    if 8 % bits == 0:
        # 1, 2 or 4 bits: whole indices per byte, one broadcast shift does it
        shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device)
        out = (packed[:, None] >> shifts[None, :]).bitwise_and_((1 << bits) - 1)
        return out.view(-1)[:count] if out.numel() == count else out.reshape(-1)[:count]
    groups = (count + 7) // 8
    if groups * bits != nbytes:
        full = torch.zeros(groups * bits, dtype=torch.uint8, device=packed.device)
        full[:nbytes] = packed
        packed = full
    rows = packed.view(groups, bits).t().to(_work_dtype(bits)).contiguous()
    out = torch.empty((8, groups), dtype=rows.dtype, device=packed.device)
    mask = (1 << bits) - 1
    for j in range(8):
        acc = None
        for byte in range(j * bits // 8, ((j + 1) * bits - 1) // 8 + 1):
            shift = j * bits - 8 * byte
            term = rows[byte] >> shift if shift >= 0 else rows[byte] << -shift
            acc = term if acc is None else acc.bitwise_or_(term)
        out[j] = acc.bitwise_and_(mask)
    return out.t().reshape(-1)[:count]
