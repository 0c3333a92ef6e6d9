"""Which tensors get quantized, and how: the default policy and its options."""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace

import torch

from .dtypes import is_float_name, name_of_dtype
from .errors import InputError
from .prune import check_fraction

__all__ = ["Policy", "Decision", "METHODS", "DEFAULT_MIN_SNR_DB", "GRANULARITIES", "PARAM_DTYPES", "parse_granularity",
           "granularity_for", "normalized_outputs"]

METHODS = ("uniform", "kmeans")
RANS_MODES = ("auto", "always", "never")
#: how a uniform grid rounds (``Policy.rounding``)
ROUNDINGS = ("nearest", "balanced")
#: element type of stored min/max and codebooks (spec 3): "auto" is float16 for groups
PARAM_DTYPES = ("auto", "float32", "float16", "uint8")
GRANULARITIES = ("tensor", "channel", "group:G")
MIN_GROUP, MAX_GROUP = 16, 65536
_BN_STATS = ("running_mean", "running_var", "num_batches_tracked")
#: the allocation's default quality floor: 13 dB SNR is a relative RMS error of 0.224. Measured
#: on the zoo of bench_zoo.py (ten networks trained here, full test sets): --target-bpw 3 with
#: every tensor at 13 dB or more lost at most 0.1 point on the seven MNIST networks it accepted,
#: and refused the two that needed less (a 28 k BatchNorm CNN lost 18 points with tensors at
#: 9-10 dB); 15 dB refused four networks that lost at most 0.09 at 3 bpw. Trained networks
#: broke at rel 0.4-0.8 (2-8 dB).
DEFAULT_MIN_SNR_DB = 13.0
#: Why a per-tensor grid switches to per channel: one grid's step is set by the widest
#: channel, so a channel k times weaker (weight decay shrinks some filters of a trained
#: ResNet; BatchNorm after the conv scales its output back up by about k) gets about k times
#: the tensor's relative error, after BatchNorm as much as before. Random-like rows differ
#: by well under 2x; at 4x a grid per channel (8 bytes per row) is worth it at any width.
DEFAULT_CHANNEL_SPREAD = 4.0
#: a channel this many times weaker than its tensor (or all zeros) is one that a grid for the
#: tensor rounds to a constant: a BatchNorm after it divides that constant's offset from its
#: running mean by the channel's tiny running deviation (a decayed or reparametrised filter,
#: 10^4 times weaker, broke a ResNet to 10 % accuracy at -b 8), so such a tensor gets a grid
#: per channel at any width
DEAD_CHANNEL = 1000.0
#: the shortest rows that get grids of their own for such a channel: a stem conv's 3x3 kernels
#: on one input channel (8 bytes of grid beside 9 indices)
MIN_DEAD_ROW = 8
#: the widest span a uniform grid may be given (``Decision.span``): twice the values' range is
#: one width less, at the same step
MAX_SPAN = 2.0


@dataclass(frozen=True)
class Decision:
    """What to do with one tensor: ``encoding`` "raw" or a method, with bits and a reason."""

    encoding: str
    bits: int
    granularity: str
    reason: str
    group_size: int = 0
    prune: float | None = None
    #: the grid or codebook must hold an exact 0 (always so when pruned)
    exact_zero: bool = False
    #: a tensor of few distinct values is stored exactly as a codebook of them (encoder)
    exact_values: bool = True
    #: when indices are rANS-coded: "auto", "always" (whenever smaller) or "never"
    rans: str = "auto"
    #: element type of the stored parameters: "float32" or "float16" (the encoder keeps
    #: float32 where float16 cannot hold them, or with an exact zero level)
    param_dtype: str = "float32"
    #: a uniform grid spans this many times its values' range (>= 1; see codecs.uniform)
    span: float = 1.0
    #: uniform grids: "balanced" (each row's rounding errors sum to about 0) or "nearest"
    rounding: str = "balanced"


@dataclass(frozen=True)
class Policy:
    """The packing options.

    Args:
        bits: index width for quantized tensors, 1..16.
        method: "uniform" (min/max grid) or "kmeans" (codebook).
        granularity: "tensor" (one min/max or codebook per tensor), "channel" (per output
            channel, i.e. per slice along dim 0) or "group:G" (per run of G consecutive
            elements, 16 <= G <= 65536).
        bias_bits: also quantize 1-D float tensors (biases, BatchNorm weight and bias) at
            this width; BatchNorm running statistics always stay raw.
        exclude: glob patterns of tensor names kept raw.
        bit_overrides: ``{glob: bits}``; the first matching pattern sets the width, and
            also quantizes 1-D or small float tensors it matches.
        min_numel: float tensors with fewer elements stay raw (their parameters would cost
            more than they save).
        min_snr_db: the quality floor of an allocation (``target_bpw``, ``max_error``): no
            quantized tensor is given a candidate below this SNR (10 log10 of signal over
            error energy; 13 dB by default, None for none); a target met only below it is
            refused with the smallest target met above it.
        allow_below_floor: let an allocation choose candidates below ``min_snr_db``.
        channel_spread: with ``method="uniform"`` and ``granularity="tensor"``, a >= 2-D
            tensor whose weakest channel has an RMS more than this many times below the
            tensor's gets a grid per channel instead (one grid would give that channel this
            many times the tensor's relative error, and a BatchNorm after it keeps it), at 6
            bits or more if its rows hold at least 256 bits of indices, and at any width where
            a channel is more than ``DEAD_CHANNEL`` times weaker or all zeros (one grid rounds
            it to a constant, which the BatchNorm blows up) on rows of 8 values or more; an
            allocation tries grids per channel in place of one grid at those widths. None
            keeps one grid per tensor always. The only decision made from the values. It
            applies to the tensors in ``normalized`` only.
        normalized: names of the weights whose outputs a BatchNorm normalises (its running
            statistics follow the weight's module in the state dict, one per output channel:
            :func:`normalized_outputs`; ``pack`` finds them). Without a BatchNorm a weak
            channel's output stays weak and its error with it, so one grid is right (an
            L1-trained layer with many near-dead rows would pay 40x the bytes per channel).
            None: every tensor is treated as normalised.
        prune: zero this fraction of smallest-magnitude weights in each quantized tensor
            (zero is then an exact level of its grid or codebook).
        exact_zero: give every grid or codebook an exact 0 level, as pruning does, without
            pruning: weights that are 0 stay 0, and near-zero weights (most of an L1-trained
            or sparse tensor) land on it. A uniform range widens by less than a step.
        exact_values: store a float tensor to quantize that has few distinct values (at most
            256, and 2^bits, each used 16 times on average: pruning masks, constants,
            already-quantized weights) exactly, as a k-means codebook of those values, when
            that rebuilds it bit for bit; False quantizes it like any other.
        derive_masks: store a 0/1 mask (bool, integer or float; ``x.weight_mask``,
            ``x.mask``) that equals ``(w != 0)`` of a same-shape tensor ``w`` of the file,
            as ``w`` decodes, as derived from ``w`` (spec 3.5, format version 4): no payload,
            rebuilt exactly when read. A mask that quantization breaks (a small kept weight
            rounded to 0) is stored as ``exact_values`` says. False: never.
        rounding: how a uniform grid picks each index. "balanced" (default, up to 6 bits):
            the nearest level, except that in each output channel's row (each grid's row,
            for grids per channel or group) the values rounded furthest against the row's
            summed error take their other neighbour where that keeps the row's rounding
            errors summing to about 0: a layer's outputs are sums over such rows, and the
            summed errors otherwise shift them by a constant (on some networks, at 3-4 bits,
            the part that costs accuracy; see ``codecs.uniform.balanced``). The squared error
            grows by about 1 % (3 % at groups of 32). A value exactly on a level is never
            moved, and values rounded to an exact 0 level neither count nor move. 1-D tensors
            and widths above 6 bits always round to nearest, so 8-bit files are the same
            either way. "nearest": the nearest level always (files as earlier qpacks wrote them).
        rans: "auto" codes a tensor's indices with rANS when that saves at least 5 % over
            the best zstd form (skewed indices: trained, L1-regularised, pruned weights),
            "always" whenever it is smaller at all, "never" not at all (files load at
            unpacking speed; rANS decodes at 20-140 M indices/s per core, more for
            larger tensors).
        param_dtype: element type of the stored min/max or codebooks: "float32",
            "float16" (half the bytes: at groups of 32, 1 bit per weight instead of 2) or
            "auto": float16 for group granularity up to 8 bits, where parameters cost the most
            and a float16 min rounded down and max rounded up widen a group's grid by
            about 0.1 % of its range, float32 otherwise. Tensors whose parameters float16
            cannot hold (beyond +-65504, or ranges so small that rounding widens them more
            than 1 %), and grids with an exact zero (``exact_zero``, ``prune``), keep float32.
            "uint8": two levels, as GGUF's K-quants: each row's min and max as an 8-bit code
            under a float32 base per tensor (a quarter of float32's bytes: 0.5 bit per weight
            at groups of 32); uniform grids only (k-means codebooks get float16).
    """

    bits: int = 8
    method: str = "uniform"
    granularity: str = "tensor"
    bias_bits: int | None = None
    exclude: tuple[str, ...] = ()
    bit_overrides: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    min_numel: int = 64
    prune: float | None = None
    exact_zero: bool = False
    exact_values: bool = True
    derive_masks: bool = True
    rounding: str = "balanced"
    rans: str = "auto"
    param_dtype: str = "auto"
    #: exact tensor names -> bits (what --target-bpw or --max-error chose); checked before the globs
    bits_by_name: tuple[tuple[str, int], ...] = field(default_factory=tuple)
    #: exact tensor names -> granularity ("tensor", "channel", "group:G"), chosen the same way
    granularity_by_name: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    #: exact tensor names -> method ("uniform", "kmeans"), chosen the same way
    method_by_name: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    #: exact tensor names -> span of a uniform grid (``Decision.span``), chosen the same way
    span_by_name: tuple[tuple[str, float], ...] = field(default_factory=tuple)
    #: the option that chose ``bits_by_name`` ("--max-error 0.01"), named in each tensor's reason
    allocation: str = ""
    #: the quality floor of --target-bpw and --max-error, in dB SNR per quantized tensor (None: none)
    min_snr_db: float | None = DEFAULT_MIN_SNR_DB
    #: let the allocation go below ``min_snr_db`` (it is then only reported)
    allow_below_floor: bool = False
    #: a per-tensor uniform grid becomes one per channel for a >= 2-D tensor whose weakest
    #: channel's RMS is this many times below the tensor's (None: never)
    channel_spread: float | None = DEFAULT_CHANNEL_SPREAD
    #: weights followed by a BatchNorm (the channel_spread rule's scope; None: all)
    normalized: frozenset[str] | None = None

    def __post_init__(self) -> None:
        if self.prune is not None:
            check_fraction(self.prune, "prune")
        _check_bits("bits", self.bits)
        if self.bias_bits is not None:
            _check_bits("bias_bits", self.bias_bits)
        for pattern, bits in self.bit_overrides + self.bits_by_name:
            _check_bits(f"bits for {pattern!r}", bits)
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for text in (self.granularity, *(text for _, text in self.granularity_by_name)):
            parse_granularity(text)
        if self.param_dtype not in PARAM_DTYPES:
            raise InputError(f"unknown param dtype {self.param_dtype!r}; choose one of {', '.join(PARAM_DTYPES)}")
        if self.rounding not in ROUNDINGS:
            raise InputError(f"unknown rounding {self.rounding!r}; choose one of {', '.join(ROUNDINGS)}")
        if self.rans not in RANS_MODES:
            raise InputError(f"unknown rans mode {self.rans!r}; choose one of {', '.join(RANS_MODES)}")
        if self.channel_spread is not None and (isinstance(self.channel_spread, bool) or not isinstance(
                self.channel_spread, (int, float)) or not self.channel_spread >= 1):
            raise InputError(f"channel_spread must be a number >= 1 or None, got {self.channel_spread!r}")
        if self.min_snr_db is not None and (isinstance(self.min_snr_db, bool) or not isinstance(
                self.min_snr_db, (int, float)) or not math.isfinite(self.min_snr_db)):
            raise InputError(f"min_snr_db (--min-snr) must be a finite number of dB, got {self.min_snr_db!r}")
        for name, span in self.span_by_name:
            if isinstance(span, bool) or not isinstance(span, (int, float)) or not 1 <= span <= MAX_SPAN:
                raise InputError(f"span of {name!r} must be a number from 1 to {MAX_SPAN:g}, got {span!r}")
        for _, method in self.method_by_name:
            if method not in METHODS:
                raise InputError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if not isinstance(self.min_numel, int) or self.min_numel < 1:
            raise InputError(f"min_numel must be a positive integer, got {self.min_numel!r}")

    def decide(self, name: str, tensor: torch.Tensor) -> Decision:
        """The decision for one tensor, from its name, dtype and shape (and, for
        ``channel_spread``, its channels' RMS)."""
        decision = self._decide(name, tensor)
        if decision.encoding == "raw":
            return decision
        # codec options, for every quantized tensor
        decision = replace(decision, exact_zero=self.exact_zero, exact_values=self.exact_values, rans=self.rans,
                           rounding=self.rounding)
        bits, granularity, method, span = (chosen.get(name) for chosen in self._allocated)
        if bits is None and granularity is None and method is None and span is None:
            return self._with_param_dtype(decision)
        chose = []
        if method is not None and method != decision.encoding:
            decision, chose = replace(decision, encoding=method), [method]
        if bits is not None:
            decision = replace(decision, bits=bits)
            chose.append(f"{bits} bits")
        if granularity is not None:
            kind, group_size = granularity_for(granularity, tensor)
            decision = replace(decision, granularity=kind, group_size=group_size)
            chose.append(f"{kind}:{group_size} granularity" if group_size else f"{kind} granularity")
        if span is not None and span != 1.0 and decision.encoding == "uniform":
            decision = replace(decision, span=float(span))
            chose.append(f"a grid {span:.3g}x its range")
        decision = replace(decision, reason=f"{decision.reason}; {self.allocation or 'allocation'} chose {', '.join(chose)}")
        return self._with_param_dtype(decision)

    def _with_param_dtype(self, decision: Decision) -> Decision:
        param_dtype = self.param_dtype
        if param_dtype == "auto":
            param_dtype = "float16" if decision.granularity == "group" and decision.bits <= 8 else "float32"
        return replace(decision, param_dtype=param_dtype)

    @functools.cached_property
    def _allocated(self) -> tuple[dict[str, int], dict[str, str], dict[str, str], dict[str, float]]:
        # built once, not per tensor: a checkpoint may hold thousands of names
        return (dict(self.bits_by_name), dict(self.granularity_by_name), dict(self.method_by_name),
                dict(self.span_by_name))

    def spread_of(self, name: str, tensor: torch.Tensor, bits: int | None = None) -> str | None:
        """Why this weight needs a grid per channel at ``bits`` (the policy's by default), or
        None: a BatchNorm follows it (``normalized``) and a channel is more than ``channel_spread``
        times weaker than the tensor, at 6 bits or more (below, granularity is a size trade the
        user or the allocation makes) on rows long enough that 8 bytes of grid stay within a
        quarter of their indices; or a channel is more than ``DEAD_CHANNEL`` times weaker or all
        zeros, at any width, on rows of ``MIN_DEAD_ROW`` values or more (one grid breaks that
        channel; a grid per channel on shorter rows would cost more than the values raw)."""
        bits = self.bits if bits is None else bits
        if (self.channel_spread is None or tensor.dim() < 2 or tensor.shape[0] < 2
                or not (self.normalized is None or name in self.normalized)):
            return None
        spread, row = channel_spread(tensor), tensor.numel() // tensor.shape[0]
        if not (spread > DEAD_CHANNEL and row >= MIN_DEAD_ROW
                or spread > self.channel_spread and bits >= 6 and row * bits >= 256):
            return None
        return "a channel of zeros" if math.isinf(spread) else f"a channel {spread:.0f}x weaker than the tensor"

    def _decide(self, name: str, tensor: torch.Tensor) -> Decision:
        dtype_name = name_of_dtype(tensor.dtype)
        if dtype_name is None or not is_float_name(dtype_name):
            return Decision("raw", 0, "tensor", "integer or bool")
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in self.exclude):
            return Decision("raw", 0, "tensor", "excluded")
        if name.rsplit(".", 1)[-1] in _BN_STATS:
            return Decision("raw", 0, "tensor", "BatchNorm statistics")
        if tensor.numel() == 0 or tensor.dim() == 0:
            return Decision("raw", 0, "tensor", "empty or 0-d")
        kind, group_size = granularity_for(self.granularity, tensor)
        for pattern, bits in self.bit_overrides:
            if fnmatch.fnmatchcase(name, pattern):
                return Decision(self.method, bits, kind, f"--bits {pattern}={bits}", group_size, self.prune)
        if tensor.dim() >= 2:
            if tensor.numel() < self.min_numel:
                return Decision("raw", 0, "tensor", f"small (< {self.min_numel} elements)")
            if kind == "tensor" and self.method == "uniform" and (spread := self.spread_of(name, tensor)) is not None:
                return Decision(self.method, self.bits, "channel", f"weight; {spread}: a grid per channel", 0, self.prune)
            return Decision(self.method, self.bits, kind, "weight", group_size, self.prune)
        if self.bias_bits is not None:
            return Decision(self.method, self.bias_bits, "tensor", "1-D (--bias-bits)")
        return Decision("raw", 0, "tensor", "1-D (bias or norm)")


def normalized_outputs(tensors: Mapping[str, torch.Tensor]) -> frozenset[str]:
    """The >= 2-D weights whose outputs a BatchNorm normalises: the next module after the
    weight's own (by name prefix, in state-dict order) holds ``running_var`` with one value
    per output channel (conv -> BatchNorm2d, linear -> BatchNorm1d, and a pre-activation
    block's conv -> the next BatchNorm). Names decide first, so a lazy source loads only
    the few tensors of such pairs (none for a model without BatchNorm)."""
    modules: dict[str, set[str]] = {}
    for name in tensors:
        module, _, leaf = name.rpartition(".")
        modules.setdefault(module, set()).add(leaf)
    order = list(modules)
    found = set()
    for module, following in zip(order, order[1:]):
        if "weight" in modules[module] and "running_var" in modules[following]:
            weight = tensors[f"{module}.weight" if module else "weight"]
            stats = tensors[f"{following}.running_var" if following else "running_var"]
            if weight.dim() >= 2 and stats.numel() == weight.shape[0]:
                found.add(f"{module}.weight" if module else "weight")
    return frozenset(found)


def channel_spread(tensor: torch.Tensor) -> float:
    """The tensor's RMS over its weakest channel's (slices along dim 0): 1 for fewer than two
    channels, Inf when a channel is all zeros, NaN for non-finite values."""
    if tensor.dim() < 2 or tensor.shape[0] < 2 or tensor.numel() == 0:
        return 1.0
    squares = torch.linalg.vector_norm(tensor.reshape(tensor.shape[0], -1), dim=1, dtype=torch.float64) ** 2
    row = tensor.numel() // tensor.shape[0]
    total, weakest = float(squares.sum()), float(squares.min())
    if not (math.isfinite(total) and math.isfinite(weakest)):
        return math.nan
    if total == 0:
        return 1.0
    return math.inf if weakest == 0 else math.sqrt(total / tensor.numel() / (weakest / row))


def parse_granularity(text: str) -> tuple[str, int]:
    """"tensor" -> ("tensor", 0), "channel" -> ("channel", 0), "group:64" -> ("group", 64)."""
    if text in ("tensor", "channel"):
        return text, 0
    kind, _, size = str(text).partition(":")
    if kind == "group" and size.isdigit() and MIN_GROUP <= int(size) <= MAX_GROUP:
        return "group", int(size)
    raise InputError(f"unknown granularity {text!r}; choose tensor, channel or group:G "
                     f"with {MIN_GROUP} <= G <= {MAX_GROUP}")


def granularity_for(text: str, tensor: torch.Tensor) -> tuple[str, int]:
    """What granularity ``text`` means for this tensor: (kind, group size).

    Channel needs at least 2 dims and a group must be shorter than the tensor, else the
    tensor gets one parameter set ("tensor"), which is what those would amount to or cost more.
    """
    kind, group_size = parse_granularity(text)
    if kind == "channel" and tensor.dim() < 2 or kind == "group" and tensor.numel() <= group_size:
        return "tensor", 0
    return kind, group_size


def _check_bits(what: str, bits: object) -> None:
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise InputError(f"{what} must be an integer from 1 to 16, got {bits!r}")
