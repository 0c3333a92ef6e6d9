"""Compiled histogram pass (numba) for :func:`qpack.estimate.statistics`, whose numpy code
is the reference (and the path without numba): the same bins, counts and float64 sums."""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["bin_rows"]


@njit(cache=True, nogil=True, boundscheck=False)
def bin_rows(values: np.ndarray, count: int, length: int, low: np.ndarray, scale: np.ndarray,
             square: np.ndarray, counts: np.ndarray, weights: np.ndarray) -> None:  # pragma: no cover - compiled
    """Add the first ``count`` of ``values`` (float32, rows of ``length`` after one another)
    to ``counts`` (and, with ``weights`` non-empty, their rows' ``square`` to ``weights``),
    each in bin ``uint16((value - low[row]) * scale[row])`` computed in float32 as numpy
    does; element order, so ``weights`` gets the sums ``np.bincount`` gives."""
    with_weights = weights.size > 0
    for first in range(0, count, length):
        row = first // length
        lo, sc, sq = low[row], scale[row], square[row]
        for i in range(first, min(count, first + length)):
            b = np.uint16(np.float32(values[i] - lo) * sc)
            counts[b] += 1
            if with_weights:
                weights[b] += sq
