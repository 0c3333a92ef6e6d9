"""Choosing the bits and granularity of each tensor: the least error for a file size, or the
least size for an error.

Both problems start from the same measurements. Every tensor the policy quantizes is encoded
at each candidate: each width of ``CANDIDATE_BITS`` at each candidate granularity (by default
the policy's, "channel" and "tensor"), recording what it really costs (stored bytes after
zstd or rANS, plus its parameters: per-channel or per-group grids and codebooks pay for
their size here) and what it loses (its squared error relative to its mean square, times its
element count, times a sensitivity weight). Then:

- ``--target-bpw X`` minimises the total error with the file within X bits per weight;
- ``--max-error E`` minimises the file size with the overall relative RMS error within E.

Each is solved the same way: a Lagrangian price trades the limited quantity (bytes, or error)
against the one minimised, and is raised until the limit holds; then greedy steps use up
what one price for all tensors leaves unspent (see ``_allocate``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import replace
from numbers import Real
from typing import NamedTuple

import msgpack
import numpy as np
import torch

from .encoder import encode_tensor
from .errors import InputError
from .format import TensorEntry, parameter_rows
from .policy import Decision, Policy, granularity_for, parse_granularity

__all__ = ["CANDIDATE_BITS", "Choice", "allocate", "candidate_granularities"]

#: widths tried for each tensor
CANDIDATE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
#: alignment padding, per tensor (at most)
_PADDING = 63
#: preamble, header framing and metadata (an upper estimate)
_FILE_OVERHEAD = 1024
#: float32 parameters per parameter set of each method, at a width (a codebook may be shorter)
_PARAMS_PER_ROW = {"uniform": lambda bits: 2, "kmeans": lambda bits: 1 << bits}


class Choice(NamedTuple):
    """What the allocation chose for one tensor."""

    bits: int
    granularity: str  # "tensor", "channel" or "group:G", as ``Policy.granularity`` takes it


class _Trial(NamedTuple):
    """One tensor encoded at one width and granularity."""

    bits: int
    granularity: str
    size: int  # bytes in the file: payload, header entry and padding
    cost: float  # rel_rms^2 * numel * sensitivity weight


class _Measured(NamedTuple):
    """What the trials found for a whole state dict."""

    #: quantized tensor -> its trials, one per (granularity, width) candidate in the same order
    #: for every tensor (a granularity a tensor cannot take repeats what it falls back to)
    trials: dict[str, list[_Trial]]
    weights: dict[str, float]  # quantized tensor -> numel * sensitivity weight
    fixed_bytes: int  # everything the choices do not change: raw tensors, file overhead
    elements: int  # elements of all tensors, raw ones included


_Choice = dict[str, _Trial]
#: fields of a trial the allocator trades against each other
_SIZE, _COST = _Trial._fields.index("size"), _Trial._fields.index("cost")


def allocate(tensors: Mapping[str, torch.Tensor], policy: Policy, target_bpw: float | None = None,
             sensitivity: Mapping[str, float] | None = None, *, max_error: float | None = None,
             granularities: str | Iterable[str] | None = None) -> dict[str, Choice]:
    """Bits (from ``CANDIDATE_BITS``) and granularity for each tensor the policy quantizes.

    Give exactly one of ``target_bpw`` (the least error within a file size) and ``max_error``
    (the smallest file within an error bound).

    Args:
        tensors: the state dict (read twice: once here, once when packing).
        policy: the packing policy; its method and pruning are kept.
        target_bpw: file bytes * 8 / all elements of all tensors, at most.
        sensitivity: optional ``{name: weight}`` multiplying a tensor's error (for instance
            from :func:`qpack.measure_sensitivity`); 1 for the names it does not hold.
        max_error: bound on the overall relative RMS error of the quantized tensors,
            ``sqrt(sum_t w_t n_t rel_t^2 / sum_t w_t n_t)``, with ``rel_t`` a tensor's error
            RMS over its RMS (``rel_rms`` in its stats), ``n_t`` its element count and ``w_t``
            its sensitivity weight. Tensors stored losslessly are left out of the average,
            so they do not loosen the bound on the others.
        granularities: the candidate granularities, e.g. ``("tensor", "channel", "group:64")``
            or ``"tensor,channel,group:64"``; see :func:`candidate_granularities`. Each one
            adds a trial encode per width to every tensor.

    Returns:
        ``{name: Choice(bits, granularity)}`` for every quantized tensor.

    Raises:
        InputError: both or neither limit given, a limit that is not a positive finite
            number, a bad sensitivity or granularity, or a limit no choice meets.
    """
    if (target_bpw is None) == (max_error is None):
        raise InputError("give exactly one of target_bpw (--target-bpw) and max_error (--max-error)")
    if target_bpw is not None:
        target_bpw = _positive(target_bpw, "target bits per weight")
    else:
        max_error = _positive(max_error, "max error")
    candidates = candidate_granularities(policy, granularities)
    measured = _measure(tensors, policy, _check_sensitivity(sensitivity, tensors), candidates)
    if target_bpw is not None:
        choice = _least_error(measured, target_bpw)
    else:
        choice = _least_size(measured, max_error)
    return {name: Choice(trial.bits, trial.granularity) for name, trial in choice.items()}


def candidate_granularities(policy: Policy, granularities: str | Iterable[str] | None = None) -> tuple[str, ...]:
    """The granularities the allocation tries, checked, without repeats.

    By default the policy's own, "channel" and "tensor": per-channel grids are then used
    where they pay for their parameters, one grid per tensor elsewhere. For k-means,
    "channel" is tried by default only when it is the policy's: a codebook fitted per row
    takes about 50 times as long as one per tensor, for every width tried. Groups are tried
    only when asked, for the same reason. A granularity a tensor cannot take (channel for
    1-D, a group as long as the tensor) means "tensor" there.

    Raises:
        InputError: an empty list or an unknown granularity.
    """
    if granularities is None:
        texts: list[str] = [policy.granularity, *(["channel"] if policy.method == "uniform" else []), "tensor"]
    else:
        listed = granularities.split(",") if isinstance(granularities, str) else granularities
        texts = [text.strip() for text in listed if text.strip()]
    if not texts:
        raise InputError("allocate granularity needs at least one of tensor, channel or group:G")
    for text in texts:
        parse_granularity(text)
    return tuple(dict.fromkeys(texts))


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


def _measure(tensors: Mapping[str, torch.Tensor], policy: Policy, sensitivity: Mapping[str, float],
             granularities: tuple[str, ...]) -> _Measured:
    """Encode each quantized tensor at every candidate; size the rest once."""
    trials: dict[str, list[_Trial]] = {}
    weights: dict[str, float] = {}
    elements, fixed_bytes = 0, _FILE_OVERHEAD
    for name, tensor in tensors.items():
        elements += tensor.numel()
        decision = policy.decide(name, tensor)
        weight = tensor.numel() * sensitivity.get(name, 1.0)
        found = None if decision.encoding == "raw" else _trials(name, tensor, decision, granularities, weight)
        if found is None:
            entry, stored, _ = encode_tensor(name, tensor, decision)
            fixed_bytes += len(stored) + _entry_bytes(entry)
        else:
            trials[name], weights[name] = found, weight
    return _Measured(trials, weights, fixed_bytes, elements)


def _trials(name: str, tensor: torch.Tensor, decision: Decision, granularities: tuple[str, ...],
            weight: float) -> list[_Trial] | None:
    """One trial per (granularity, width) candidate; None if the tensor is stored raw whatever
    they are (it holds NaN or Inf). Only sizes and errors are kept, so memory stays one encode's.

    A candidate whose parameters alone would outweigh its packed indices (per-channel 256-entry
    codebooks on short rows, say) is not encoded: it costs more than twice what its indices do,
    and fitting it is the slowest trial there is. Its column repeats the previous granularity's
    trial at the same width, so every tensor keeps one column per candidate.
    """
    encoded: dict[tuple[int, str], _Trial] = {}
    found: list[_Trial] = []
    for text in granularities:
        kind, group_size = granularity_for(text, tensor)
        label = f"group:{group_size}" if group_size else kind
        rows = parameter_rows(tuple(tensor.shape), kind, group_size)
        for bits in CANDIDATE_BITS:
            if (bits, label) not in encoded:  # a fallback repeats a trial: encode it once
                heavy = rows * _PARAMS_PER_ROW[decision.encoding](bits) * 4 > tensor.numel() * bits / 8
                if heavy and len(found) >= len(CANDIDATE_BITS):
                    found.append(found[-len(CANDIDATE_BITS)])  # the previous granularity, same width
                    continue
                entry, stored, row = encode_tensor(name, tensor, replace(
                    decision, bits=bits, granularity=kind, group_size=group_size))
                if entry.encoding == "raw":
                    return None
                encoded[bits, label] = _Trial(bits, label, len(stored) + _entry_bytes(entry),
                                              (row.rel_rms or 0.0) ** 2 * weight)
            found.append(encoded[bits, label])
    return found


def _least_error(measured: _Measured, target_bpw: float) -> _Choice:
    """The least total cost with the file within ``target_bpw``."""
    budget = target_bpw * measured.elements / 8 - measured.fixed_bytes
    choice = _allocate(measured.trials, minimise=_COST, limited=_SIZE, limit=budget)
    if choice is None:
        smallest = sum(min(t.size for t in trials) for trials in measured.trials.values())
        floor = (smallest + measured.fixed_bytes) * 8 / max(measured.elements, 1)
        raise InputError(f"--target-bpw {target_bpw:g} is below what the smallest choices (1-bit indices) give here "
                         f"(about {floor:.3f} bits per weight)")
    return choice


def _least_size(measured: _Measured, max_error: float) -> _Choice:
    """The fewest bytes with the overall weighted relative RMS error within ``max_error``."""
    total_weight = sum(measured.weights.values())
    choice = _allocate(measured.trials, minimise=_SIZE, limited=_COST, limit=max_error ** 2 * total_weight)
    if choice is None:
        best = sum(min(t.cost for t in trials) for trials in measured.trials.values())
        raise InputError(f"--max-error {max_error:g} cannot be met here: even the most accurate choice "
                         f"for each tensor ({max(CANDIDATE_BITS)} bits at most) gives an error of "
                         f"{math.sqrt(best / total_weight):.4g}")
    return choice


def _allocate(trials: Mapping[str, list[_Trial]], minimise: int, limited: int, limit: float) -> _Choice | None:
    """One trial per tensor: the sum of field ``minimise`` as small as found, the sum of field
    ``limited`` within ``limit``; None if even each tensor's least ``limited`` does not fit.

    Arrays hold one row per tensor and one column per candidate (the same candidates, in the
    same order, for every tensor), so thousands of tensors are quick.
    """
    names = list(trials)
    table = np.array([[(t[minimise], t[limited]) for t in trials[name]] for name in names],
                     dtype=np.float64).reshape(len(names), -1, 2)
    objective, resource = table[..., 0], table[..., 1]
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
    # So start from both, and from each single candidate for all tensors that fits (so the
    # result is never worse than one width and granularity for all), repair and improve each greedily, and keep the best.
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
