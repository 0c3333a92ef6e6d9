"""Compiled balanced rounding (numba) for the CPU; see :func:`qpack.codecs.uniform.balanced`,
whose torch code is the reference (and the path without numba)."""

from __future__ import annotations

import math

import numpy as np
from numba import njit

__all__ = ["balance_into"]

#: buckets of a run's candidate errors, in which the cut is found
_BUCKETS = 256


@njit(cache=True, nogil=True, boundscheck=False)
def balance_into(level: np.ndarray, position: np.ndarray, zero: np.ndarray, top: int, segment: int,
                 offset: int) -> None:  # pragma: no cover - compiled
    """Move ``level`` (flat float32 nearest indices) in place as ``balanced`` does: per run of
    ``segment`` elements (the first starting ``offset`` before element 0, runs cut at both
    ends), the float64 sum of the float32 errors ``level - position`` of the elements not on
    their exact 0 level (``zero``, -1 for none), rounded half to even, is how many of them
    move one level against its sign: those with the largest error in its direction whose
    other neighbour is on the grid and not the 0 level. Ties at the cut go to the lower
    index (the torch code's ``topk`` leaves their order open). Two passes over each run, and
    where it moves fewer than it could, a histogram of the candidates and a sort of one bucket."""
    numel = level.size
    values = np.empty(segment, dtype=np.float32)
    where = np.empty(segment, dtype=np.int64)
    counts = np.empty(_BUCKETS, dtype=np.int64)
    start = -offset
    while start < numel:
        first, end = max(start, 0), min(start + segment, numel)
        start += segment
        total = 0.0
        for i in range(first, end):
            if level[i] != zero[i]:
                total += np.float64(np.float32(level[i] - position[i]))
        whole = math.floor(total)
        if total - whole > 0.5 or (total - whole == 0.5 and whole % 2 != 0):
            whole += 1
        if whole == 0:
            continue
        direction = np.float32(1.0) if whole > 0 else np.float32(-1.0)
        wanted = int(abs(whole))
        found = 0
        for i in range(first, end):
            # written always, kept by the count (no branch to mispredict on random errors)
            here = level[i]
            signed = np.float32(here - position[i]) * direction
            target = here - direction
            values[found] = signed
            where[found] = i
            found += (signed > 0) & (target >= 0) & (target <= top) & (target != zero[i]) & (here != zero[i])
        if found > wanted:
            # errors lie in (0, 1/2]: buckets of 1/(2 B) in the order of the errors; every
            # candidate above the bucket where the wanted-th largest lies moves, and in that
            # bucket the largest (stable sort: equal errors by index) until ``wanted`` have
            counts[:] = 0
            for j in range(found):
                counts[min(int(values[j] * (2 * _BUCKETS)), _BUCKETS - 1)] += 1
            cut, above = _BUCKETS - 1, 0
            while above + counts[cut] < wanted:
                above += counts[cut]
                cut -= 1
            inside = np.empty(counts[cut], dtype=np.int64)
            held = 0
            for j in range(found):
                bucket = min(int(values[j] * (2 * _BUCKETS)), _BUCKETS - 1)
                if bucket > cut:
                    level[where[j]] -= direction
                elif bucket == cut:
                    inside[held] = j
                    held += 1
            order = np.argsort(-values[inside], kind="mergesort")
            for j in range(wanted - above):
                level[where[inside[order[j]]]] -= direction
        else:
            for j in range(found):
                level[where[j]] -= direction
