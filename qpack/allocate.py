"""Choosing the bits of each tensor: the least error for a file size, or the least size for an error.

Both problems start from the same measurements. Every tensor the policy quantizes is encoded
at each candidate width, recording what it really costs (stored bytes after zstd, plus its
parameters) and what it loses (its squared error relative to its mean square, times its
element count, times a sensitivity weight). Then:

- ``--target-bpw X`` minimises the total error with the file within X bits per weight;
- ``--max-error E`` minimises the file size with the overall relative RMS error within E.

Each is solved the same way: a Lagrangian price trades the limited quantity (bytes, or error)
against the one minimised, and is raised until the limit holds; then greedy steps use up
what one price for all tensors leaves unspent (see ``_allocate``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace
from numbers import Real
from typing import NamedTuple

import msgpack
import numpy as np
import torch

from .encoder import encode_tensor
from .errors import InputError
from .format import TensorEntry
from .policy import Policy

__all__ = ["CANDIDATE_BITS", "allocate_bits"]

#: widths tried for each tensor
CANDIDATE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
#: alignment padding, per tensor (at most)
_PADDING = 63
#: preamble, header framing and metadata (an upper estimate)
_FILE_OVERHEAD = 1024


class _Trial(NamedTuple):
    """One tensor encoded at one width."""

    bits: int
    size: int  # bytes in the file: payload, header entry and padding
    cost: float  # rel_rms^2 * numel * sensitivity weight


class _Measured(NamedTuple):
    """What the trials found for a whole state dict."""

    trials: dict[str, list[_Trial]]  # quantized tensor -> its trials, by width
    weights: dict[str, float]  # quantized tensor -> numel * sensitivity weight
    fixed_bytes: int  # everything the widths do not change: raw tensors, file overhead
    elements: int  # elements of all tensors, raw ones included


_Choice = dict[str, _Trial]
#: columns of a trial, as the allocator's arrays hold them
_SIZE, _COST = _Trial._fields.index("size"), _Trial._fields.index("cost")


def allocate_bits(tensors: Mapping[str, torch.Tensor], policy: Policy, target_bpw: float | None = None,
                  sensitivity: Mapping[str, float] | None = None, *,
                  max_error: float | None = None) -> dict[str, int]:
    """Bits for each tensor the policy quantizes, from ``CANDIDATE_BITS``.

    Give exactly one of ``target_bpw`` (the least error within a file size) and ``max_error``
    (the smallest file within an error bound).

    Args:
        tensors: the state dict (read twice: once here, once when packing).
        policy: the packing policy; its method, granularity and pruning are kept.
        target_bpw: file bytes * 8 / all elements of all tensors, at most.
        sensitivity: optional ``{name: weight}`` multiplying a tensor's error (for instance
            from :func:`qpack.measure_sensitivity`); 1 for the names it does not hold.
        max_error: bound on the overall relative RMS error of the quantized tensors,
            ``sqrt(sum_t w_t n_t rel_t^2 / sum_t w_t n_t)``, with ``rel_t`` a tensor's error
            RMS over its RMS (``rel_rms`` in its stats), ``n_t`` its element count and ``w_t``
            its sensitivity weight. Tensors stored losslessly are left out of the average,
            so they do not loosen the bound on the others.

    Returns:
        ``{name: bits}`` for every quantized tensor.

    Raises:
        InputError: both or neither limit given, a limit that is not a positive finite
            number, a bad sensitivity, or a limit no choice of widths meets.
    """
    if (target_bpw is None) == (max_error is None):
        raise InputError("give exactly one of target_bpw (--target-bpw) and max_error (--max-error)")
    if target_bpw is not None:
        target_bpw = _positive(target_bpw, "target bits per weight")
    else:
        max_error = _positive(max_error, "max error")
    measured = _measure(tensors, policy, _check_sensitivity(sensitivity, tensors))
    if target_bpw is not None:
        choice = _least_error(measured, target_bpw)
    else:
        choice = _least_size(measured, max_error)
    return {name: trial.bits for name, trial in choice.items()}


def _positive(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value) or value <= 0:
        raise InputError(f"{what} must be a positive finite number, got {value!r}")
    return float(value)


def _check_sensitivity(sensitivity: Mapping[str, float] | None,
                       tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    weights = dict(sensitivity or {})
    unknown = sorted(set(weights) - set(tensors))
    if unknown:  # most likely a prefix mismatch ("module."), which would silently weigh nothing
        raise InputError(f"sensitivity names {len(unknown)} tensor(s) the checkpoint lacks, "
                         f"e.g. {unknown[0]!r}")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
            raise InputError(f"sensitivity of {name!r} must be a finite number >= 0, got {weight!r}")
    return {name: float(weight) for name, weight in weights.items()}


def _entry_bytes(entry: TensorEntry) -> int:
    """What a tensor adds besides its payload: its header entry (parameters included) and padding."""
    widest = replace(entry, length=0xFFFFFFFF, offset=0xFFFFFFFF, crc32=0xFFFFFFFF)  # 5-byte ints: an upper bound
    return len(msgpack.packb(widest.to_header(), use_bin_type=True)) + _PADDING


def _measure(tensors: Mapping[str, torch.Tensor], policy: Policy, sensitivity: Mapping[str, float]) -> _Measured:
    """Encode each quantized tensor at every candidate width; size the rest once."""
    trials: dict[str, list[_Trial]] = {}
    weights: dict[str, float] = {}
    elements, fixed_bytes = 0, _FILE_OVERHEAD
    for name, tensor in tensors.items():
        elements += tensor.numel()
        decision = policy.decide(name, tensor)
        if decision.encoding == "raw":
            entry, stored, _ = encode_tensor(name, tensor, decision)
            fixed_bytes += len(stored) + _entry_bytes(entry)
            continue
        weight = tensor.numel() * sensitivity.get(name, 1.0)
        found = []
        for bits in CANDIDATE_BITS:
            entry, stored, row = encode_tensor(name, tensor, replace(decision, bits=bits))
            if entry.encoding == "raw":  # NaN or Inf: stored raw whatever the width
                fixed_bytes += len(stored) + _entry_bytes(entry)
                break
            found.append(_Trial(bits, len(stored) + _entry_bytes(entry), (row.rel_rms or 0.0) ** 2 * weight))
        if found:
            trials[name], weights[name] = found, weight
    return _Measured(trials, weights, fixed_bytes, elements)


def _least_error(measured: _Measured, target_bpw: float) -> _Choice:
    """The least total cost with the file within ``target_bpw``."""
    budget = target_bpw * measured.elements / 8 - measured.fixed_bytes
    choice = _allocate(measured.trials, minimise=_COST, limited=_SIZE, limit=budget)
    if choice is None:
        smallest = sum(min(t.size for t in trials) for trials in measured.trials.values())
        floor = (smallest + measured.fixed_bytes) * 8 / max(measured.elements, 1)
        raise InputError(f"--target-bpw {target_bpw:g} is below what 1-bit indices give here "
                         f"(about {floor:.3f} bits per weight)")
    return choice


def _least_size(measured: _Measured, max_error: float) -> _Choice:
    """The fewest bytes with the overall weighted relative RMS error within ``max_error``."""
    total_weight = sum(measured.weights.values())
    choice = _allocate(measured.trials, minimise=_SIZE, limited=_COST, limit=max_error ** 2 * total_weight)
    if choice is None:
        best = sum(min(t.cost for t in trials) for trials in measured.trials.values())
        raise InputError(f"--max-error {max_error:g} cannot be met here: even the most accurate width "
                         f"of each tensor ({max(CANDIDATE_BITS)} bits at most) gives an error of "
                         f"{math.sqrt(best / total_weight):.4g}")
    return choice


def _allocate(trials: Mapping[str, list[_Trial]], minimise: int, limited: int, limit: float) -> _Choice | None:
    """One trial per tensor: the sum of field ``minimise`` as small as found, the sum of field
    ``limited`` within ``limit``; None if even each tensor's least ``limited`` does not fit.

    Arrays hold one row per tensor and one column per width, so thousands of tensors are quick.
    """
    names = list(trials)
    table = np.array([[tuple(t) for t in trials[name]] for name in names], dtype=np.float64).reshape(
        len(names), len(CANDIDATE_BITS), len(_Trial._fields))
    objective, resource = table[..., minimise], table[..., limited]
    rows = np.arange(len(names))

    def choose(price: float) -> np.ndarray:
        return np.lexsort((resource, objective + price * resource))[:, 0]  # ties: less resource

    def used(choice: np.ndarray) -> float:
        return float(resource[rows, choice].sum())

    if used(np.argmin(resource, axis=1)) > limit:
        return None
    # Lagrangian relaxation: each tensor minimises objective + price * resource on its own,
    # and the price is raised until the sum of resource fits. Sizes after zstd need not grow
    # with bits; this picks from the lower convex hull of each tensor's points regardless.
    low, high = 0.0, 1.0
    while used(choose(high)) > limit:
        high *= 4
    if used(choose(low)) <= limit:
        high = low
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if used(choose(middle)) <= limit else (middle, high)
    # One price for all tensors leaves a gap where one tensor's step is large: the point
    # just past the price can waste much of the limit, the point just short of it misses it.
    # So start from both, and from each single width for all tensors that fits (so the result
    # is never worse than one of those), repair and improve each greedily, and keep the best.
    starts = [choose(high), choose(low)]
    uniform = (np.full(len(names), column) for column in range(table.shape[1]))
    starts += [same for same in uniform if used(same) <= limit]
    finished = [_improve(objective, resource, _repair(objective, resource, start, limit), limit)
                for start in starts]
    best = min(finished, key=lambda choice: (float(objective[rows, choice].sum()), used(choice)))
    return {name: trials[name][column] for name, column in zip(names, best.tolist())}


def _repair(objective: np.ndarray, resource: np.ndarray, choice: np.ndarray, limit: float) -> np.ndarray:
    """Steps freeing resource at the least objective per unit freed, until the choice fits.

    What a step frees beyond the excess is not counted: else one big tensor's step, cheap
    per unit but far more than needed, would win over a small step that is enough.
    """
    choice, rows = choice.copy(), np.arange(len(choice))
    while (excess := resource[rows, choice].sum() - limit) > 0:
        freed = np.minimum(resource[rows, choice][:, None] - resource, excess)
        worse = objective - objective[rows, choice][:, None]
        price = np.where(freed > 0, worse / np.where(freed > 0, freed, 1), np.inf)
        row, column = np.unravel_index(np.argmin(price), price.shape)
        choice[row] = column  # terminates: every step frees some, and the least of each fits
    return choice


def _improve(objective: np.ndarray, resource: np.ndarray, choice: np.ndarray, limit: float) -> np.ndarray:
    """Steps lowering the objective within what is left of the limit, the best gain per unit first."""
    choice, rows = choice.copy(), np.arange(len(choice))
    while True:
        left = limit - resource[rows, choice].sum()
        gain = objective[rows, choice][:, None] - objective
        spent = resource - resource[rows, choice][:, None]
        allowed = (gain > 0) & (spent <= left)
        if not allowed.any():
            return choice
        # a step that spends nothing (or frees some) comes first, the biggest gain among those
        ratio = np.where(allowed, np.where(spent > 0, gain / np.where(spent > 0, spent, 1), np.inf), -np.inf)
        ties = np.flatnonzero(ratio == ratio.max())
        row, column = np.unravel_index(ties[np.argmax(gain.flat[ties])], ratio.shape)
        choice[row] = column
