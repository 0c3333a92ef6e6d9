"""Compiled nearest-centroid assignment (numba) for :func:`qpack.kmeans1d.assign`, whose numpy
code (``_nearest``) is the reference and the path without numba."""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["nearest_into"]


#: bins per centroid of the table that starts each value's search
_BINS_PER_CENTROID = 4


@njit(cache=True, nogil=True, boundscheck=False)
def nearest_into(values: np.ndarray, book: np.ndarray, out: np.ndarray) -> int:  # pragma: no cover - compiled
    """``out[i] = argmin_j |values[i] - book[j]|`` in float64, the first index on ties
    (``book`` float64, sorted, non-empty), in one pass. The first centroid >= v (numpy's
    ``searchsorted``, side "left") starts from a table of equal bins over the codebook's
    range and is walked to exactly (a step or two); the two centroids around it are compared,
    and only where the left neighbour of the chosen one ties, a binary search finds the first
    of the tying run (distances do not increase towards the chosen centroid). Returns 1 at
    the first non-finite value (``out`` is then incomplete), else 0."""
    k = book.size
    first, last = book[0], book[k - 1]
    bins = k * _BINS_PER_CENTROID
    scale = bins / (last - first) if last > first else 0.0
    if not np.isfinite(scale):  # a range too narrow for the table: every search walks from 0
        scale = 0.0
    table = np.empty(bins + 1, dtype=np.int64)
    j = 0
    for b in range(bins + 1):  # table[b]: the first centroid >= the bin's lower edge
        edge = first + b / scale if scale > 0 else first
        while j < k and book[j] < edge:
            j += 1
        table[b] = j
    for i in range(values.size):
        v = np.float64(values[i])
        if not np.isfinite(v):
            return 1
        if v <= first:
            low = 0
        elif v > last:
            low = k
        else:
            low = table[min(int((v - first) * scale), bins - 1)]
            while low > 0 and book[low - 1] >= v:  # the edge may round past v
                low -= 1
            while low < k and book[low] < v:
                low += 1
        right = min(low, k - 1)
        left = max(low - 1, 0)
        d_left, d_right = abs(v - book[left]), abs(v - book[right])
        chosen, best = (left, d_left) if d_left <= d_right else (right, d_right)
        if chosen > 0 and abs(v - book[chosen - 1]) == best:
            low, high = 0, chosen - 1  # high ties; find the first that does
            while low < high:
                middle = (low + high) >> 1
                if abs(v - book[middle]) == best:
                    high = middle
                else:
                    low = middle + 1
            chosen = high
        out[i] = chosen
    return 0
