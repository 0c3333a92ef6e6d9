"""``uniform``: min/max per tensor, per output channel or per group, b-bit indices.

Reconstruction (spec section 3.2), every step in float32 and rounded:

    step = fl32(fl32(max - min) / fl32(2^b - 1))
    W    = fl32(min + fl32(step * idx))

The encoder picks ``idx = clamp(round((w - min) / step), 0, 2^b - 1)``; with
``Policy.rounding="balanced"`` it then moves a few of them to their other neighbour so that
each output row's rounding errors sum to about 0 (:func:`balanced`; the format does not say
how indices are chosen); a constant row (``min == max``) has step 0 and every index 0.
"""

from __future__ import annotations

import numpy as np
import torch

from ..jit import kernels
from .lookup import MIN_ELEMENTS, affine, worth_a_kernel
from .rows import as_rows, from_rows

__all__ = ["BALANCED_MAX_BITS", "balanced", "choose_params", "quantize", "dequantize", "dequantize_with_step",
           "step_of", "as_float16", "as_uint8", "from_uint8", "zero_heavy", "zero_heavy_rows", "with_zero_rows",
           "ZERO_HEAVY"]

#: balanced rounding (:func:`balanced`) is applied up to this width: at 7-8 bits the rows'
#: summed errors are too small to matter (the zoo's -b 8 drops moved by at most 0.06 points,
#: either way) and balancing would triple the quantization time of an 8-bit pack
BALANCED_MAX_BITS = 6
#: float16 parameters are used only when rounding them widens the grids' spans (root mean
#: square over rows) by at most this share
FLOAT16_MAX_WIDENING = 0.01


def step_of(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 grid step per row, computed exactly as the spec states, on ``lo``'s device.

    The division runs on the CPU: CUDA divides a tensor by a scalar as a multiplication by
    the scalar's reciprocal, which can round differently from a true division.
    """
    step = (hi.cpu() - lo.cpu()) / float((1 << bits) - 1)
    return step.to(lo.device)


def choose_params(tensor: torch.Tensor, bits: int, rows: int = 1,
                  row_length: int | None = None, keep_zero: bool = False, span: float = 1.0) -> dict[str, torch.Tensor]:
    """Per-row float32 min and max of ``tensor`` (flattened in C order), or a wider grid.

    Args:
        tensor: a finite floating tensor with at least one element.
        bits: index width (unused for the choice, kept for a uniform codec signature).
        rows: number of parameter sets: 1 per tensor, ``shape[0]`` per channel, or the number
            of groups.
        row_length: elements per row when rows are groups (the last may be shorter).
        keep_zero: widen each row's range a little so that 0 is exactly one of its levels
            (pruned weights stay exactly zero).
        span: each row's grid spans this many times its values' range, about its middle
            (>= 1). Wider than the values, the grid's outer levels go unused and its step
            grows: with entropy-coded indices (rANS), unused levels cost nothing, so spans
            between 1 and 2 give the steps between two widths, and their sizes between.

    Returns:
        ``{"min": Tensor[rows], "max": Tensor[rows]}`` in float32.
    """
    view = as_rows(tensor, rows, row_length)  # min and max are exact in any dtype: no float32 copy
    lo, hi = view.amin(dim=1).to(torch.float32), view.amax(dim=1).to(torch.float32)
    if span != 1.0:
        lo, hi = _widened(lo, hi, span)
    if keep_zero:
        lo, hi = _range_with_exact_zero(lo.numpy(), hi.numpy(), bits)
    return {"min": lo, "max": hi}


#: a grid with an exact 0 level is tried when more than this share of the values lie within
#: half a step of 0, and kept where its error is lower (``zero_level_helps``): an L1-trained or
#: sparse layer, whose near-zero weights a grid with 0 between two levels would all push half
#: a step away (a seed CNN's fc1 at 6 bits: relative error 1.01, SNR -0.1 dB; with a 0 level,
#: 0.096 and 20.3 dB, in fewer bytes). Dense Gaussian weights pass the share at 2 bits, where
#: the plain grid is the better one.
ZERO_HEAVY = 0.5
#: values the tests for a 0 level look at (a strided sample of every row)
_COMPARE_SAMPLE = 1 << 16


def _row_sample(tensor: torch.Tensor, rows: int, row_length: int | None) -> torch.Tensor:
    """A strided sample of each row's values (at most about ``_COMPARE_SAMPLE`` in all, at
    least one per row), in float64: what the two tests below look at, off the hot path of a
    full pass."""
    view = as_rows(tensor, rows, row_length)
    return view[:, ::max(1, view.numel() // _COMPARE_SAMPLE)].to(torch.float64)


def _near_zero(tensor: torch.Tensor, params: dict[str, torch.Tensor], bits: int, rows: int,
               row_length: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(which sampled values lie within half a step of 0, per row of a strided sample;
    which rows' ranges hold 0 inside, where it is not already an end), on the grids ``params``."""
    lo, hi = params["min"].to(torch.float64), params["max"].to(torch.float64)
    sample = _row_sample(tensor, rows, row_length)
    half_step = ((hi - lo) / ((1 << bits) - 1) / 2)[:, None]
    return sample.abs() < half_step, (lo < 0) & (hi > 0)


def zero_heavy_rows(tensor: torch.Tensor, params: dict[str, torch.Tensor], bits: int, rows: int,
                    row_length: int | None) -> torch.Tensor:
    """Per row, whether more than ``ZERO_HEAVY`` of its values (of a strided sample) lie
    within half a step of 0 on the grid ``params`` gives it, 0 being inside the row's range
    and not a level already: the rows that an exact 0 level would help.

    Why per row: in an L1-trained layer most rows are dead (all their weights shaking
    around 0, on grids of their own tiny range), and the few live ones hold a few large
    weights over a near-zero bulk. Counted over the whole tensor the dead rows outvote the
    live ones, whose bulk then sat half a step off 0 on every row: the seed CNN's fc1 at
    ``-b 4 -g channel`` had relative error 0.48 and lost 5-27 points.
    """
    if bits < 2:
        return torch.zeros(params["min"].numel(), dtype=torch.bool)  # two levels cannot hold 0 and both sides
    near, inside = _near_zero(tensor, params, bits, rows, row_length)
    return inside & (near.to(torch.float64).mean(dim=1) > ZERO_HEAVY)


def zero_heavy(tensor: torch.Tensor, params: dict[str, torch.Tensor], bits: int, rows: int,
               row_length: int | None) -> bool:
    """Whether more than ``ZERO_HEAVY`` of the values (of a strided sample) lie within half a
    step of 0 (and 0 is not a level already), on the grids ``params`` give."""
    if bits < 2:
        return False  # two levels cannot hold 0 and both sides
    near, inside = _near_zero(tensor, params, bits, rows, row_length)
    # 0 an end of every grid already: nothing to gain
    return bool(inside.any()) and int(near.sum()) > ZERO_HEAVY * near.numel()


def with_zero_rows(plain: dict[str, torch.Tensor], zero_grid: dict[str, torch.Tensor],
                   rows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``plain``'s grids, with those of ``rows`` (a bool mask) taken from ``zero_grid``."""
    return {"min": torch.where(rows, zero_grid["min"], plain["min"]),
            "max": torch.where(rows, zero_grid["max"], plain["max"])}


def zero_level_helps(tensor: torch.Tensor, plain: dict[str, torch.Tensor], with_zero: dict[str, torch.Tensor],
                     bits: int, rows: int, row_length: int | None) -> bool:
    """Whether the grids ``with_zero`` quantize ``tensor`` with less squared error than
    ``plain`` (on a strided sample of at most about ``_COMPARE_SAMPLE`` values)."""
    sample = _row_sample(tensor, rows, row_length)

    def error(params: dict[str, torch.Tensor]) -> float:
        lo, hi = params["min"].to(torch.float64)[:, None], params["max"].to(torch.float64)[:, None]
        step = (hi - lo) / ((1 << bits) - 1)
        index = torch.where(step > 0, torch.round((sample - lo) / torch.where(step > 0, step, 1)), 0)
        return float(((lo + step * index.clamp(0, (1 << bits) - 1)) - sample).pow(2).sum())

    return error(with_zero) < error(plain)


def _widened(lo: torch.Tensor, hi: torch.Tensor, span: float) -> tuple[torch.Tensor, torch.Tensor]:
    """[lo, hi] scaled by ``span`` about its middle, in float64, rounded outward to float32
    so that it still covers [lo, hi]; rows that would overflow float32 keep their range."""
    if not (span >= 1.0 and np.isfinite(span)):
        raise ValueError(f"a grid's span must be a finite number >= 1, got {span!r}")
    low, high = lo.numpy().astype(np.float64), hi.numpy().astype(np.float64)
    middle, half = (low + high) / 2, (high - low) / 2 * span
    with np.errstate(over="ignore"):
        new_lo = np.minimum(np.nextafter((middle - half).astype(np.float32), np.float32(-np.inf)), lo.numpy())
        new_hi = np.maximum(np.nextafter((middle + half).astype(np.float32), np.float32(np.inf)), hi.numpy())
        fits = np.isfinite(new_lo) & np.isfinite(new_hi) & np.isfinite(new_hi - new_lo) & (high > low)
    return (torch.from_numpy(np.where(fits, new_lo, lo.numpy()).astype(np.float32)),
            torch.from_numpy(np.where(fits, new_hi, hi.numpy()).astype(np.float32)))


def as_float16(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The parameters rounded to float16 values (kept as float32), or None when float16 does not fit.

    Each min is rounded down and each max up, so every row's grid still covers its values
    and no weight is cut off by more than half a step. None when a value is beyond float16's
    range, or when the rounding would widen the spans (root mean square over rows) by more
    than FLOAT16_MAX_WIDENING (tiny ranges, near float16's subnormals).
    """
    lo, hi = params["min"].numpy(), params["max"].numpy()
    with np.errstate(over="ignore", invalid="ignore"):  # beyond float16: inf, refused below
        lo16, hi16 = lo.astype(np.float16), hi.astype(np.float16)
        lo16 = np.where(lo16.astype(np.float32) > lo, np.nextafter(lo16, np.float16(-np.inf)), lo16)
        hi16 = np.where(hi16.astype(np.float32) < hi, np.nextafter(hi16, np.float16(np.inf)), hi16)
    if not (np.isfinite(lo16).all() and np.isfinite(hi16).all()):
        return None
    new_lo, new_hi = lo16.astype(np.float32), hi16.astype(np.float32)
    before = float(np.sum((hi.astype(np.float64) - lo) ** 2))
    after = float(np.sum((new_hi.astype(np.float64) - new_lo) ** 2))
    if after > before * (1 + FLOAT16_MAX_WIDENING) ** 2:
        return None
    return {"min": torch.from_numpy(new_lo), "max": torch.from_numpy(new_hi)}


def from_uint8(min_codes: np.ndarray, max_codes: np.ndarray, base: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Two-level parameters (spec 3.2, param_dtype "uint8"): each row's min and max from its
    8-bit codes a, b and the tensor's float32 base (m0, ms, M0, Ms), in float32, no FMA:

        min[c] = fl32(m0 + fl32(ms * a[c]))      max[c] = fl32(M0 + fl32(Ms * b[c]))
    """
    m0, ms, top0, top_step = (np.float32(v) for v in base)
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow is refused by the reader (R13)
        lo = (m0 + (ms * min_codes.astype(np.float32)).astype(np.float32)).astype(np.float32)
        hi = (top0 + (top_step * max_codes.astype(np.float32)).astype(np.float32)).astype(np.float32)
    return lo, hi


def as_uint8(params: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]] | None:
    """The parameters as 8-bit codes under a float32 base per tensor, or None when that does
    not fit (GGUF's K-quants do the same with 6-bit scales under a float16 super-scale).

    Mins are coded from the smallest min up and rounded down, maxes from the smallest max up
    and rounded up, so each row's grid still covers its values. Returns the decoded min/max
    (float32, what the reader computes) and the stored codes and base.
    """
    lo, hi = params["min"].numpy().astype(np.float32), params["max"].numpy().astype(np.float32)
    m0, top0 = lo.min(), hi.min()
    ms = _covering_step(m0, lo.max())
    top_step = _covering_step(top0, hi.max())
    if ms is None or top_step is None:
        return None
    base = np.array([m0, ms, top0, top_step], dtype=np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.floor(np.where(ms > 0, (lo - m0) / ms, 0)).clip(0, 255).astype(np.uint8)
        b = np.ceil(np.where(top_step > 0, (hi - top0) / top_step, 0)).clip(0, 255).astype(np.uint8)
    # the division above rounds: take the next code where it still covers the row (a tighter
    # grid), then step back wherever a decoded value does not cover it
    up = np.minimum(a.astype(np.int64) + 1, 255).astype(np.uint8)
    down = np.maximum(b.astype(np.int64) - 1, 0).astype(np.uint8)
    tighter_lo, tighter_hi = from_uint8(up, down, base)
    a = np.where(tighter_lo <= lo, up, a).astype(np.uint8)
    b = np.where(tighter_hi >= hi, down, b).astype(np.uint8)
    for _ in range(4):
        new_lo, new_hi = from_uint8(a, b, base)
        low, high = new_lo > lo, new_hi < hi
        if not (low.any() or high.any()):
            break
        a = np.where(low & (a > 0), a - 1, a).astype(np.uint8)
        b = np.where(high & (b < 255), b + 1, b).astype(np.uint8)
    new_lo, new_hi = from_uint8(a, b, base)
    if (new_lo > lo).any() or (new_hi < hi).any() or not np.isfinite(new_hi - new_lo).all():
        return None
    return ({"min": torch.from_numpy(new_lo), "max": torch.from_numpy(new_hi)},
            {"min": a, "max": b, "base": base})


def _covering_step(start: np.float32, end: np.float32) -> np.float32 | None:
    """The smallest float32 step s with fl32(start + fl32(s * 255)) >= end (0 if end == start)."""
    if end <= start:
        return np.float32(0)
    with np.errstate(over="ignore"):
        step = np.float32((np.float64(end) - np.float64(start)) / 255)
        for _ in range(64):
            if np.float32(start + np.float32(step * np.float32(255))) >= end:
                return step if np.isfinite(step) else None
            step = np.nextafter(step, np.float32(np.inf), dtype=np.float32)
    return None


def _range_with_exact_zero(lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, a (min, max) covering [lo, hi] whose grid (spec 3.2) holds an exact 0.

    With step s and zero index z, min = -fl32(s * z) makes level z exactly
    fl32(min + fl32(s * z)) = 0. s is chosen as fl32(D / L) for a float32 span D, and max is
    searched among the float32 values near min + D for one whose computed step is exactly s.
    (Rows where none exists move to the nearest reachable step; a row that still misses after
    a few rounds keeps its zero within a hair of 0, which the tests would catch.)
    """
    levels = np.float32((1 << bits) - 1)
    lo = np.minimum(lo, 0).astype(np.float32)
    hi = np.maximum(hi, 0).astype(np.float32)
    span = (hi.astype(np.float64) - lo.astype(np.float64))
    safe_span = np.where(span > 0, span, 1.0)
    # the zero's index: of the two nearest to where 0 falls, the one needing the smaller step,
    # kept off the ends when a side has weights (else that side would be cut off) unless
    # there are only two levels
    where = -lo.astype(np.float64) / safe_span * float(levels)
    first = np.where((lo < 0) & (levels >= 2), 1.0, 0.0)
    last = np.where((hi > 0) & (levels >= 2), float(levels) - 1, float(levels))
    candidates = [np.clip(np.floor(where), first, last), np.clip(np.ceil(where), first, last)]
    needed = [_step_needed(lo, hi, z, float(levels)) for z in candidates]
    zero_at = np.where(needed[0] <= needed[1], candidates[0], candidates[1])
    span32 = np.nextafter((np.minimum(needed[0], needed[1]) * float(levels)).astype(np.float32),
                          np.float32(np.inf), dtype=np.float32)
    step = (span32 / levels).astype(np.float32)
    step[span == 0] = 0
    zero_at = zero_at.astype(np.float32)
    for _ in range(8):
        # min puts level z exactly at 0; max must make the spec's step exactly `step`. Not
        # every step is reachable from a given min, so a row that misses takes the nearest
        # reachable step and tries again with its own min.
        new_lo = -(step * zero_at).astype(np.float32)
        new_hi, found, nearest = _max_for_step(new_lo, step, levels)
        if found.all():
            break
        step = np.where(found, step, nearest)
    return torch.from_numpy(new_lo), torch.from_numpy(np.maximum(new_hi, new_lo))


def _step_needed(lo: np.ndarray, hi: np.ndarray, zero_at: np.ndarray, levels: float) -> np.ndarray:
    """The step that puts 0 at index ``zero_at`` and still reaches lo below and hi above."""
    below = np.where(zero_at > 0, -lo.astype(np.float64) / np.maximum(zero_at, 1), 0.0)
    above = np.where(zero_at < levels, hi.astype(np.float64) / np.maximum(levels - zero_at, 1), 0.0)
    return np.maximum(below, above)


def _max_for_step(lo: np.ndarray, step: np.ndarray, levels: np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row, a max whose spec step fl32(fl32(max - lo) / L) is exactly ``step``.

    Walks float32 values outward from lo + step * L. Returns (max, found, the reachable step
    nearest to ``step`` for rows not found).
    """
    target = (lo + (step * levels).astype(np.float32)).astype(np.float32)
    best, found = target.copy(), np.zeros(lo.shape, dtype=bool)
    nearest = np.full(lo.shape, np.inf, dtype=np.float32)
    up, down = target.copy(), target.copy()
    for _ in range(32):
        for candidate in (up, down):
            got = ((candidate - lo).astype(np.float32) / levels).astype(np.float32)
            hit = ~found & (got == step)
            best[hit] = candidate[hit]
            found |= hit
            closer = ~found & (np.abs(got - step) < np.abs(nearest - step))
            nearest[closer] = got[closer]
        if found.all():
            break
        up = np.nextafter(up, np.float32(np.inf), dtype=np.float32)
        down = np.nextafter(down, np.float32(-np.inf), dtype=np.float32)
    return best, found, np.where(np.isfinite(nearest), nearest, step)


def quantize(values: torch.Tensor, params: dict[str, torch.Tensor], bits: int,
             row_length: int | None = None, balance: tuple[int, int] | None = None) -> torch.Tensor:
    """Grid index of every element of ``values`` (whole rows), flat int32 in C order.

    The nearest index, or with ``balance=(segment, offset)`` the nearest indices corrected by
    :func:`balanced`, in runs of ``segment`` elements of which the first starts ``offset``
    elements before ``values`` (a block may begin inside a run).
    """
    lo, hi = params["min"], params["max"]
    step = step_of(lo, hi, bits)
    constant = step == 0
    safe_step = torch.where(constant, torch.ones_like(step), step)
    position = as_rows(values, lo.numel(), row_length).to(torch.float32) - lo[:, None]  # a new tensor
    position.div_(safe_step[:, None])
    # nearest rounding rounds in place; balancing needs the positions beside the indices
    idx = (position.round_() if balance is None else position.round()).clamp_(0, (1 << bits) - 1)
    if bool(constant.any()):
        idx[constant] = 0
        position[constant] = 0
    if balance is None:
        return from_rows(idx.to(torch.int32), values.numel())
    zero = torch.where(constant, -1.0, -lo / safe_step)  # the index of an exact 0 level, if any
    zero = torch.where((zero == zero.round()) & (zero >= 0) & (zero < 1 << bits), zero, -1.0)
    flat_idx, flat_position = from_rows(idx, values.numel()), from_rows(position, values.numel())
    zero_of = zero.expand(values.numel()) if lo.numel() == 1 else from_rows(
        zero[:, None].expand(idx.shape).contiguous(), values.numel())
    return balanced(flat_idx, flat_position, (1 << bits) - 1, *balance, zero_of).to(torch.int32)


def balanced(idx: torch.Tensor, position: torch.Tensor, top: int, segment: int, offset: int,
             zero: torch.Tensor) -> torch.Tensor:
    """Nearest indices ``idx`` of grid positions ``position`` (both flat float32), moved one
    level where that keeps each run of ``segment`` elements' rounding errors summing to at
    most half a step.

    Why: a layer sums each output over its row of weights (a conv's fan-in); after a ReLU
    its inputs have a mean well above zero, so the rows' summed rounding errors shift every
    output by a constant that no averaging removes (global average pooling keeps it whole),
    and on some networks at 3-4 bits that shift, not the noise, is what costs accuracy. The
    data-free cure of bias correction (Nagel et al. 2019) without touching another tensor:
    per run, the ``round(sum of errors)`` elements rounded the most against the sum's sign
    (for smooth weights, those within a hair of half a step) take the other neighbour, the
    least added squared error that zeroes the sum. Values rounded to an exact 0 level (a
    zero-heavy grid's, ``zero``: its index per element, -1 for none) neither count nor move:
    that level is where the near-zero bulk of an L1-trained layer is pruned to, and
    "correcting" the bulk's summed error by moving the row's few large weights put back the
    bulk's noise (an L1-trained CNN lost 0.2-1.7 points at 4-6 bits that way; excluded, it
    keeps or beats nearest rounding at 3-6 bits). Values exactly on a level (pruned zeros,
    retrained grids) and moves onto an exact 0 level are left alone too, so a pruning mask
    derived from the weights still holds.

    With numba, tensors of ``MIN_ELEMENTS`` or more run compiled (``balance_jit``: the same
    indices, except which of exactly equal errors at a run's cut moves, there the lower index).
    """
    jit = kernels("qpack.codecs.balance_jit") if idx.numel() >= MIN_ELEMENTS else None
    if jit is not None:
        moved = idx.to(torch.float32, copy=True).contiguous()
        jit.balance_into(moved.numpy(), position.to(torch.float32).contiguous().numpy(),
                         zero.to(torch.float32).numpy(), top, segment, offset)
        return moved
    return balanced_reference(idx, position, top, segment, offset, zero)


def balanced_reference(idx: torch.Tensor, position: torch.Tensor, top: int, segment: int, offset: int,
                       zero: torch.Tensor) -> torch.Tensor:
    """:func:`balanced` in torch operations (without numba, for small tensors, and the
    reference the compiled loop is tested against)."""
    numel = idx.numel()
    if segment > numel and numel:
        # a block inside one or two long runs: each piece is balanced on its own (padding it
        # out to whole runs would allocate up to a run's length per block)
        cut = segment - offset
        if cut >= numel:
            return balanced_reference(idx, position, top, numel, 0, zero)
        return torch.cat([balanced_reference(idx[:cut], position[:cut], top, cut, 0, zero[:cut]),
                          balanced_reference(idx[cut:], position[cut:], top, numel - cut, 0, zero[cut:])])
    runs = -(-(offset + numel) // segment)

    def as_runs(flat: torch.Tensor, fill: float) -> torch.Tensor:
        padded = torch.full((runs * segment,), fill, dtype=torch.float32)
        padded[offset:offset + numel] = flat
        return padded.reshape(runs, segment)

    level, error = as_runs(idx, 0.0), as_runs(idx - position, 0.0)  # padding: no error, never moved
    zeros = as_runs(zero, -1.0)
    on_zero = level == zeros  # rounded to an exact 0: neither counted nor moved
    error.masked_fill_(on_zero, 0.0)
    excess = error.sum(dim=1, dtype=torch.float64).round_().to(torch.int64)  # levels to move per run
    most = int(excess.abs().max()) if runs else 0
    if most == 0:
        return idx
    direction = excess.sign().to(torch.float32)[:, None]  # +1: move down (rounded up too often)
    target = level - direction
    signed = error * direction
    movable = (signed > 0) & (target >= 0) & (target <= top) & (target != zeros) & ~on_zero
    best, where = torch.where(movable, signed, -1.0).topk(min(most, segment), dim=1)
    take = (torch.arange(best.shape[1])[None, :] < excess.abs()[:, None]) & (best > 0)
    level.scatter_(1, where, torch.where(take, target.gather(1, where), level.gather(1, where)))
    return level.reshape(-1)[offset:offset + numel]


def dequantize(indices: torch.Tensor, params: dict[str, torch.Tensor], bits: int,
               shape: tuple[int, ...], dtype: torch.dtype, row_length: int | None = None) -> torch.Tensor:
    """Rebuild the tensor from its indices on the indices' device (two roundings, no FMA)."""
    lo = params["min"]
    step = step_of(lo, params["max"], bits)
    rows = lo.numel()
    if worth_a_kernel(indices):
        # the same two roundings in one compiled pass (faster than a lookup in a table of
        # every row's levels, whose gathers do not vectorise)
        row_length = row_length or -(-indices.numel() // rows)
        return affine(indices, lo.to(torch.float32), step.to(torch.float32), row_length).reshape(shape).to(dtype)
    return dequantize_with_step(indices, lo, step, shape, dtype, row_length)


def dequantize_with_step(indices: torch.Tensor, lo: torch.Tensor, step: torch.Tensor,
                         shape: tuple[int, ...], dtype: torch.dtype,
                         row_length: int | None = None) -> torch.Tensor:
    """``dequantize`` with the step (``step_of``) computed beforehand: the same roundings.

    For callers that rebuild one tensor many times (qpack.packed), so the step is divided
    once and never crosses back to the CPU.
    """
    count = indices.numel()
    if lo.numel() == 1 and indices.device.type == "cpu" and count > _CACHE_BLOCK:
        values = _dequantize_cached(indices.reshape(-1), lo.reshape(()), step.reshape(()))
        return values.reshape(shape).to(dtype)
    values = as_rows(indices, lo.numel(), row_length).to(torch.float32)
    values.mul_(step[:, None])
    values.add_(lo[:, None])
    return from_rows(values, count).reshape(shape).to(dtype)


#: elements per block that stay in the CPU cache between the multiply and the add
_CACHE_BLOCK = 1 << 16


def _dequantize_cached(indices: torch.Tensor, lo: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    # The same two roundings, block by block: the multiply converts the indices as it reads
    # them and the add finds its input still in cache, so memory is crossed once, not thrice.
    out = torch.empty(indices.numel(), dtype=torch.float32)
    for start in range(0, indices.numel(), _CACHE_BLOCK):
        block = out[start:start + _CACHE_BLOCK]
        torch.mul(indices[start:start + _CACHE_BLOCK], step, out=block)
        block.add_(lo)
    return out
