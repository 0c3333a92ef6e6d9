"""Compiled dequantization loops (numba) for the CPU; see :mod:`qpack.codecs.lookup`."""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["lookup_into", "affine_into"]


@njit(cache=True, nogil=True, boundscheck=False)
def lookup_into(indices: np.ndarray, table: np.ndarray, row_length: int, size: int,
                out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i] = table[(i // row_length) * size + indices[i]]``, one pass over memory.

    The caller guarantees every index is below ``size`` (R20 is checked before decoding) and
    that ``table`` holds a row of ``size`` values for every row of ``row_length`` elements.
    """
    count = indices.size
    for first in range(0, count, row_length):
        base = (first // row_length) * size
        # one row's views: the loop then runs on plain offsets (measured twice as fast)
        row_table = table[base:base + size]
        row_out = out[first:min(count, first + row_length)]
        row_indices = indices[first:first + row_out.size]
        for i in range(row_out.size):
            row_out[i] = row_table[row_indices[i]]


@njit(cache=True, nogil=True, boundscheck=False)
def affine_into(indices: np.ndarray, lo: np.ndarray, step: np.ndarray, row_length: int,
                out: np.ndarray) -> None:  # pragma: no cover - compiled
    """``out[i] = fl32(lo[r] + fl32(step[r] * fl32(indices[i])))`` with ``r = i // row_length``.

    Two float32 roundings, as the uniform codec's torch code does them: numba compiles
    without fast-math, so LLVM neither fuses the multiply and the add into an FMA nor
    reorders them, and the loop vectorises (about 0.4 ns per element, the speed of writing
    the output, against about 0.7 for a table lookup's gathers).
    """
    count = indices.size
    for first in range(0, count, row_length):
        row = first // row_length
        low = lo[row]
        size = step[row]
        row_out = out[first:min(count, first + row_length)]
        row_indices = indices[first:first + row_out.size]
        for i in range(row_out.size):
            row_out[i] = low + size * np.float32(row_indices[i])
