"""Choosing the method, bits and granularity of each tensor: the least error for a file size, or
the least size for an error.

Both problems start from the same measurements: for every tensor the policy quantizes, each
width of ``CANDIDATE_BITS`` at each candidate method, granularity and span, what it costs
(stored bytes after zstd or rANS, with the padding the file puts before them, plus its header entry:
per-channel or per-group grids and codebooks pay for their size here) and what it loses
(its relative error, ``rel_rms``). They are predicted (``PREDICT``, the default) from one
histogram of the tensor per granularity (:mod:`qpack.estimate`: index counts, hence the rANS
size, and the squared error of every uniform grid; k-means codebooks fitted on the same
points), and only the chosen candidates are encoded: their real sizes and errors replace the
predictions and the problem is solved again, until every chosen candidate is one encoded
(see ``_confirmed``). With ``PREDICT`` False, or for tensors the prediction does not model
(pruning, ``exact_zero``, ``rans="never"``, k-means per row), every candidate is encoded in
full, as the exhaustive search did. Either way the plan is checked on encoded entries.

The objective (what the allocation minimises, or bounds) is, by default, a sum over layers:

    E = sum_t w_t * rel_t^2,   w_t = EDGE_WEIGHT for the first and the last quantized tensor,
                               SECOND_WEIGHT for the second (of four or more),
                               POOLED_WEIGHT for the conv before a global pool, else 1

Why per layer, not per element: a layer whose weights carry relative noise rel_t perturbs its
own output by about rel_t relative to that output, whatever its size (noise that is
independent of the input adds ||dW x|| ~ rel_t ||W x|| for random-like inputs), and the
following layers carry that relative perturbation on to the logits about unchanged, so the
output's relative error is about sqrt(sum_t rel_t^2). A 150-weight first conv at rel 0.4
hurts as much as a 48,000-weight layer at rel 0.4; summing numel * rel^2, as qpack once did,
made such small layers nearly free to ruin. The input and output layers weigh more: the
first sees the raw input (no normalisation before it, each of its few filters feeds
everything after), the last writes the logits directly, and quantizing them is what the
literature keeps at high precision for a reason. Sensitivity falls with depth from the input:
the second layer weighs twice a middle one. Measured on the zoo of bench_zoo.py
(``tests/benchmarks/bench_layer_noise.py``: Gaussian noise of one relative size in one layer at
a time, the increase of KL divergence from the fp32 outputs), the first layer was 1.2-9x as
sensitive as the median middle layer on all nine MNIST networks, and the second 1.6-3.9x on
six of the seven with four or more quantized tensors (0.8x on the Caffe LeNet; 24x on the
character transformer, whose second is its position embedding); deeper layers were at
0.1-1.3x, a ResNet's 1x1 shortcuts 2-4x; the last conv before a global average pool 0.09-0.12x
(``pooled_conv``): the pool averages its noise, different at each position, away. Its floor
is ``POOLED_FLOOR_RELIEF`` lower too. ``predicted_error`` is the weighted RMS of
the per-layer relative errors, sqrt(E / sum_t w_t); ``--max-error`` bounds it.

For a weight a BatchNorm follows (``Policy.normalized``), rel_t of one grid or codebook for
the whole tensor is counted as the BatchNorm's output sees it (``_after_norm``): such a grid
gives every channel about the same error per value, the BatchNorm scales every channel to the
same power, so a channel k times weaker than the tensor (RMS) carries k times its relative
error; rel_t is the RMS over channels of that, each capped at 1 (the channel lost). On a
ResNet reparametrised without changing its function (channels scaled by 1 to 1/20, BatchNorm
statistics compensated) --target-bpw 4 lost 0.13 points counting values, 0.03 counting
channels. Grids per channel follow each channel's scale and are counted as measured.

With ``sensitivity`` (from :func:`qpack.measure_sensitivity`: measured on data), the weight
of a tensor is instead numel * s_t, its Fisher estimate of the loss increase per unit rel^2.

A quality floor (``Policy.min_snr_db``, 13 dB by default, i.e. rel <= 0.22) keeps every
quantized tensor usable: a candidate below it is not chosen, unless the policy allows it
(``allow_below_floor``) or no candidate of that tensor reaches it. A target that cannot be met
above the floor is refused, naming the smallest one that can.

The budget of ``--target-bpw`` counts the file as the writer writes it: the header (built by
the writer's own functions, with the metadata the file will hold), alignment, and the
lossless tensors' payloads; what is left goes to the quantized tensors. The plan's size is
checked against the budget exactly before anything is written.

Each problem is solved the same way: a Lagrangian price trades the limited quantity (bytes,
or error) against the one minimised, and is raised until the limit holds; then greedy steps
use up what one price for all tensors leaves unspent, starting also from every fixed setting
(one candidate for every tensor) that fits, so the result is never worse, by the objective,
than any plain ``-b B`` (and ``-m``, ``-g``) setting among the candidates (see ``_allocate``).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from numbers import Real
from typing import Any, NamedTuple

import numpy as np
import torch

from . import estimate
from .codecs import uniform
from .dtypes import name_of_dtype
from .encoder import UNIQUE_LIMIT, count_distinct, encode_tensor
from .errors import InputError
from .format import TensorEntry, expected_raw_length, layout_offsets, parameter_rows, payload_span
from .parallel import map_all, trial_workers
from .policy import Decision, Policy, granularity_for, parse_granularity
from .writer import planned_file_bytes

__all__ = ["CANDIDATE_BITS", "EDGE_WEIGHT", "SECOND_WEIGHT", "POOLED_WEIGHT", "Allocation", "Choice", "allocate", "plan",
           "candidate_granularities", "describe_floors", "layer_weights", "pooled_conv"]

#: widths tried for each tensor
CANDIDATE_BITS = (1, 2, 3, 4, 5, 6, 7, 8)
#: spans tried for uniform grids (``Decision.span``), at the widths of ``SPAN_BITS``: a grid
#: wider than its values by 2^(1/4), 2^(1/2) and 2^(3/4) has the steps between two widths'
#: (quarter-bit steps of entropy-coded size, about 1.5 dB of SNR each), where one width to the
#: next moves 6 dB; a tensor that holds most of a model's weights has then more than two
#: sizes near the target to choose from. At 8 bits they give the sizes between 7 and 8: without
#: them pytorch/examples' MNIST network (98 % of its weights in one layer) stopped at 4.80 bits
#: per weight for --target-bpw 5 (4.996 with them)
SPANS = (1.0, 2 ** 0.25, 2 ** 0.5, 2 ** 0.75)
SPAN_BITS = frozenset({3, 4, 5, 6, 7, 8})
#: weight of the first and the last quantized tensor (input and output layers) in the objective
EDGE_WEIGHT = 4.0
#: weight of the second quantized tensor, where there are at least four (with three, the one
#: between the edges is the middle layer all others are measured against)
SECOND_WEIGHT = 2.0
#: weight of the last convolution when it feeds a global average pool (see ``pooled_conv``):
#: its noise, different at every position of its output, is averaged away by the pool, while
#: the features it computes are not. Measured (bench_layer_noise.py, Gaussian noise, per unit
#: rel^2, over the median middle layer): 0.09 and 0.11 on two small BN CNNs, 0.10 on a ResNet,
#: 0.12 on a MobileNet, every time the least sensitive layer of its network; with weight 1 the
#: allocation gave it as many bits as the conv before it, 3-13x as sensitive. 0.25 keeps a
#: margin of 2-3x
POOLED_WEIGHT = 0.25
#: kernels of at most this many positions count as a pooled conv (``pooled_conv``); a larger
#: kernel on the last feature map, LeNet-5's 5x5 c5 on a 5x5 map, computes a single position
#: that no pool averages
POOLED_KERNEL = 9
#: dB below the quality floor that the pooled conv may go
POOLED_FLOOR_RELIEF = 3.0
#: tensors under this many elements are encoded at every candidate rather than predicted: it
#: costs little, and the estimate's k-means codebooks, fitted by Lloyd's algorithm from one
#: start, come out worse than the encoder's on few points (on the zoo's checkpoints, with
#: every k-means column at 3-6 bits compared: median 0.7 % above the encoded error, at most
#: 22 %, the 500-weight first conv of the Caffe LeNet at 6 bits), which are the first
#: layers the objective weighs most
ENCODE_BELOW = 1 << 12
#: the share of a channel grid's rows given an exact 0 level (``codecs.uniform.zero_heavy_rows``)
#: from which its columns are encoded in full rather than predicted (see ``_zero_heavy_grids``)
ZERO_HEAVY_ROW_SHARE = 0.01
#: float32 parameters per parameter set of each method, at a width (a codebook may be shorter)
_PARAMS_PER_ROW = {"uniform": lambda bits: 2, "kmeans": lambda bits: 1 << bits}
#: a predicted error as long as any the options record can hold (for the budget's upper bound)
_LONGEST_ERROR = 1.2345678901234567e-100
#: bytes per quantized tensor the header's integers may differ by between estimate and plan
_INT_SLACK = 8
#: True: each candidate's size and error are predicted from statistics of the tensor
#: (qpack.estimate) and only the chosen candidates are encoded; False: every candidate is
#: encoded in full (the exhaustive search, which the tests compare the prediction with)
PREDICT = True
#: payload bytes of the chosen candidates' encodings kept for the pack to write as they are
#: (beyond this, the pack encodes them again)
KEEP_BYTES = 1 << 28
#: rounds of encoding the chosen candidates and solving again before the plan is made from the
#: encoded candidates alone (or, if they admit none, every candidate is encoded)
_CONFIRM_ROUNDS = 8
#: then each tensor's candidates within this share of its chosen one's size are encoded
_NEAR_SIZE = 0.15
#: a plan's fixed bytes this far below the estimate it was planned with are planned again
_FIXED_OVERESTIMATE = 256


class Choice(NamedTuple):
    """What the allocation chose for one tensor."""

    bits: int
    granularity: str  # "tensor", "channel" or "group:G", as ``Policy.granularity`` takes it
    method: str = "uniform"
    span: float = 1.0  # a uniform grid's span over its values' range (``Decision.span``)


class _Trial(NamedTuple):
    """One tensor encoded at one width, method and granularity."""

    bits: int
    granularity: str
    size: int  # bytes in the file: payload (padding included) and header entry
    cost: float  # the objective's term: weight * rel_rms^2
    method: str = "uniform"
    snr_db: float = math.inf  # -20 log10(rel_rms)
    entry: TensorEntry | None = None  # header entry, length and crc32 filled (for the exact plan)
    span: float = 1.0
    exact: bool = True  # encoded in full (else predicted: size and error are estimates, entry a sketch or None)


@dataclass
class _Measured:
    """What the trials found for a whole state dict."""

    #: quantized tensor -> its trials, one per (candidate, width) in the same order for every
    #: tensor (a candidate a tensor cannot take repeats what it falls back to)
    trials: dict[str, list[_Trial]]
    weights: dict[str, float]  # quantized tensor -> its weight in the objective
    entries: list[TensorEntry | str]  # file order: a lossless tensor's entry, or a quantized tensor's name
    elements: int  # elements of all tensors, raw ones included
    #: what encodes a predicted tensor's columns: its tensors, decisions and each column's setting
    tensors: Mapping[str, torch.Tensor] = field(default_factory=dict)
    decisions: dict[str, Decision] = field(default_factory=dict)
    settings: dict[str, list[_Setting]] = field(default_factory=dict)
    #: quantized tensor -> its count of distinct values, once counted (for the encoder's stats)
    distinct: dict[str, int | None] = field(default_factory=dict)
    #: encodes done to confirm predictions
    confirmed: int = 0
    #: the last solution's columns were all encoded (a next solve needs few confirmations)
    settled: bool = False
    #: quantized tensor -> setting -> (decision, entry, payload, report row) of confirmations
    kept: dict[str, dict[_Setting, Any]] = field(default_factory=dict)
    kept_bytes: int = 0
    #: quantized tensor -> its element count (the order confirmations are started in)
    sizes: dict[str, int] = field(default_factory=dict)
    #: quantized tensor -> dB its quality floor lies below the policy's (``POOLED_FLOOR_RELIEF``)
    floor_relief: dict[str, float] = field(default_factory=dict)
    #: weight followed by a BatchNorm -> its channels' mean square over each one's (``_after_norm``)
    row_ratios: dict[str, np.ndarray] = field(default_factory=dict)

    def own_floors(self, floor: float | None) -> dict[str, float]:
        """The tensors whose floor differs from ``floor``, with theirs (none without a floor)."""
        return {} if floor is None else {name: floor - relief for name, relief in self.floor_relief.items()}

    def confirm(self, columns: Mapping[str, int]) -> bool:
        """Encode the given columns where they are predicted, and put what they really cost
        in their place (and in every column of the same setting). True if any was predicted."""
        todo = [(name, column) for name, column in columns.items() if not self.trials[name][column].exact]
        if not todo:
            return False

        def encode(item: tuple[str, int]) -> tuple[tuple[_Trial, float] | None, list[Any]]:
            name, column = item
            tensor = self.tensors[name]
            if name not in self.distinct:
                self.distinct[name] = count_distinct(tensor) if tensor.numel() <= UNIQUE_LIMIT else None
            keep: list[Any] = []
            return _encoded(name, tensor, self.decisions[name], self.settings[name][column], self.distinct[name],
                            keep), keep

        results = map_all(encode, todo, trial_workers(4), lambda item: self.sizes.get(item[0], 0))
        for (name, column), (done, keep) in zip(todo, results):
            assert done is not None, "a predicted tensor is finite"
            trial, rel = _after_norm(done, self.settings[name][column], self.row_ratios.get(name))
            if self.kept_bytes + len(keep[0][2]) <= KEEP_BYTES:  # for the pack to write as it is
                self.kept.setdefault(name, {})[self.settings[name][column]] = keep[0]
                self.kept_bytes += len(keep[0][2])
            trial = trial._replace(cost=rel * rel * self.weights[name])
            setting = self.settings[name][column]
            row = self.trials[name]
            for j, other in enumerate(self.settings[name]):
                if other == setting:
                    row[j] = trial
            self.confirmed += 1
        return True

    def confirm_near(self, columns: Mapping[str, int], share: float) -> None:
        """Encode, in each tensor, the predicted columns within ``share`` of the size of the one
        ``columns`` gives it."""
        near: dict[str, list[int]] = {}
        for name, column in columns.items():
            size = self.trials[name][column].size
            near[name] = [j for j, t in enumerate(self.trials[name]) if not t.exact and abs(t.size - size) <= share * size]
        for k in range(max(map(len, near.values()), default=0)):  # confirm takes a column per tensor
            self.confirm({name: js[k] for name, js in near.items() if k < len(js)})

    def confirm_all(self) -> None:
        """Encode every predicted column (the exhaustive search, for the tensors predicted)."""
        for name, row in self.trials.items():
            for column in range(len(row)):
                self.confirm({name: column})


@dataclass(frozen=True)
class Allocation:
    """An allocation's choice and what it predicts (``info`` and ``--json`` show the summary)."""

    choices: dict[str, Choice]
    #: weighted RMS of the quantized tensors' relative errors (the objective, see the module doc)
    predicted_error: float
    #: the quality floor applied, in dB SNR per quantized tensor (None: no floor)
    min_snr_db: float | None
    #: the lowest SNR among the chosen candidates
    lowest_snr_db: float | None
    #: tensors below the floor (allowed by the policy, or with no candidate above it)
    below_floor: tuple[str, ...]
    #: the file's planned size, as the writer will write it
    file_bytes: int
    #: bytes that no choice changes: header framing, metadata, lossless tensors, alignment
    fixed_bytes: int
    #: bytes of the quantized tensors: payloads (padding included) and their header entries
    quantized_bytes: int
    #: the target's file size in bytes (None with ``max_error``)
    budget_bytes: int | None = None
    #: "per-layer" (the default objective) or "sensitivity" (weights measured on data)
    objective: str = "per-layer"
    #: tensors whose own floor is below ``min_snr_db`` (the pooled conv: ``POOLED_FLOOR_RELIEF``), dB
    tensor_floors: Mapping[str, float] = field(default_factory=dict)
    #: tensor -> (decision, entry, payload, report row): chosen candidates encoded while
    #: planning, which :func:`qpack.pack` writes as they are when its decision is the same
    encoded: Mapping[str, tuple[Decision, TensorEntry, Any, Any]] = field(default_factory=dict, repr=False,
                                                                          compare=False)

    def summary(self) -> dict[str, Any]:
        """The numbers worth recording in the file (JSON-ready, rounded so bytes stay stable)."""
        # short: the file pays for it (the lowest SNR and who is below the floor are in the entries)
        own = {"tensor_floors": dict(self.tensor_floors)} if self.tensor_floors else {}
        return {"objective": self.objective, "min_snr_db": self.min_snr_db,
                "predicted_error": _round(self.predicted_error), **own}


def _round(value: float) -> float:
    return float(f"{value:.4g}") if math.isfinite(value) else value


def allocate(tensors: Mapping[str, torch.Tensor], policy: Policy, target_bpw: float | None = None,
             sensitivity: Mapping[str, float] | None = None, *, max_error: float | None = None,
             granularities: str | Iterable[str] | None = None) -> dict[str, Choice]:
    """Bits, granularity and method for each tensor the policy quantizes: :func:`plan`'s choices."""
    return plan(tensors, policy, target_bpw, sensitivity, max_error=max_error, granularities=granularities).choices


def plan(tensors: Mapping[str, torch.Tensor], policy: Policy, target_bpw: float | None = None,
         sensitivity: Mapping[str, float] | None = None, *, max_error: float | None = None,
         granularities: str | Iterable[str] | None = None,
         metadata: Callable[[dict[str, Any]], Mapping[str, str]] | None = None) -> Allocation:
    """Bits (from ``CANDIDATE_BITS``), granularity and method for each tensor the policy quantizes.

    Give exactly one of ``target_bpw`` (the least error within a file size) and ``max_error``
    (the smallest file within an error bound). The objective and the quality floor are in
    the module's docstring.

    Args:
        tensors: the state dict (read twice: once here, once when packing), in file order.
        policy: the packing policy; its method, pruning and quality floor (``min_snr_db``,
            ``allow_below_floor``) are kept.
        target_bpw: file bytes * 8 / all elements of all tensors, at most.
        sensitivity: optional ``{name: weight}`` from :func:`qpack.measure_sensitivity`: the
            objective then weighs a tensor's rel^2 by numel * weight (1 for names it lacks)
            instead of per layer.
        max_error: bound on ``predicted_error``, the weighted RMS of the quantized tensors'
            relative errors: ``sqrt(sum_t w_t rel_t^2 / sum_t w_t)`` with ``w_t`` the
            objective's weights. Tensors stored losslessly are left out.
        granularities: the candidate granularities, e.g. ``("tensor", "channel", "group:64")``
            or ``"tensor,channel,group:64"``; see :func:`candidate_granularities`.
        metadata: ``summary -> metadata`` the file will hold, given :meth:`Allocation.summary`;
            the budget counts its bytes. None: no metadata.

    Returns:
        The :class:`Allocation`.

    Raises:
        InputError: both or neither limit given, a limit that is not a positive finite
            number, a bad sensitivity or granularity, no tensor to quantize, a limit no choice
            meets, or a target met only below the quality floor (the message names the
            smallest target that is met above it).
    """
    if (target_bpw is None) == (max_error is None):
        raise InputError("give exactly one of target_bpw (--target-bpw) and max_error (--max-error)")
    if target_bpw is not None:
        target_bpw = _positive(target_bpw, "target bits per weight")
    else:
        max_error = _positive(max_error, "max error")
    what = f"--target-bpw {target_bpw:g}" if target_bpw is not None else f"--max-error {max_error:g}"
    candidates = candidate_granularities(policy, granularities)
    checked = None if sensitivity is None else _check_sensitivity(sensitivity, tensors)
    measured = _measure(tensors, policy, checked, candidates)
    if not measured.trials:
        raise InputError(f"{what}: no tensor here can be quantized (integer, 1-D, small, excluded or "
                         "non-finite tensors are stored losslessly); pack without it for a lossless file")
    floor = None if policy.min_snr_db is None or policy.allow_below_floor else policy.min_snr_db
    meta = metadata or (lambda summary: {})
    planner = _Planner(measured, meta)
    if target_bpw is not None:
        columns = _least_error(measured, planner, target_bpw, floor, policy)
    else:
        columns = _least_size(measured, floor, max_error)
    result = planner.allocation(columns, policy.min_snr_db, sensitivity is not None,
                                None if target_bpw is None else int(target_bpw * measured.elements / 8))
    kept = {name: measured.kept[name][measured.settings[name][column]] for name, column in columns.items()
            if name in measured.kept and measured.settings[name][column] in measured.kept[name]}
    return replace(result, encoded=kept)


def pooled_conv(shapes: Mapping[str, Sequence[int]]) -> str | None:
    """The quantized tensor (``{name: shape}`` in file order) that is the last convolution
    before a global average pool, or None: the last 4-D weight, not the first tensor, with a
    kernel of at most ``POOLED_KERNEL`` positions, whose output channels are the input
    features of the 2-D weight right after it (a pooled head: ResNets, MobileNets, small BN
    CNNs; a flattened head has channels x positions inputs), and not a residual block's 1x1
    shortcut."""
    names = list(shapes)
    convs = [i for i, name in enumerate(names) if len(shapes[name]) == 4]
    if not convs or convs[-1] in (0, len(names) - 1):
        return None
    conv, head = shapes[names[convs[-1]]], shapes[names[convs[-1] + 1]]
    pooled = len(head) == 2 and head[1] == conv[0] and conv[2] * conv[3] <= POOLED_KERNEL
    # a ResNet whose last block downsamples ends on its 1x1 shortcut, which maps the same
    # channels as the block's first 3x3 conv; shortcuts are 2-4x a middle layer, not a pooled conv
    shortcut = conv[2] * conv[3] == 1 and any(
        tuple(shapes[names[i]][:2]) == tuple(conv[:2]) and shapes[names[i]][2] * shapes[names[i]][3] > 1
        for i in convs[-4:-1])
    return names[convs[-1]] if pooled and not shortcut else None


def describe_floors(tensor_floors: Mapping[str, float]) -> str:
    """The tensors' own floors (``Allocation.tensor_floors``) as a parenthesis after the floor."""
    return "".join(f" ({floor:g} dB for {name}, the conv before global pooling)" for name, floor in tensor_floors.items())


def layer_weights(shapes: Mapping[str, Sequence[int] | int], sensitivity: Mapping[str, float] | None = None
                  ) -> dict[str, float]:
    """The objective's weight of each quantized tensor (``{name: shape}`` in file order; a bare
    element count, as this function once took, is a 1-D shape).

    Per layer: 1 each, ``EDGE_WEIGHT`` for the first and the last, ``SECOND_WEIGHT`` for the
    second where there are four or more, ``POOLED_WEIGHT`` for the convolution that feeds a
    global average pool (``pooled_conv``). With ``sensitivity``: numel * its weight (1 for
    names it lacks).
    """
    shapes = {name: (shape,) if isinstance(shape, int) else tuple(shape) for name, shape in shapes.items()}
    if sensitivity is not None:
        return {name: math.prod(shape) * sensitivity.get(name, 1.0) for name, shape in shapes.items()}
    weights = dict.fromkeys(shapes, 1.0)
    if weights:
        names = list(weights)
        if len(names) >= 4:
            weights[names[1]] = SECOND_WEIGHT
        if (pooled := pooled_conv(shapes)) is not None:
            weights[pooled] = POOLED_WEIGHT
        weights[names[0]] = weights[names[-1]] = EDGE_WEIGHT
    return weights


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


def _check_sensitivity(sensitivity: Mapping[str, float], tensors: Mapping[str, torch.Tensor]) -> dict[str, float]:
    weights = dict(sensitivity)
    unknown = sorted(set(weights) - set(tensors))
    if unknown:  # most likely a prefix mismatch ("module."), which would silently weigh nothing
        raise InputError(f"sensitivity names {len(unknown)} tensor(s) the checkpoint lacks, "
                         f"e.g. {unknown[0]!r}")
    for name, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, Real) or not math.isfinite(weight) or weight < 0:
            raise InputError(f"sensitivity of {name!r} must be a finite number >= 0, got {weight!r}")
    return {name: float(weight) for name, weight in weights.items()}


def _entry_bytes(entry: TensorEntry) -> int:
    """What a candidate adds to the header: its parameters (min/max or codebooks, per tensor,
    channel or group). The rest of an entry is the same for every candidate and, in a
    compressed version-3 header, far smaller than its msgpack size alone; the planner counts
    it, exactly, among the fixed bytes."""
    return sum(len(value) for value in entry.params.values() if isinstance(value, (bytes, bytearray)))


def _measure(tensors: Mapping[str, torch.Tensor], policy: Policy, sensitivity: Mapping[str, float] | None,
             granularities: tuple[str, ...]) -> _Measured:
    """Measure each quantized tensor at every candidate (predicted, or with ``PREDICT`` False
    or where the prediction does not apply, encoded in full); encode the rest once.
    Tensors are measured on a few threads (qpack.parallel), all queued at once so that a large
    one does not hold the others back; each is read when its turn comes."""
    candidates = _candidates(policy, granularities)

    def scoped(name: str) -> bool:  # a BatchNorm follows this >= 2-D weight (Policy.normalized)
        return policy.channel_spread is not None and tensors[name].dim() >= 2 and (
            policy.normalized is None or name in policy.normalized)

    def measure(name: str) -> tuple[str, int, TensorEntry | tuple[Decision, list[Any], list[_Setting]]]:
        tensor = tensors[name]
        decision = policy.decide(name, tensor)
        found = None
        if decision.encoding != "raw":
            columns = _columns(tensor, candidates, _channel_widths(policy, name, tensor))
            found = _predicted(name, tensor, decision, candidates, columns) if PREDICT else None
            if found is None:
                found = _trials(name, tensor, decision, candidates, columns)
        if found is None:
            entry, stored, _ = encode_tensor(name, tensor, decision)
            entry.length, entry.crc32 = len(stored), zlib.crc32(stored)
            return name, tensor.numel(), entry
        ratios = _row_ratios(tensor) if scoped(name) else None
        found = [_after_norm(done, setting, ratios) for done, setting in zip(found, columns)]
        return name, tensor.numel(), (decision, found, columns, ratios)

    trials: dict[str, list[_Trial]] = {}
    rel: dict[str, list[float]] = {}
    entries: list[TensorEntry | str] = []
    decisions: dict[str, Decision] = {}
    settings: dict[str, list[_Setting]] = {}
    sizes: dict[str, int] = {}
    shapes: dict[str, tuple[int, ...]] = {}
    row_ratios: dict[str, np.ndarray] = {}
    elements = 0
    for name, numel, done in map_all(measure, list(tensors), trial_workers(4)):
        elements += numel
        if isinstance(done, TensorEntry):
            entries.append(done)
            continue
        decision, found, columns, ratios = done
        if ratios is not None:
            row_ratios[name] = ratios
        trials[name], rel[name] = [t for t, _ in found], [r for _, r in found]
        entries.append(name)
        sizes[name], shapes[name] = numel, tuple(tensors[name].shape)
        if not all(t.exact for t in trials[name]):
            decisions[name], settings[name] = decision, columns
    weights = layer_weights(shapes, sensitivity)
    for name, row in trials.items():
        trials[name] = [t._replace(cost=r * r * weights[name]) for t, r in zip(row, rel[name])]
    pooled = pooled_conv(shapes) if sensitivity is None else None
    relief = {} if pooled is None else {pooled: POOLED_FLOOR_RELIEF}
    return _Measured(trials, weights, entries, elements, tensors, decisions, settings, settled=not settings,
                     sizes=sizes, floor_relief=relief, row_ratios=row_ratios)


def _row_ratios(tensor: torch.Tensor) -> np.ndarray:
    """The tensor's mean square over each channel's (Inf for a channel of zeros)."""
    squares = tensor.reshape(tensor.shape[0], -1).double().square().mean(1).numpy()
    with np.errstate(divide="ignore"):
        return squares.mean() / squares


def _after_norm(done: tuple[_Trial, float], setting: _Setting, ratios: np.ndarray | None) -> tuple[_Trial, float]:
    """A trial's relative error as a BatchNorm after the weight makes it: one grid (or codebook)
    for the tensor gives each channel about the same error per value, which is the channel's
    relative error times its RMS over the tensor's, and the BatchNorm scales every channel to
    the same power; the layer's output then carries the mean over channels of their relative
    errors squared (each capped at 1, the channel lost). Grids per channel or group follow
    each channel's scale, so their error stays as measured."""
    trial, rel = done
    if ratios is None or setting[3] != "tensor" or rel == 0:
        return done
    rel = float(np.sqrt(np.minimum(1.0, rel * rel * ratios).mean()))
    return trial._replace(snr_db=-20 * math.log10(rel) if rel > 0 else math.inf), rel


def _candidates(policy: Policy, granularities: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    """(method, granularity) pairs tried: the policy's method at each granularity, and for a
    uniform policy also a k-means codebook per tensor, so that every fixed ``-b B``,
    ``-b B -m kmeans`` setting is among the whole-model choices the solver starts from."""
    pairs = [(policy.method, text) for text in granularities]
    if policy.method == "uniform":
        pairs.append(("kmeans", "tensor"))
    return tuple(dict.fromkeys(pairs))


def _settings(method: str) -> list[tuple[int, float]]:
    """(width, span) pairs tried for one method, in the same order for every tensor."""
    return [(bits, span) for bits in CANDIDATE_BITS
            for span in (SPANS if method == "uniform" and bits in SPAN_BITS else (1.0,))]


#: (method, bits, span, granularity kind, group size): what one column of a tensor encodes
_Setting = tuple[str, int, float, str, int]


def _channel_widths(policy: Policy, name: str, tensor: torch.Tensor) -> frozenset[int]:
    """The widths at which this weight needs a grid per channel (``Policy.spread_of``: a
    BatchNorm follows it and some channel is far weaker than the rest). The objective counts
    the tensor's error over all its values, where a weak channel's share is small; the
    BatchNorm gives that channel's relative error to its output in full."""
    return frozenset(bits for bits in CANDIDATE_BITS if policy.spread_of(name, tensor, bits) is not None)


def _columns(tensor: torch.Tensor, candidates: tuple[tuple[str, str], ...],
             channel_widths: frozenset[int] = frozenset()) -> list[_Setting]:
    """What each column (candidate, width, span) of this tensor encodes.

    At ``channel_widths``, a column of one grid or codebook for the tensor is a uniform grid
    per channel instead (at the same span).

    A candidate whose parameters alone would outweigh its packed indices (per-channel 256-entry
    codebooks on short rows, say) is not tried: it costs more than twice what its indices do,
    and fitting it is the slowest trial there is. Its column repeats the same method's
    setting with one parameter set for the tensor (or, if that is the heavy one, the first
    candidate's at the same width), so every tensor keeps the same columns.
    """
    columns = []
    for method, text in candidates:
        kind, group_size = granularity_for(text, tensor)
        rows = parameter_rows(tuple(tensor.shape), kind, group_size)
        for bits, span in _settings(method):
            if rows * _PARAMS_PER_ROW[method](bits) * 4 <= tensor.numel() * bits / 8:
                setting = (method, bits, span, kind, group_size)
            elif rows > 1:  # the same method with one parameter set
                setting = (method, bits, span, "tensor", 0)
            else:  # the first candidate's setting at this width
                first, first_text = candidates[0]
                setting = (first, bits, 1.0, *granularity_for(first_text, tensor))
            if setting[3] == "tensor" and bits in channel_widths:
                setting = ("uniform", bits, setting[2], "channel", 0)
            columns.append(setting)
    return columns


def _encoded(name: str, tensor: torch.Tensor, decision: Decision, setting: _Setting,
             distinct: int | None, keep: list[Any] | None = None) -> tuple[_Trial, float] | None:
    """One setting encoded in full: (trial, rel_rms), or None if the tensor is stored raw (NaN
    or Inf). With ``keep``, (decision, entry, payload, report row) is appended to it."""
    method, bits, span, kind, group_size = setting
    decision = replace(decision, encoding=method, bits=bits, granularity=kind, group_size=group_size, span=span)
    entry, stored, row = encode_tensor(name, tensor, decision, distinct=distinct)
    if entry.encoding == "raw":
        return None
    entry.length, entry.crc32 = len(stored), zlib.crc32(stored)
    rel = row.rel_rms or 0.0
    snr = -20 * math.log10(rel) if rel > 0 else math.inf
    label = f"group:{group_size}" if group_size else kind
    if keep is not None:
        keep.append((decision, replace(entry), stored, row))
    return _Trial(bits, label, payload_span(len(stored)) + _entry_bytes(entry), 0.0, method, snr, entry, span), rel


def _trials(name: str, tensor: torch.Tensor, decision: Decision, candidates: tuple[tuple[str, str], ...],
            columns: list[_Setting] | None = None) -> list[tuple[_Trial, float]] | None:
    """(trial, rel_rms) per (candidate, width, span), each encoded in full; None if the tensor
    is stored raw whatever they are (it holds NaN or Inf). Payloads are not kept, so memory
    stays one encode's."""
    encoded: dict[_Setting, tuple[_Trial, float] | None] = {}
    distinct = count_distinct(tensor) if tensor.numel() <= UNIQUE_LIMIT else None  # the same for every trial
    found: list[tuple[_Trial, float]] = []
    for setting in _columns(tensor, candidates) if columns is None else columns:
        if setting not in encoded:  # a fallback repeats a trial: encode it once
            encoded[setting] = _encoded(name, tensor, decision, setting, distinct)
        done = encoded[setting]
        if done is None:
            return None
        found.append(done)
    return found


def _predictable(tensor: torch.Tensor, decision: Decision, candidates: tuple[tuple[str, str], ...]) -> bool:
    """Whether :mod:`qpack.estimate` models this tensor's candidates: grids and codebooks
    fitted to the values as they are (no pruning, no forced zero level), rANS allowed, and
    k-means only per tensor; and finite values. (Uniform grids the encoder may give an exact
    0 level are encoded in full column by column: see :func:`_zero_heavy_grids`.) Tensors
    under ``ENCODE_BELOW`` elements are encoded in full too."""
    return not (decision.prune or decision.exact_zero or decision.rans == "never"
                or tensor.numel() < ENCODE_BELOW
                or any(method == "kmeans" and text != "tensor" for method, text in candidates)
                or not bool(torch.isfinite(tensor.amin()) and torch.isfinite(tensor.amax())))


def _zero_heavy_grids(tensor: torch.Tensor, rows: int, group_size: int) -> bool:
    """Whether so many values lie near 0 that the encoder gives this granularity's uniform grids
    an exact 0 level even at 5 bits (``codecs.uniform.ZERO_HEAVY``: sparse or L1-trained
    weights, or rows of very different scales under one grid). The estimate does not model
    such grids (each row's grid shifts by its own fraction of a step, which one histogram of
    all rows cannot follow), so their columns are encoded in full; k-means columns, which
    the rule does not touch, are predicted still. Dense weights may pass the test at 2-4
    bits only, where the estimate then over-predicts the error; a chosen candidate is
    confirmed by a full encode."""
    params = uniform.choose_params(tensor, 5, rows, group_size or None)
    if uniform.zero_heavy(tensor, params, 5, rows, group_size or None):
        return True
    # channel grids (float32 parameters) also give an exact 0 to each row that is zero-heavy
    # on its own (the live rows of an L1-trained layer); a few such rows (rows with one
    # outlier in a big embedding: 6 of 12,288 in bench_formats' synthetic model) move the
    # tensor's size and error by less than their share, which the confirming encode measures
    return rows > 1 and not group_size and (
        int(uniform.zero_heavy_rows(tensor, params, 5, rows, None).sum()) >= ZERO_HEAVY_ROW_SHARE * rows)


def _predicted(name: str, tensor: torch.Tensor, decision: Decision, candidates: tuple[tuple[str, str], ...],
               columns: list[_Setting] | None = None) -> list[tuple[_Trial, float]] | None:
    """(trial, rel_rms) per column, predicted by :mod:`qpack.estimate` (``exact`` False);
    None where the prediction does not apply (the caller then encodes every candidate)."""
    if not _predictable(tensor, decision, candidates):
        return None
    columns = _columns(tensor, candidates) if columns is None else columns
    numel, shape = tensor.numel(), tuple(tensor.shape)
    found: dict[_Setting, tuple[_Trial, float]] = {}
    groups: dict[tuple[str, str, int], list[_Setting]] = {}
    for setting in dict.fromkeys(columns):
        groups.setdefault((setting[0], setting[3], setting[4]), []).append(setting)
    measured: dict[tuple[str, int, bool], estimate.Statistics | None] = {}  # one histogram per granularity
    distinct: int | None | bool = False  # count_distinct's, once, if a column is encoded
    for (method, kind, group_size), settings in groups.items():
        rows = parameter_rows(shape, kind, group_size)
        if method == "uniform" and _zero_heavy_grids(tensor, rows, group_size):
            if distinct is False:
                distinct = count_distinct(tensor) if numel <= UNIQUE_LIMIT else None
            for setting in settings:
                done = _encoded(name, tensor, decision, setting, distinct)
                if done is None:
                    return None
                found[setting] = done
            continue
        limit = estimate.KMEANS_EXACT_LIMIT if method == "kmeans" else estimate.EXACT_LIMIT
        exact = numel <= limit
        if (kind, group_size, exact) not in measured:
            measured[kind, group_size, exact] = estimate.statistics(tensor, rows, group_size or None, limit)
        stats = measured[kind, group_size, exact]
        if stats is None or stats.u.size == 0:
            return None
        widths = [bits for _, bits, _, _, _ in settings]
        per_row = _PARAM_BYTES[decision.param_dtype]
        if method == "uniform":
            counts, error = estimate.uniform(stats, [(bits, span) for _, bits, span, _, _ in settings])
            params = [rows * per_row(method, 2) + _BASE_BYTES[decision.param_dtype]] * len(settings)
        else:
            counts, error, books = estimate.kmeans(stats, widths)
            params = [rows * per_row(method, int(k)) for k in books]
        sizes = estimate.stored_sizes(numel, widths, counts, decision.rans)
        label = f"group:{group_size}" if group_size else kind
        for setting, size, param_bytes, rel in zip(settings, sizes, params, estimate.relative_error(stats, error)):
            snr = -20 * math.log10(rel) if rel > 0 else math.inf
            trial = _Trial(setting[1], label, int(size) + param_bytes, 0.0, method, snr, None, setting[2], exact=False)
            found[setting] = (trial, rel)
            if setting == columns[0]:
                # the planner counts the header from entries: the first column gets a sketch of one
                found[setting] = (trial._replace(entry=_sketch(name, tensor, decision, setting, trial, int(size),
                                                               param_bytes)), rel)
    return [found[setting] for setting in columns]


#: bytes of a parameter set's values per stored element type: (method, values per row) -> bytes
_PARAM_BYTES: dict[str, Callable[[str, int], int]] = {
    "float32": lambda method, count: 4 * count, "float16": lambda method, count: 2 * count,
    "uint8": lambda method, count: count if method == "uniform" else 2 * count}
#: bytes per tensor besides the rows' parameters (the uint8 codes' float32 base)
_BASE_BYTES = {"float32": 0, "float16": 0, "uint8": 16}


def _sketch(name: str, tensor: torch.Tensor, decision: Decision, setting: _Setting, trial: _Trial,
            payload: int, param_bytes: int) -> TensorEntry:
    """A header entry like the one encoding ``setting`` would give, for the planner's estimate
    of the header (its parameter bytes as incompressible as float values, seeded by the name)."""
    method, bits, _, kind, group_size = setting
    dtype = name_of_dtype(tensor.dtype) or "float32"
    noise = np.random.default_rng(zlib.crc32(name.encode())).bytes(param_bytes)
    params: dict[str, Any] = ({"min": noise[:param_bytes // 2], "max": noise[param_bytes // 2:]} if method == "uniform"
                              else {"codebook": noise, "codebook_size": max(1, param_bytes // 4)})
    entry = TensorEntry(name, dtype, tuple(tensor.shape), method, bits, kind, params, compression="rans",
                        raw_length=expected_raw_length(dtype, tuple(tensor.shape), method, bits), width=bits,
                        group_size=group_size, param_dtype="float32" if decision.param_dtype == "uint8"
                        else decision.param_dtype)
    entry.length, entry.crc32 = payload, 0xFFFFFFFF
    entry.stats = {"unique_after": 1 << bits, "rel_rms": float(f"{10 ** (-trial.snr_db / 20):.4g}")
                   if math.isfinite(trial.snr_db) else 0.0, "snr_db": round(trial.snr_db, 2)
                   if math.isfinite(trial.snr_db) else 0.0}
    return entry


def _apply_floor(trials: Mapping[str, list[_Trial]], floor: float | None,
                 own: Mapping[str, float]) -> dict[str, list[bool]]:
    """Which candidates the floor allows: those at or above it (or a tensor's ``own`` floor),
    and each tensor's most accurate."""
    allowed = {}
    for name, row in trials.items():
        best = max(t.snr_db for t in row)
        limit = None if floor is None else own.get(name, floor)
        allowed[name] = [limit is None or t.snr_db >= limit or t.snr_db == best for t in row]
    return allowed


def _masked(measured: _Measured, allowed: Mapping[str, list[bool]]) -> dict[str, list[_Trial]]:
    """The trials, with those not allowed made infinitely large and bad (never chosen)."""
    return {name: [t if ok else t._replace(size=math.inf, cost=math.inf) for t, ok in zip(row, allowed[name])]
            for name, row in measured.trials.items()}


class _Planner:
    """The file a choice gives, as the writer will write it: header from the writer's own
    functions with the file's metadata, payloads laid out as the file lays them out."""

    def __init__(self, measured: _Measured, metadata: Callable[[dict[str, Any]], Mapping[str, str]]) -> None:
        self.measured, self.metadata = measured, metadata
        # what no choice changes: the whole planned file less the quantized tensors' own bytes
        self.fixed = self.fixed_for({name: 0 for name in measured.trials})

    def fixed_for(self, columns: Mapping[str, int]) -> int:
        """The planned file of these columns, with the longest summary, less their own bytes."""
        longest = {"objective": "sensitivity", "min_snr_db": _LONGEST_ERROR, "predicted_error": _LONGEST_ERROR}
        if self.measured.floor_relief:
            longest["tensor_floors"] = dict.fromkeys(self.measured.floor_relief, _LONGEST_ERROR)
        return self.file_bytes(columns, longest) - self.quantized_bytes(columns)

    def quantized_bytes(self, columns: Mapping[str, int]) -> int:
        return sum(self.measured.trials[name][column].size for name, column in columns.items())

    def file_bytes(self, columns: Mapping[str, int], summary: dict[str, Any]) -> int:
        trials = self.measured.trials
        entries = [item if isinstance(item, TensorEntry) else trials[item][columns[item]].entry
                   for item in self.measured.entries]
        entries = [replace(e) for e in entries]  # offsets are set on copies
        for entry, offset in zip(entries, layout_offsets([e.length for e in entries])):
            entry.offset = offset
        return planned_file_bytes(entries, dict(self.metadata(summary)))

    def allocation(self, columns: Mapping[str, int], min_snr_db: float | None, measured_sensitivity: bool,
                   budget: int | None) -> Allocation:
        trials, weights = self.measured.trials, self.measured.weights
        chosen = {name: trials[name][column] for name, column in columns.items()}
        error = math.sqrt(sum(t.cost for t in chosen.values()) / max(sum(weights.values()), 1e-300))
        lowest = min((t.snr_db for t in chosen.values()), default=None)
        own = self.measured.own_floors(min_snr_db)
        below = tuple(name for name, t in chosen.items()
                      if min_snr_db is not None and t.snr_db < own.get(name, min_snr_db))
        result = Allocation({name: Choice(t.bits, t.granularity, t.method, t.span) for name, t in chosen.items()},
                            error, min_snr_db, None if lowest is None or math.isinf(lowest) else lowest, below,
                            0, self.fixed, self.quantized_bytes(columns), budget,
                            "sensitivity" if measured_sensitivity else "per-layer", own)
        size = self.file_bytes(columns, result.summary())
        return replace(result, file_bytes=size, fixed_bytes=size - result.quantized_bytes)


def _confirmed(measured: _Measured, floor: float | None,
               solve: Callable[[dict[str, list[bool]], bool], _Columns | None], limited: int | None = None) -> tuple[_Columns | None, dict[str, list[bool]]]:
    """``solve(allowed, thorough)`` until every column it chooses is encoded, not predicted: each
    round encodes the chosen candidates that were predicted and solves again with what they
    really cost (and, for the floor, their real SNR). Rounds solve quickly (``thorough`` False:
    fewer starts) until nothing is left to confirm; the answer is always a thorough solve's. Where it finds no solution, each tensor's
    allowed column of least field ``limited`` is encoded and it tries again, so that no
    limit is refused on a prediction. After ``_CONFIRM_ROUNDS`` rounds that encoded something
    (the quick solves' last round, which finds nothing new, is not one) it solves once among the
    encoded columns alone; where that gives no all-encoded answer, every column of the tensors
    still unconfirmed is encoded. Returns the columns (None: no solution) and the mask they
    were solved with."""
    thorough = measured.settled  # nothing predicted, or the last call's answer was all confirmed: full solves
    last: _Columns | None = None
    confirming = 0  # rounds that encoded something (the switch to a thorough solve is not one)
    for _ in range(2 * _CONFIRM_ROUNDS + 6):
        if confirming == _CONFIRM_ROUNDS:
            confirming += 1
            # still moving between near-equal predicted candidates (spans, k-means or uniform a
            # few per cent apart): encode each tensor's candidates of about the size of the
            # last choice (its competitors) and choose among the encoded ones; only if that
            # fails is every column encoded
            if last is not None:
                measured.confirm_near(last, _NEAR_SIZE)
            allowed = _apply_floor(measured.trials, floor, measured.own_floors(floor))
            encoded = {name: [ok and t.exact for ok, t in zip(allowed[name], row)]
                       for name, row in measured.trials.items()}
            columns = solve(encoded, True) if all(any(row) for row in encoded.values()) else None
            if columns is not None and all(measured.trials[n][c].exact for n, c in columns.items()):
                measured.settled = True
                return columns, encoded
            measured.confirm_all()
        allowed = _apply_floor(measured.trials, floor, measured.own_floors(floor))
        columns = solve(allowed, thorough)
        if columns is None and limited is not None:
            least = {name: int(np.argmin([t[limited] for t in row])) for name, row in _masked(measured, allowed).items()}
            if measured.confirm(least):
                confirming += 1
                continue
        if columns is None:
            return columns, allowed
        last = columns
        if not measured.confirm(columns):
            if thorough:
                measured.settled = True
                return columns, allowed
            thorough = True  # the quick solves found what to confirm; the answer is a full one's
        else:
            confirming += 1
    raise AssertionError("every column is encoded after confirm_all")


def _least_error(measured: _Measured, planner: _Planner, target_bpw: float, floor: float | None,
                 policy: Policy) -> dict[str, int]:
    """The least total cost with the file within ``target_bpw``, checked on the planned file."""
    budget = int(target_bpw * measured.elements / 8)
    slack = 0
    fitted: list[tuple[float, dict[str, int]]] = []  # (objective, columns) of plans within the budget
    for _ in range(16):
        columns, allowed = _confirmed(measured, floor, lambda allowed, thorough: _allocate(
            _masked(measured, allowed), minimise=_COST, limited=_SIZE, limit=budget - planner.fixed - slack,
            thorough=thorough), _SIZE)
        if columns is None:
            break
        allocation = planner.allocation(columns, policy.min_snr_db, False, budget)
        size = planner.file_bytes(columns, allocation.summary())
        over = size - budget
        fixed = size - planner.quantized_bytes(columns)
        if over <= 0:
            fitted.append((allocation.predicted_error, columns))
            if len(fitted) > 1 or fixed >= planner.fixed - _FIXED_OVERESTIMATE or not measured.settings:
                break
            # the fixed bytes were estimated from sketches of the smallest candidates' entries,
            # which can hold more than the chosen ones' (measured: 31 KB of a 16 MB budget, 0.12 dB
            # of SNR); once, plan again within what this plan's header really leaves
            planner.fixed = fixed
            continue
        if fixed > planner.fixed and measured.settings:
            # the header was estimated from sketches of predicted entries: count it as planned
            planner.fixed = fixed
            continue
        # the estimate missed a few header bytes (a compressed header's size moves with its
        # contents): plan again within less, growing the margin so that the greedy fill, which
        # uses up whatever it is given, cannot miss by a byte again and again
        slack += max(over, slack, 8)
    if fitted:
        return min(fitted, key=lambda pair: pair[0])[1]
    raise InputError(_infeasible(measured, planner, target_bpw, floor))


def _infeasible(measured: _Measured, planner: _Planner, target_bpw: float, floor: float | None) -> str:
    """Why a target cannot be met, and the smallest one that can (its choices encoded, so that
    the target named is met)."""
    def smallest(use_floor: bool) -> tuple[float, dict[str, int]]:
        def least(allowed: dict[str, list[bool]], thorough: bool) -> _Columns:
            columns = {}
            for name, row in measured.trials.items():
                sizes = [t.size if not use_floor or allowed[name][i] else math.inf for i, t in enumerate(row)]
                columns[name] = int(np.argmin(sizes))
            return columns

        columns, _ = _confirmed(measured, floor, least)
        assert columns is not None
        # the header of these (encoded) choices as planned, where the first plan's came from sketches
        fixed = max(planner.fixed, planner.fixed_for(columns)) if measured.settings else planner.fixed
        planned = fixed + planner.quantized_bytes(columns) + _INT_SLACK * len(columns)
        return math.ceil(planned * 8 / measured.elements * 100) / 100, columns

    least, _ = smallest(False)
    if target_bpw < least or floor is None:
        return (f"--target-bpw {target_bpw:g} is below what the smallest choices (1-bit indices) give here "
                f"(about {least:.2f} bits per weight)")
    feasible, columns = smallest(True)
    # the tensor the floor costs the most bytes
    trials = measured.trials
    name = max(columns, key=lambda n: trials[n][columns[n]].size - min(t.size for t in trials[n]))
    return (f"--target-bpw {target_bpw:g} would push some quantized tensors (e.g. {name!r}) below the quality "
            f"floor of {floor:g} dB SNR{describe_floors(measured.own_floors(floor))}; "
            f"the smallest target that keeps every one above it is "
            f"{feasible:.2f} bits per weight (or lower the floor with --min-snr, or allow it with "
            f"--allow-below-floor)")


def _least_size(measured: _Measured, floor: float | None, max_error: float) -> dict[str, int]:
    """The fewest bytes with the objective's predicted error within ``max_error``."""
    total_weight = sum(measured.weights.values())
    columns, _ = _confirmed(measured, floor, lambda allowed, thorough: _allocate(
        _masked(measured, allowed), minimise=_SIZE, limited=_COST, limit=max_error ** 2 * total_weight,
        thorough=thorough), _COST)
    if columns is None:
        best, _ = _confirmed(measured, None, lambda allowed, thorough: {
            name: int(np.argmin([t.cost for t in row])) for name, row in measured.trials.items()})
        assert best is not None
        error = sum(measured.trials[name][column].cost for name, column in best.items())
        raise InputError(f"--max-error {max_error:g} cannot be met here: even the most accurate choice "
                         f"for each tensor ({max(CANDIDATE_BITS)} bits at most) gives an error of "
                         f"{math.sqrt(error / total_weight):.4g}")
    return columns


_Columns = dict[str, int]
#: fields of a trial the allocator trades against each other
_SIZE, _COST = _Trial._fields.index("size"), _Trial._fields.index("cost")


def _allocate(trials: Mapping[str, list[_Trial]], minimise: int, limited: int, limit: float,
              thorough: bool = True) -> _Columns | None:
    """One candidate (column) per tensor: the sum of field ``minimise`` as small as found, the sum of field
    ``limited`` within ``limit``; None if even each tensor's least ``limited`` does not fit.
    ``thorough`` False starts only from the two Lagrangian points (not from every fixed setting).

    Arrays hold one row per tensor and one column per candidate (the same candidates, in the
    same order, for every tensor), so thousands of tensors are quick.
    """
    with np.errstate(invalid="ignore", divide="ignore"):  # candidates below the floor are infinite
        return _allocate_finite(trials, minimise, limited, limit, thorough)


def _allocate_finite(trials: Mapping[str, list[_Trial]], minimise: int, limited: int, limit: float,
                     thorough: bool = True) -> _Columns | None:
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
    while used(choose(high)) > limit and high < 1e300:  # finite costs: a price this high picks the least resource
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
    starts += [same for same in uniform if thorough and used(same) <= limit]
    finished = [_improve(objective, resource, _repair(objective, resource, start, limit), limit)
                for start in starts]
    best = min(finished, key=lambda choice: (float(objective[rows, choice].sum()), used(choice)))
    return dict(zip(names, best.tolist()))


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
