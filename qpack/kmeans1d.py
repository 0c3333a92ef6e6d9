"""Fast, deterministic 1-D k-means for scalar weights: the codebooks of ``kmeans`` quantization.

Three pure functions:

- :func:`fit_codebook` chooses at most ``k`` sorted float32 centroids for a set of values;
- :func:`assign` maps every value to the index of its nearest centroid;
- :func:`sse` measures the sum of squared errors of a codebook.

How :func:`fit_codebook` works. The values are sorted once (duplicates merged into weighted
points when they are common; past ``2**21`` points, runs of neighbouring points are merged
into weighted groups). In one dimension every cluster of an optimal or of a Lloyd-stable
solution is a contiguous run of the sorted values, so with prefix sums of the weights ``w``,
of ``w*x`` and of ``w*x**2`` a cluster's size, mean and error cost O(1) and one Lloyd
iteration costs O(k log n) (``searchsorted`` of the k - 1 midpoints); nothing loops over
elements in Python and nothing allocates an n-by-k array.

- Small problems (estimated cost within ``_DP_BUDGET_S``) are solved exactly by dynamic
  programming over the sorted points: layer ``j`` holds the best cost of the first ``i``
  points in ``j`` clusters. Each layer uses the monotone split points of this (Monge) cost,
  either through a vectorised divide and conquer or, once the search band that the previous
  layer leaves is narrow, in one vectorised pass over that band.
- Larger problems run Lloyd's algorithm from several starts at once: the same dynamic
  program on up to a few thousand weighted groups of points when k is small, otherwise a
  greedy bisection (split the cluster whose exact best split gains most) of up to 16384
  groups that keep isolated values apart; quantiles of the "companding" density
  ``p**(1/3)`` (the high-resolution optimum for quantizers); plain weighted quantiles;
  greedy k-means++ on the groups (seeded, so deterministic) when cheap; an even grid over
  the range. After 20 iterations only the best two starts go on. A cluster that goes empty
  is dropped and the clusters of largest error are split at their means until there are k
  again. The best partition is then polished (k <= 1024): a dynamic program along the
  chain of boundaries re-places all of them at once, each within a geometric ladder of
  shifts, until a pass gains less than 0.01 %. Polishing matters most when clusters are
  small or Lloyd converges slowly (large k).

The result depends only on the multiset of values (not on their order or shape), and the
same input gives the same bytes.
"""

from __future__ import annotations

import math

import numpy as np

from .errors import InputError
from .jit import kernels

__all__ = ["assign", "fit_codebook", "sse"]

#: above this many (weighted) points, neighbouring points are merged into groups
_MAX_POINTS = 1 << 21
#: the exact dynamic program runs when its estimated time is at most this (seconds)
_DP_BUDGET_S = 0.03
#: the dynamic program that seeds Lloyd on large inputs gets about this much time
_SEED_DP_BUDGET_S = 0.02
#: largest number of groups the seeding dynamic program works on
_SEED_DP_MAX_GROUPS = 4096
#: k-means++ seeding is skipped above this k (it costs O(k * groups))
_KMEANSPP_MAX_K = 1024
_KMEANSPP_MAX_WORK = 1 << 20  # groups * k
#: greedy bisection seeding (on up to _BISECT_GROUPS groups) is skipped above this k
_BISECT_MAX_K = 2048
_BISECT_GROUPS = 1 << 14
#: Lloyd runs all starts for this many iterations, then only the best few
_PRUNE_AFTER = 20
_PRUNE_KEEP = 2
#: window polishing: at most this many passes, and only up to this k
_POLISH_PASSES = 8
_POLISH_MAX_K = 1024
_POLISH_RATIO = 1.4
_POLISH_MIN_GAIN = 1e-4  # relative; a pass that gains less is the last
#: values processed at a time by assign and sse (bounds their temporary memory)
_CHUNK = 1 << 16
#: seed of the k-means++ start
_SEED = 0x5EED

_F32_MAX = float(np.finfo(np.float32).max)


# --------------------------------------------------------------------------- public API


def fit_codebook(values: np.ndarray, k: int, *, max_iter: int = 300) -> np.ndarray:
    """Fit a codebook of at most ``k`` centroids to ``values`` (1-D k-means).

    The centroids minimise the sum of squared errors of the values to their nearest
    centroid: exactly (dynamic programming) when the problem is small, otherwise as the best
    of several Lloyd runs from different starts (its error is then within a fraction of a
    percent of the optimum on weight-like data, and never worse than one run of
    ``sklearn.cluster.KMeans`` on the benchmarks in ``tests/benchmarks``).

    Args:
        values: array of any real dtype (float16/32/64, integers) and any shape; it is
            flattened. Must be non-empty and finite, and within the float32 range.
        k: largest number of centroids, ``k >= 1``.
        max_iter: most Lloyd iterations per start, ``>= 1`` (the exact path on small
            inputs does not iterate).

    Returns:
        Sorted float32 array of distinct centroids, ``1 <= len <= k``. When ``values`` has
        at most ``k`` distinct values they are returned exactly (so the error is zero, as
        long as they are float32 values). Otherwise the float64 centroids are rounded to
        float32, which may merge a few (so fewer than ``k`` can come back). ``-0.0`` comes
        back as ``0.0``. Same input, same output bytes; the order and shape of ``values``
        do not matter.

    Raises:
        InputError: (a ``ValueError``) on empty input, NaN or infinity, values beyond the
            float32 range, a non-real dtype, or a bad ``k`` / ``max_iter``.
    """
    k = _check_count(k, "k")
    max_iter = _check_count(max_iter, "max_iter")
    x, w, n_distinct = _sorted_points(values)
    if n_distinct <= k:
        return _distinct_float32(x)
    x, w = _compress(x, w, k)
    bounds = _solve(x, w, k, max_iter)
    return _to_codebook(_segment_means(x, w, bounds))


def assign(values: np.ndarray, codebook: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid for every value (flattened), ties to the lower index.

    The result equals ``np.argmin(np.abs(v - codebook))`` evaluated in float64 for every
    value ``v``, including exact ties (a value at the midpoint of two centroids goes to the
    lower one) and repeated centroids (a padded codebook: the first copy wins). It is
    computed without a values-by-centroids array: ``searchsorted`` finds the two
    neighbouring centroids of each value and their float64 distances are compared; the
    rare values whose left neighbours tie in float64 are resolved by a vectorised binary
    search. Values are processed in chunks, so temporary memory stays small; with numba,
    float arrays of ``_CHUNK`` values or more take one compiled pass (``kmeans1d_jit``) with
    the same answers.

    Args:
        values: array of any real dtype and shape; flattened. Must be finite.
        codebook: 1-D, non-empty, finite, sorted (non-decreasing) array of centroids.

    Returns:
        int64 array of ``values.size`` indices into ``codebook`` (``0 <= idx < k``).

    Raises:
        InputError: (a ``ValueError``) on NaN or infinity in ``values``, or a codebook
            that is empty, not 1-D, not finite or not sorted.
    """
    book = _check_codebook(codebook)
    flat = _real_array(values, "values").reshape(-1)
    out = np.empty(flat.size, dtype=np.int64)
    jit = (kernels("qpack.kmeans1d_jit") if flat.size >= _CHUNK and flat.dtype in (np.float32, np.float64)
           else None)
    if jit is not None:  # the same indices in one compiled pass (float64 distances, ties alike)
        if jit.nearest_into(np.ascontiguousarray(flat), book, out):
            raise InputError("values contain NaN or infinity")
        return out
    for start in range(0, flat.size, _CHUNK):
        v = flat[start : start + _CHUNK].astype(np.float64)
        _check_finite(v, "values")
        out[start : start + v.size] = _nearest(v, book)
    return out


def sse(values: np.ndarray, codebook: np.ndarray) -> float:
    """Sum of squared errors of ``values`` against their nearest centroid, in float64.

    Args:
        values: array of any real dtype and shape; flattened. Must be finite.
        codebook: 1-D, non-empty, finite, sorted (non-decreasing) array of centroids.

    Returns:
        ``sum((v - codebook[assign(v)])**2)`` as a Python float (float64 arithmetic).

    Raises:
        InputError: (a ``ValueError``) on NaN or infinity in ``values``, or a bad codebook.
    """
    book = _check_codebook(codebook)
    flat = _real_array(values, "values").reshape(-1)
    total = 0.0
    for start in range(0, flat.size, _CHUNK):
        v = flat[start : start + _CHUNK].astype(np.float64)
        _check_finite(v, "values")
        d = _neighbours(v, book)[1]
        total += float(np.sum(d * d))
    return total


# --------------------------------------------------------------------------- input checks


def _check_count(value: int, name: str) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise InputError(f"{name} must be an integer >= 1, got {value!r}")
    if value < 1:
        raise InputError(f"{name} must be >= 1, got {value}")
    return int(value)


def _real_array(values: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(values)
    if arr.dtype.kind not in "fiu":
        raise InputError(
            f"{name} must have a real (float or integer) dtype, got {arr.dtype}"
        )
    return arr


def _check_finite(v: np.ndarray, name: str) -> None:
    if v.size and not np.isfinite(v).all():
        raise InputError(f"{name} contain NaN or infinity")


def _check_codebook(codebook: np.ndarray) -> np.ndarray:
    book = _real_array(codebook, "codebook").astype(np.float64)
    if book.ndim != 1 or book.size == 0:
        raise InputError(
            f"codebook must be a non-empty 1-D array, got shape {book.shape}"
        )
    _check_finite(book, "codebook")
    if book.size > 1 and not (book[1:] >= book[:-1]).all():
        raise InputError("codebook must be sorted (non-decreasing)")
    return book


# --------------------------------------------------------------------------- assignment


def _neighbours(v: np.ndarray, book: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearer of the two centroids around each value (the lower on ties), and its distance.

    ``book[right - 1] < v <= book[right]``; the nearest centroid is one of these two, since
    float64 rounding of ``|v - c|`` is monotone in ``c`` (no farther centroid is closer).
    """
    k = book.size
    right = np.searchsorted(book, v, side="left")
    left = right - 1
    np.clip(right, 0, k - 1, out=right)
    np.clip(left, 0, None, out=left)
    d_left = np.abs(v - book[left])
    d_right = np.abs(v - book[right])
    take_left = d_left <= d_right
    return np.where(take_left, left, right), np.where(take_left, d_left, d_right)


def _nearest(v: np.ndarray, book: np.ndarray) -> np.ndarray:
    """argmin_j |v - book[j]| in float64, first index on ties; v, book float64, book sorted."""
    if book.size == 1:
        return np.zeros(v.size, dtype=np.int64)
    idx, best = _neighbours(v, book)
    # Centroids left of the chosen one can tie with it in float64 (repeated centroids, or a
    # distance so large that rounding hides their gap); the first of them is the answer.
    # Those distances are non-increasing towards idx, so the ties form a run ending at idx.
    below = idx - 1
    np.clip(below, 0, None, out=below)
    tie = np.abs(v - book[below]) == best
    tie &= idx > 0
    if tie.any():
        cand = np.flatnonzero(tie)
        vv, target = v[cand], best[cand]
        lo = np.zeros(cand.size, dtype=np.int64)  # first index that may tie
        hi = idx[cand] - 1  # known to tie
        while True:
            open_ = lo < hi
            if not open_.any():
                break
            mid = (lo + hi) >> 1
            ties = np.abs(vv - book[mid]) == target
            hi = np.where(open_ & ties, mid, hi)
            lo = np.where(open_ & ~ties, mid + 1, lo)
        idx[cand] = hi
    return idx


# --------------------------------------------------------------------------- preparation


def _sorted_points(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None, int]:
    """Sorted points ``x`` with weights ``w``, and the number of distinct values.

    Duplicates are merged into weighted points when they make up a quarter of the values or
    more; otherwise every value is a point of weight 1 (equal values stay adjacent) and
    ``w`` is None.
    """
    arr = _real_array(values, "values")
    n = arr.size
    if n == 0:
        raise InputError("values is empty; a codebook needs at least one value")
    # float16 and small integers sort exactly (and faster) as float32
    small = arr.dtype.itemsize <= 2 or arr.dtype == np.float32
    s = np.array(arr, dtype=np.float32 if small else np.float64, order="C").reshape(-1)
    s.sort()  # NaN sorts last, -inf first, +inf just before NaN
    if not (np.isfinite(s[0]) and np.isfinite(s[-1])):
        raise InputError("values contain NaN or infinity")
    if max(-float(s[0]), float(s[-1])) > _F32_MAX:
        raise InputError("values exceed the float32 range; codebooks are float32")
    new = np.empty(n, dtype=bool)
    new[0] = True
    np.not_equal(s[1:], s[:-1], out=new[1:])
    n_distinct = int(np.count_nonzero(new))
    if n_distinct <= 0.75 * n:
        starts = np.flatnonzero(new)
        del new
        x = s[starts].astype(np.float64)
        w = np.diff(np.append(starts, n)).astype(np.float64)
    else:
        del new
        x = s  # converted to float64 by _compress (after merging, if there are many)
        w = None
    x += 0.0  # -0.0 -> 0.0
    return x, w, n_distinct


def _distinct_float32(x: np.ndarray) -> np.ndarray:
    return np.unique(x.astype(np.float32) + np.float32(0.0))


def _compress(
    x: np.ndarray, w: np.ndarray | None, k: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """Float64 points; runs of neighbouring points merged into weighted groups when there
    are too many (the group means stay sorted: each lies within its run)."""
    limit = max(_MAX_POINTS, 8 * k)
    if x.size <= limit:
        return x.astype(np.float64, copy=False), w
    run = -(-x.size // limit)
    starts = np.arange(0, x.size, run)
    if w is None:
        gw = np.diff(np.append(starts, x.size)).astype(np.float64)
        gx = np.add.reduceat(x, starts, dtype=np.float64) / gw
    else:
        gw = np.add.reduceat(w, starts)
        gx = np.add.reduceat(w * x, starts) / gw
    return gx, gw


def _to_codebook(centroids: np.ndarray) -> np.ndarray:
    return np.unique(centroids.astype(np.float32) + np.float32(0.0))


# --------------------------------------------------------------------------- prefix sums


class _Prefix:
    """Prefix sums of w, w*(x - ref), w*(x - ref)**2 over sorted points (length m + 1).

    ``w`` None means weight 1 everywhere.
    """

    def __init__(self, x: np.ndarray, w: np.ndarray | None) -> None:
        m = x.size
        self.w = np.empty(m + 1)
        self.s = np.empty(m + 1)
        self.q = np.empty(m + 1)
        self.w[0] = self.s[0] = self.q[0] = 0.0
        if w is None:
            self.w[1:] = np.arange(1, m + 1)
        else:
            np.cumsum(w, out=self.w[1:])
        # shift by the weighted median (a data value) to limit cancellation in the sums
        mid = int(np.searchsorted(self.w[1:], 0.5 * self.w[-1]))
        self.ref = float(x[min(mid, m - 1)])
        xs = x - self.ref
        wx = xs if w is None else w * xs
        np.cumsum(wx, out=self.s[1:])
        np.multiply(wx, xs, out=xs)
        np.cumsum(xs, out=self.q[1:])

    def cost(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        """Squared error of each run of points [lo, hi) around its own mean (lo < hi)."""
        ww = self.w[hi] - self.w[lo]
        ss = self.s[hi] - self.s[lo]
        return (self.q[hi] - self.q[lo]) - ss * ss / ww

    def means(self, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        return self.ref + (self.s[hi] - self.s[lo]) / (self.w[hi] - self.w[lo])


def _segment_means(
    x: np.ndarray, w: np.ndarray | None, bounds: np.ndarray
) -> np.ndarray:
    starts = bounds[:-1]
    if w is None:
        return np.add.reduceat(x, starts) / np.diff(bounds)
    return np.add.reduceat(w * x, starts) / np.add.reduceat(w, starts)


def _partition_sse(pre: _Prefix, bounds: np.ndarray) -> float:
    return float(np.sum(np.maximum(pre.cost(bounds[:-1], bounds[1:]), 0.0)))


# --------------------------------------------------------------------------- solver


def _solve(
    x: np.ndarray, w: np.ndarray | None, k: int, max_iter: int, method: str = "auto"
) -> np.ndarray:
    """Bounds (k + 1 indices into x) of a k-cluster partition of the sorted points.

    ``method``: ``"auto"`` (exact when cheap), ``"dp"`` (always exact) or ``"lloyd"``
    (always the multi-start heuristic). x must hold more than k distinct values.
    """
    m = x.size
    if k == 1:
        return np.array([0, m], dtype=np.int64)
    pre = _Prefix(x, w)
    if method == "dp" or (method == "auto" and _dp_seconds(m, k) <= _DP_BUDGET_S):
        return _dp_partition(pre, k)
    parts = _lloyd(x, pre, _starts(x, pre, k), max_iter)
    errors = [_partition_sse(pre, b) for b in parts]
    best = parts[int(np.argmin(errors))]
    if k <= _POLISH_MAX_K:
        best = _polish(pre, best, _POLISH_PASSES)
    return best


def _starts(x: np.ndarray, pre: _Prefix, k: int) -> np.ndarray:
    """Initial centroids, one sorted row per start (float64, shape (starts, k))."""
    m = x.size
    total = pre.w[-1]
    # density estimate: B bins of equal weight; edges e, weight share cdf, companding comp
    bins = int(min(4096, max(16, 2 * math.sqrt(total)), m))
    pos = np.searchsorted(pre.w[1:], total * (np.arange(bins + 1) / bins), side="left")
    e = x[np.minimum(pos, m - 1)]
    e[0], e[-1] = x[0], x[-1]
    comp = np.concatenate(([0.0], np.cumsum(np.cbrt(np.square(np.diff(e))))))
    comp /= comp[-1]
    cdf = np.arange(bins + 1) / bins
    mixed = 0.5 * cdf + 0.5 * comp
    u = (np.arange(k) + 0.5) / k

    rows = []
    # an exact partition of a few thousand groups when that is cheap (small k) ...
    count = min(_SEED_DP_MAX_GROUPS, max(16 * k, 256))
    while count > 4 * k and _dp_seconds(count, k) > _SEED_DP_BUDGET_S:
        count = int(count * 0.8)
    if count >= min(4 * k, m) and _dp_seconds(min(count, m), k) <= _SEED_DP_BUDGET_S:
        groups = _groups(x, e, mixed, count)
        if groups.size - 1 > k:  # (heavy point masses can merge cuts)
            gb = _dp_partition(_GroupPrefix(pre, groups), k)
            rows.append(pre.means(groups[gb[:-1]], groups[gb[1:]]))
    else:  # ... else greedy bisection of many groups (isolated values keep their own)
        groups = _groups(x, e, mixed, _BISECT_GROUPS, gaps=True)
        if k <= _BISECT_MAX_K and groups.size - 1 > k:
            gb = _bisect(_GroupPrefix(pre, groups), k)
            rows.append(pre.means(groups[gb[:-1]], groups[gb[1:]]))
    rows.append(np.interp(u, 0.02 * cdf + 0.98 * comp, e))  # companding quantiles
    rows.append(np.interp(u, cdf, e))  # weighted quantiles
    if k <= _KMEANSPP_MAX_K and (groups.size - 1) * k <= _KMEANSPP_MAX_WORK:
        gx = pre.means(groups[:-1], groups[1:])
        gw = pre.w[groups[1:]] - pre.w[groups[:-1]]
        rows.append(_kmeanspp(gx, gw, k))
    rows.append(x[0] + (x[-1] - x[0]) * u)  # even grid over the range
    return np.stack(rows)


def _groups(
    x: np.ndarray, e: np.ndarray, measure: np.ndarray, count: int, gaps: bool = False
) -> np.ndarray:
    """Boundaries (indices into x, from 0 to m) of about ``count`` groups of points.

    Groups are evenly spaced in ``measure`` (piecewise linear between the values ``e``);
    with ``gaps`` half of the cuts go instead to the widest gaps between neighbouring
    points, so that isolated values (outliers) keep groups of their own. Every point is a
    group of its own when there are at most ``count``.
    """
    m = x.size
    if m <= count:
        return np.arange(m + 1)
    even = count // 2 if gaps else count
    cuts = [
        np.searchsorted(
            x, np.interp(np.arange(1, even) / even, measure, e), side="left"
        )
    ]
    if gaps:
        widths = np.diff(x)
        top = widths.size - (count - even)
        cuts.append(np.argpartition(widths, top)[top:] + 1)
    return np.unique(np.concatenate([[0], *cuts, [m]]))


class _GroupPrefix(_Prefix):
    """The prefix sums of a _Prefix sampled at group boundaries (groups as points)."""

    def __init__(self, pre: _Prefix, groups: np.ndarray) -> None:
        self.ref = pre.ref
        self.w = pre.w[groups]
        self.s = pre.s[groups]
        self.q = pre.q[groups]


def _bisect(pre: _Prefix, k: int) -> np.ndarray:
    """Greedy divisive partition: split the cluster whose best split (found exactly)
    lowers the error most, until there are k clusters. Bounds, k + 1 indices."""
    m = pre.w.size - 1
    lo = np.zeros(k, dtype=np.int64)
    hi = np.zeros(k, dtype=np.int64)
    gain = np.full(k, -np.inf)
    cut = np.zeros(k, dtype=np.int64)

    def best_split(slot: int) -> None:
        a, b = int(lo[slot]), int(hi[slot])
        if b - a < 2:
            gain[slot] = -np.inf
            return
        t = np.arange(a + 1, b, dtype=np.int64)
        c = pre.cost(np.full(t.size, a), t) + pre.cost(t, np.full(t.size, b))
        j = int(np.argmin(c))
        gain[slot] = float(pre.cost(np.array([a]), np.array([b]))[0]) - float(c[j])
        cut[slot] = t[j]

    hi[0] = m
    best_split(0)
    for n in range(1, k):
        slot = int(np.argmax(gain[:n]))
        lo[n], hi[n] = cut[slot], hi[slot]
        hi[slot] = cut[slot]
        best_split(slot)
        best_split(n)
    return np.concatenate(([0], np.sort(hi)))


def _kmeanspp(gx: np.ndarray, gw: np.ndarray, k: int) -> np.ndarray:
    """Greedy k-means++ (2 + ln k candidates a step) on weighted points, seeded."""
    rng = np.random.default_rng(_SEED)
    trials = 2 + int(math.log(k))
    cum = np.cumsum(gw)
    first = min(
        int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), gx.size - 1
    )
    chosen = [first]
    d2 = np.square(gx - gx[first])
    for _ in range(1, k):
        cum = np.cumsum(gw * d2)
        if not cum[-1] > 0:
            break
        cand = np.searchsorted(cum, rng.random(trials) * cum[-1], side="right")
        cand = np.minimum(cand, gx.size - 1)
        nd = np.minimum(d2, np.square(gx[None, :] - gx[cand][:, None]))
        best = int(np.argmin(np.sum(nd * gw, axis=1)))
        chosen.append(int(cand[best]))
        d2 = nd[best]
    c = np.sort(gx[np.array(chosen)])
    if c.size < k:  # fewer distinct candidates than k: pad (Lloyd repairs duplicates)
        c = np.concatenate((c, np.full(k - c.size, c[-1])))
    return c


# --------------------------------------------------------------------------- Lloyd


def _lloyd(x: np.ndarray, pre: _Prefix, cents: np.ndarray, max_iter: int) -> np.ndarray:
    """Lloyd's algorithm from every row of ``cents`` at once; final bounds, (rows, k + 1).

    After ``_PRUNE_AFTER`` iterations only the ``_PRUNE_KEEP`` rows of least error go on.
    """
    m = x.size
    r, k = cents.shape
    bounds = np.empty((r, k + 1), dtype=np.int64)
    bounds[:, 0] = 0
    bounds[:, -1] = m
    prev = None
    for it in range(max_iter):
        inner = np.searchsorted(x, 0.5 * (cents[:, :-1] + cents[:, 1:]), side="right")
        if prev is not None and np.array_equal(inner, prev):
            break  # assignment unchanged: a fixed point
        bounds[:, 1:-1] = inner
        for row in np.flatnonzero((bounds[:, 1:] <= bounds[:, :-1]).any(axis=1)):
            bounds[row] = _repair(x, pre, bounds[row], k)
        if it + 1 == _PRUNE_AFTER and r > _PRUNE_KEEP:
            errors = [_partition_sse(pre, b) for b in bounds]
            keep = np.sort(np.argsort(errors, kind="stable")[:_PRUNE_KEEP])
            bounds = bounds[keep]
            r = keep.size
        cents = pre.means(bounds[:, :-1], bounds[:, 1:])
        prev = bounds[:, 1:-1].copy()
    return bounds


def _repair(x: np.ndarray, pre: _Prefix, b: np.ndarray, k: int) -> np.ndarray:
    """Drop empty clusters, then split the clusters of largest error at their means."""
    b = np.unique(b)
    while b.size - 1 < k:
        lo, hi = b[:-1], b[1:]
        splittable = x[hi - 1] > x[lo]
        err = np.where(splittable, pre.cost(lo, hi), -np.inf)
        order = np.argsort(-err, kind="stable")[: k - (b.size - 1)]
        order = order[splittable[order]]
        cut = np.searchsorted(x, pre.means(lo[order], hi[order]), side="right")
        cut = np.clip(cut, lo[order] + 1, hi[order] - 1)
        b = np.unique(np.concatenate((b, cut)))
    return b


# --------------------------------------------------------------------------- polishing


def _polish(pre: _Prefix, b: np.ndarray, passes: int) -> np.ndarray:
    """Improve a partition by exact re-placement of all boundaries within windows.

    Each pass lets every inner boundary move by 0, +-1, +-2, +-3, +-4, +-6, ... points (a
    geometric ladder up to about twice the mean cluster size) and picks the best joint
    placement with a dynamic program along the chain of boundaries (all k - 1 at once, so
    whole runs of clusters can shift together). The error never goes up; passes stop when
    one gains less than ``_POLISH_MIN_GAIN`` of the error.
    """
    m = pre.w.size - 1
    k = b.size - 1
    if k < 2:
        return b
    steps = [0]
    v = 1.0
    while v <= max(2.0, 2.0 * m / k):
        i = round(v)
        if i > steps[-1]:
            steps.append(i)
        v *= _POLISH_RATIO
    offs = np.array(
        [0] + [s * sign for s in steps[1:] for sign in (-1, 1)], dtype=np.int64
    )
    current = _partition_sse(pre, b)
    for _ in range(passes):
        nb = _window_pass(pre, b, offs)
        err = _partition_sse(pre, nb)
        if not err < current:
            break
        b, current, gain = nb, err, current - err
        if gain <= _POLISH_MIN_GAIN * current:
            break
    return b


def _window_pass(pre: _Prefix, b: np.ndarray, offs: np.ndarray) -> np.ndarray:
    m = pre.w.size - 1
    k = b.size - 1
    cand = np.clip(b[1:-1, None] + offs[None, :], 1, m - 1)  # (k - 1, S) positions
    size = offs.size
    cols = np.arange(size)
    best = pre.cost(np.zeros(size, dtype=np.int64), cand[0])
    back = np.zeros((k - 1, size), dtype=np.int64)
    for j in range(1, k - 1):
        q = cand[j - 1][:, None]
        p = cand[j][None, :]
        ok = q < p
        val = np.where(
            ok, best[:, None] + pre.cost(np.where(ok, q, 0), np.where(ok, p, m)), np.inf
        )
        back[j] = np.argmin(val, axis=0)
        best = val[back[j], cols]
    best = best + np.where(cand[-1] < m, pre.cost(cand[-1], np.full(size, m)), np.inf)
    pick = int(np.argmin(best))
    out = np.empty(k + 1, dtype=np.int64)
    out[0], out[k] = 0, m
    for j in range(k - 2, -1, -1):
        out[j + 1] = cand[j, pick]
        pick = int(back[j, pick])
    return out


# --------------------------------------------------------------------------- dynamic program


def _dp_seconds(m: int, k: int) -> float:
    """Rough time of _dp_partition on m points and k clusters (seconds, this design)."""
    if k <= 1 or m <= k:
        return 0.0
    n = m - k + 1  # points per layer
    levels = max(1.0, math.log2(n + 1))
    band = n * n / (2.0 * np.arange(1, k))  # layers 2..k
    dc = n * levels * 1.5
    per_layer = np.where(
        band <= dc, 14 * 2e-6 + band * 6e-8, levels * 22 * 2e-6 + dc * 6e-8
    )
    return float(np.sum(per_layer))


def _dp_partition(pre: _Prefix, k: int) -> np.ndarray:
    """Exact k-cluster partition of the points (bounds, k + 1 indices) by dynamic program.

    ``best[j][i]`` = least error of the first i points in j clusters
    = min over t of ``best[j-1][t] + cost(t, i)``. The arg-min ("split") is monotone in i
    and in j because the cost is a Monge array, so each layer searches only between the
    split of the previous layer and i - 1: through divide and conquer (vectorised level by
    level) while that band is wide, in one pass once it is narrow. Ties: the lowest split.
    """
    m = pre.w.size - 1
    prev = np.full(m + 1, np.inf)
    prev[1:] = pre.cost(np.zeros(m, dtype=np.int64), np.arange(1, m + 1))
    split = np.zeros((k + 1, m + 1), dtype=np.int64 if m >= 2**31 - 1 else np.int32)
    low_bound = np.zeros(m + 1, dtype=np.int64)

    def search(
        i: np.ndarray, lo: np.ndarray, hi: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """For each i, the lowest t in [lo, hi] minimising prev[t] + cost(t, i)."""
        size = hi - lo + 1
        offs = np.zeros(size.size, dtype=np.int64)
        np.cumsum(size[:-1], out=offs[1:])
        t = np.arange(int(offs[-1] + size[-1]), dtype=np.int64) - np.repeat(
            offs - lo, size
        )
        val = prev[t] + pre.cost(t, np.repeat(i, size))
        low = np.minimum.reduceat(val, offs)
        hit = np.flatnonzero(val == np.repeat(low, size))
        return t[hit[np.searchsorted(hit, offs)]], low

    for j in range(2, k + 1):
        first = m if j == k else j
        last = m - (k - j)
        i = np.arange(first, last + 1, dtype=np.int64)
        lo = np.maximum(low_bound[i], j - 1)
        cur = np.full(m + 1, np.inf)
        n = i.size
        band = int(np.sum(i - lo))
        if band <= 1.5 * n * max(1.0, math.log2(n + 1)):
            best_t, best_v = search(i, lo, i - 1)
            cur[i] = best_v
            split[j, i] = best_t
        else:
            # divide and conquer over i, all tasks of one level at a time
            t_lo = np.array([first], dtype=np.int64)
            t_hi = np.array([last], dtype=np.int64)
            o_lo = np.array([j - 1], dtype=np.int64)
            o_hi = np.array([last - 1], dtype=np.int64)
            while t_lo.size:
                mid = (t_lo + t_hi) >> 1
                up = np.minimum(mid - 1, o_hi)
                down = np.minimum(np.maximum(o_lo, low_bound[mid]), up)
                best_t, best_v = search(mid, down, up)
                cur[mid] = best_v
                split[j, mid] = best_t
                go_l = mid > t_lo
                go_r = mid < t_hi
                t_lo, t_hi, o_lo, o_hi = (
                    np.concatenate((t_lo[go_l], mid[go_r] + 1)),
                    np.concatenate((mid[go_l] - 1, t_hi[go_r])),
                    np.concatenate((o_lo[go_l], best_t[go_r])),
                    np.concatenate((best_t[go_l], o_hi[go_r])),
                )
        low_bound = np.zeros(m + 1, dtype=np.int64)
        low_bound[i] = split[j, i]
        np.maximum.accumulate(low_bound, out=low_bound)
        prev = cur

    bounds = np.empty(k + 1, dtype=np.int64)
    bounds[k] = m
    at = m
    for j in range(k, 1, -1):
        at = int(split[j, at])
        bounds[j - 1] = at
    bounds[0] = 0
    return bounds
