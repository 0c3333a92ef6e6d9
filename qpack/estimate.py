"""Predicting a candidate's stored size and error from statistics of a tensor, without encoding it.

The allocation (:mod:`qpack.allocate`) weighs some 60 candidates per tensor; encoding each in
full costs dozens of passes over the tensor. Here one pass builds, per granularity, a fine
histogram of the values in each row's own coordinate ``u = (w - min) / (max - min)`` (in
[0, 1]): every row's uniform grid, at any width and span, is the same grid in ``u``, so one
histogram over all rows serves every uniform candidate. Each bin keeps its count and the sum
of its rows' ``(max - min)^2`` (the factor that turns an error in ``u`` back into the
values' units); tensors of at most ``EXACT_LIMIT`` elements keep every value as a point of
its own instead.

From the sorted points and their prefix sums, a grid's thresholds give every level's count
(hence the rANS size, exactly as :func:`qpack.rans.encoded_size` computes it) and every
level's squared error, in O(levels log points) per candidate. A k-means codebook per tensor
is fitted by Lloyd's algorithm on the same points, all widths at once. A bin's values are
taken as spread evenly over it (their variance, a bin's width squared over 12, is added).

zstd is not run: its size is predicted as the indices' entropy times ``ZSTD_OVER_ENTROPY``
(at most the packed size), and rANS is taken where it saves 5 % on that, as the writer does.
Sizes come within a few percent, errors within a fraction of one (k-means codebooks, fitted
by a quicker method than the encoder's, within a few percent, pessimistic). The allocation
encodes the chosen candidates for real and plans again with what they cost.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from . import rans
from .bitpack import packed_size
from .encoder import RANS_MIN_SAVING
from .format import payload_span
from .jit import kernels

__all__ = ["EXACT_LIMIT", "KMEANS_EXACT_LIMIT", "BINS", "Statistics", "statistics", "uniform", "kmeans", "rans_sizes",
           "stored_sizes", "relative_error"]

#: tensors (row sets) with at most this many elements keep every value as a point
EXACT_LIMIT = 1 << 14
#: k-means codebooks are predicted on every value up to this many (a histogram's bins are too
#: coarse for the many small clusters of heavy-tailed weights)
KMEANS_EXACT_LIMIT = 1 << 16
#: Ward's agglomeration starts from at most this many runs of points
MERGE_GROUPS = 1 << 14
#: bins of a histogram (the widest grid, 8 bits, has 255 steps: 257 bins a step)
BINS = 1 << 16
#: Lloyd iterations of the predicted k-means codebooks
LLOYD_ITERATIONS = 24
_TOTAL = 1 << rans.PROB_BITS


class Statistics:
    """Sorted points in ``u`` with prefix sums of their counts and error weights."""

    def __init__(self, u: np.ndarray, count: np.ndarray, weight: np.ndarray, spread: float, constant: int,
                 signal: float, numel: int, low: np.ndarray, high: np.ndarray) -> None:
        self.u = u  # sorted positions in [0, 1]
        self.count, self.weight = count, weight
        self.constant = constant  # elements of constant rows: index 0, no error
        self.signal, self.numel = signal, numel
        self.low, self.high = low, high  # each row's float32 min and max
        zero = np.zeros(1)
        self.c = np.concatenate([zero, np.cumsum(count)])
        self.e0 = np.concatenate([zero, np.cumsum(weight)])
        self.e1 = np.concatenate([zero, np.cumsum(weight * u)])
        self.e2 = np.concatenate([zero, np.cumsum(weight * (u * u + spread))])

    def segments(self, bounds: np.ndarray, levels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Counts (candidates x levels) and squared errors (candidates) of the points between
        ``bounds`` (candidates x levels + 1 indices into the points) rebuilt at ``levels``."""
        counts = np.diff(self.c[bounds], axis=1)
        w0, w1, w2 = (np.diff(p[bounds], axis=1) for p in (self.e0, self.e1, self.e2))
        error = np.maximum(w2 - 2 * levels * w1 + levels * levels * w0, 0.0).sum(axis=1)
        counts[:, 0] += self.constant
        return np.rint(counts).astype(np.int64), error


def statistics(tensor: torch.Tensor, rows: int, row_length: int | None,
               exact_limit: int = EXACT_LIMIT) -> Statistics | None:
    """The points of ``tensor`` (finite) with ``rows`` parameter sets: every value up to
    ``exact_limit`` elements, else a histogram's bins, built block by block (float
    temporaries stay a block's, as the encoder's); None when a row's range is beyond float32
    (the allocation then encodes that tensor in full)."""
    from .codecs.rows import as_rows
    from .encoder import BLOCK_ELEMENTS

    numel = tensor.numel()
    view = as_rows(tensor.detach().reshape(-1), rows, row_length)
    low, high = view.amin(dim=1).to(torch.float32).numpy(), view.amax(dim=1).to(torch.float32).numpy()
    span = high.astype(np.float64) - low
    if not (np.isfinite(span).all() and np.isfinite(np.float32(span.max()))):
        return None
    length = view.shape[1]
    live = span > 0
    constant = int(np.count_nonzero(~live)) * length
    if not live[-1]:
        constant -= rows * length - numel  # the padding of a short last group
    square = np.where(live, span * span, 0.0)
    if numel <= exact_limit:
        values = view.to(torch.float32).numpy()
        flat = values.reshape(-1)[:numel].astype(np.float64)
        scale = np.where(live, 1.0 / np.where(live, span, 1.0), 0.0)
        u = ((values - low[:, None]).astype(np.float64) * scale[:, None]).reshape(-1)[:numel]
        weight = np.broadcast_to(square[:, None], values.shape).reshape(-1)[:numel]
        keep = np.repeat(live, length)[:numel]
        u, weight = u[keep], weight[keep]
        signal = float(np.dot(flat, flat))
        if rows == 1:  # one weight for all
            return Statistics(np.sort(u), np.ones(u.size), weight, 0.0, constant, signal, numel, low, high)
        order = np.argsort(u)
        return Statistics(u[order], np.ones(u.size), weight[order], 0.0, constant, signal, numel, low, high)
    # bins of width 1 / (BINS - 1): the largest value lands in the last, never past it
    scale = np.where(live, (BINS - 1) / np.where(live, span, 1.0), 0.0).astype(np.float32)
    count = np.zeros(BINS)
    weight = np.zeros(BINS)
    signal = 0.0
    flat_view = view.reshape(-1)
    per = max(1, BLOCK_ELEMENTS // length)
    # blocks of whole rows, or of one row's elements when there is one row
    pieces = ([(0, 1, start, min(numel, start + BLOCK_ELEMENTS)) for start in range(0, numel, BLOCK_ELEMENTS)]
              if rows == 1 else [(r, min(rows, r + per), r * length, min(numel, (r + per) * length))
                                 for r in range(0, rows, per)])
    jit = kernels("qpack.estimate_jit")
    for first, last, start, end in pieces:
        if rows == 1:
            part = flat_view[start:end].to(torch.float32).numpy()
        else:
            padded = view[first:last].to(torch.float32).numpy()
            part = padded.reshape(-1)[:end - start]
        if jit is not None:  # one pass, no temporaries; the same bins and sums as below
            block_count, block_weight = np.zeros(BINS, dtype=np.int64), np.zeros(BINS if rows > 1 else 0)
            jit.bin_rows(np.ascontiguousarray(part), end - start, end - start if rows == 1 else length,
                         low[first:last], scale[first:last], square[first:last], block_count, block_weight)
            count += block_count
            if rows > 1:
                weight += block_weight
        elif rows == 1:
            count += np.bincount(((part - low[0]) * scale[0]).astype(np.uint16), minlength=BINS)
        else:
            bins = ((padded - low[first:last, None]) * scale[first:last, None]).reshape(-1)[:end - start]
            bins = bins.astype(np.uint16)
            weight += np.bincount(bins, weights=np.repeat(square[first:last], length)[:end - start], minlength=BINS)
            count += np.bincount(bins, minlength=BINS)
        wide = part.astype(np.float64)
        signal += float(np.dot(wide, wide))
    count[0] -= constant
    if rows == 1:
        weight = count * square[0]
    used = np.flatnonzero(count > 0)
    width = 1.0 / (BINS - 1)
    return Statistics((used + 0.5) * width, count[used], weight[used], width * width / 12, constant, signal,
                      numel, low, high)


def uniform(stats: Statistics, settings: Sequence[tuple[int, float]]) -> tuple[np.ndarray, np.ndarray]:
    """Index counts (settings x 2^max bits) and squared errors of uniform grids at each
    (bits, span): a grid ``span`` times its row's range about its middle (codecs.uniform)."""
    top = 1 << max(bits for bits, _ in settings)
    k = np.arange(top, dtype=np.float64)
    steps = np.array([span / ((1 << bits) - 1) for bits, span in settings])
    first = np.array([0.5 - span / 2 for _, span in settings])
    levels = first[:, None] + k[None, :] * steps[:, None]
    inner = np.where(k[None, 1:] < np.array([1 << bits for bits, _ in settings])[:, None],
                     levels[:, :-1] + steps[:, None] / 2, np.inf)
    bounds = np.empty((len(settings), top + 1), dtype=np.int64)
    bounds[:, 0], bounds[:, -1] = 0, stats.u.size
    bounds[:, 1:-1] = np.searchsorted(stats.u, inner, side="left")
    return stats.segments(bounds, levels)


def kmeans(stats: Statistics, widths: Sequence[int]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Index counts, squared errors and codebook lengths of k-means codebooks (one per tensor)
    of 2^b centroids for each width b, by Lloyd's algorithm from companding quantiles (from
    Ward's agglomeration where there are fewer than 4 points a cluster)."""
    top = 1 << max(widths)
    size = np.array([1 << b for b in widths])
    points = stats.u.size
    # companding quantiles (the high-resolution optimum, as kmeans1d seeds): a density from
    # B quantile bins of equal weight, and centres evenly spaced in the integral of its cube root
    total = stats.c[-1]
    count = int(min(4096, max(16, 2 * math.sqrt(total)), points))
    at = np.minimum(np.searchsorted(stats.c[1:], total * np.arange(count + 1) / count, side="left"), points - 1)
    edges = stats.u[at]
    edges[0], edges[-1] = stats.u[0], stats.u[-1]
    comp = np.concatenate(([0.0], np.cumsum(np.cbrt(np.square(np.diff(edges))))))
    comp = comp / comp[-1] if comp[-1] > 0 else np.arange(count + 1) / count
    mixed = 0.02 * np.arange(count + 1) / count + 0.98 * comp
    slot = np.arange(top)[None, :]
    valid = slot < size[:, None]
    centres = np.where(valid, np.interp((slot + 0.5) / size[:, None], mixed, edges), np.inf)
    few = [int(k) for k in size if points < 4 * k]
    if few:  # few points a cluster: merged from single points (or each point its own)
        merged = _merged(stats, few)
        for i, k in enumerate(size):
            if int(k) in merged:
                centres[i] = np.inf
                centres[i, :merged[int(k)].size] = merged[int(k)]
    bounds = np.zeros((len(widths), top + 1), dtype=np.int64)
    bounds[:, -1] = points
    for _ in range(LLOYD_ITERATIONS):
        inner = np.searchsorted(stats.u, (centres[:, :-1] + centres[:, 1:]) / 2, side="right")
        if np.array_equal(inner, bounds[:, 1:-1]):
            break  # a fixed point
        bounds[:, 1:-1] = inner
        mass = np.diff(stats.e0[bounds], axis=1)
        mean = np.diff(stats.e1[bounds], axis=1) / np.where(mass > 0, mass, 1.0)
        centres = np.sort(np.where(valid & (mass > 0), mean, centres), axis=1)  # an empty cluster stays put
    bounds[:, 1:-1] = np.searchsorted(stats.u, (centres[:, :-1] + centres[:, 1:]) / 2, side="right")
    counts, error = stats.segments(bounds, np.where(np.isfinite(centres), centres, 0.0))
    return counts, error, np.maximum(np.count_nonzero(counts, axis=1), 1)


def _merged(stats: Statistics, sizes: Sequence[int]) -> dict[int, np.ndarray]:
    """Centres of at most k clusters for each k of ``sizes``, from Ward's agglomeration of
    neighbouring points (first grouped into at most ``MERGE_GROUPS`` runs of equal count):
    each round merges the pairs that cost least to merge among their neighbours (so no two
    overlap), as many as are still to go to the next k."""
    points = stats.u.size
    cuts = np.unique(np.linspace(0, points, min(points, MERGE_GROUPS) + 1).round().astype(np.int64))
    found = {}
    for k in sorted(set(sizes), reverse=True):
        while cuts.size - 1 > k:
            mass = np.maximum(np.diff(stats.e0[cuts]), 1e-300)
            mean = np.diff(stats.e1[cuts]) / mass
            cost = mass[:-1] * mass[1:] / (mass[:-1] + mass[1:]) * np.square(np.diff(mean))
            padded = np.concatenate(([np.inf], cost, [np.inf]))
            local = np.flatnonzero((cost <= padded[:-2]) & (cost < padded[2:]))
            if local.size == 0:
                local = np.array([int(np.argmin(cost))])
            chosen = local[np.argsort(cost[local], kind="stable")[:cuts.size - 1 - k]]
            cuts = np.delete(cuts, chosen + 1)
        found[k] = np.diff(stats.e1[cuts]) / np.maximum(np.diff(stats.e0[cuts]), 1e-300)
    return found


def rans_sizes(numel: int, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """:func:`qpack.rans.encoded_size` of each row of ``counts`` (candidates x symbols), at
    once, and the bits the symbols cost under its frequencies."""
    counts = np.asarray(counts, dtype=np.int64)
    present = counts > 0
    used = present.sum(axis=1)
    share = counts * ((_TOTAL - used) / counts.sum(axis=1).astype(np.float64))[:, None]
    floor = np.floor(share)
    freq = floor.astype(np.int64) + present
    left = _TOTAL - freq.sum(axis=1)
    remainder = np.where(present, share - floor, -1.0)
    order = np.argsort(-remainder, axis=1, kind="stable")
    rank = np.empty_like(order)
    np.put_along_axis(rank, order, np.arange(counts.shape[1])[None, :].repeat(len(counts), axis=0), axis=1)
    freq += rank < left[:, None]
    with np.errstate(divide="ignore"):
        bits = -np.where(present, counts * np.log2(np.where(present, freq, 1) / _TOTAL), 0.0).sum(axis=1)
    lanes = np.array([rans.choose_lanes(numel, float(b)) for b in bits])
    alphabet = counts.shape[1] - np.argmax(freq[:, ::-1] > 0, axis=1)
    return 8 + 2 * alphabet + 4 * lanes + 2 * np.ceil(bits / 16).astype(np.int64), bits


#: zstd's size of indices over their entropy. Measured on the zoo's trained weights at
#: zstd level 3: 1.00-1.02 for Huffman-friendly containers (1 bit, 4 bits in nibbles, 6-8 in
#: bytes), more (up to 1.28) for 2, 3 and 5 bits, where rANS is then chosen. One value for every
#: width chose as well as the exhaustive search on the zoo and on bench_allocate's tensors
#: (per-width medians, or a zstd sample of each tensor, did worse: up to 0.07 dB of the
#: objective). Indices are now coded at level 1 (encoder.INDEX_ZSTD_LEVEL), which comes to
#: 1.004-1.011 on bench_formats' tensors in byte containers, where level 3 reached 1.12: the
#: predictions miss by less, and the allocation confirms fewer rounds
ZSTD_OVER_ENTROPY = dict.fromkeys(range(1, 17), 1.01)
ZSTD_FRAMING = 32


def stored_sizes(numel: int, bits: Sequence[int], counts: np.ndarray, rans_mode: str) -> np.ndarray:
    """Payload bytes (with the padding before them, spec 1.3) the writer is predicted to store: rANS where it saves
    ``RANS_MIN_SAVING`` over the best zstd form, else that form; zstd is predicted from the
    entropy times ``ZSTD_OVER_ENTROPY``, at most the packed size (stored as it is)."""
    packed = np.array([packed_size(numel, b) for b in bits])
    coded, entropy_bits = rans_sizes(numel, counts)
    over = np.array([ZSTD_OVER_ENTROPY[b] for b in bits])
    zstd = np.minimum(packed, np.ceil(entropy_bits / 8 * over) + ZSTD_FRAMING)
    payload = np.where(coded < zstd * (1 - RANS_MIN_SAVING[rans_mode]), coded, zstd)
    return np.array([payload_span(int(p)) for p in payload])


def relative_error(stats: Statistics, error: np.ndarray) -> list[float]:
    """rel_rms as the encoder reports it (4 significant digits)."""
    if stats.signal <= 0:
        return [0.0 if e == 0 else math.inf for e in error]
    return [float(f"{math.sqrt(e / stats.signal):.4g}") for e in error]
