"""Trained quantization: fine-tune a model so that its weights are exactly what qpack stores.

Two methods, chosen with ``method``:

``"kmeans"`` (Han, Mao, Dally, "Deep Compression", ICLR 2016)
    Every quantized weight tensor becomes ``codebook[index]``: the codebook is fitted once
    with :func:`qpack.kmeans1d.fit_codebook` (the same 1-D k-means the ``kmeans`` codec
    uses), the assignments ``index`` then stay fixed, and each centroid is trained with the
    sum of its members' gradients (one ``index_add_`` per tensor and step). After every
    optimizer step the weights are rewritten as ``codebook[index]``. With ``prune``, the
    smallest ``|w|`` of each tensor are first set to zero; they keep an exact ``0.0`` level
    that is never trained, next to ``2**bits - 1`` trained centroids. ``prune_epochs``
    first retrains the pruned network in full precision (the pruned weights held at zero),
    as Han et al. do before clustering.

``"uniform"`` (straight-through estimator)
    The forward pass sees every quantized tensor on its own min/max grid of ``2**bits``
    levels (``min + step * round((w - min) / step)``, the float32 arithmetic of the
    ``uniform`` codec in specs/qpk-format.md); the gradient passes to the latent
    full-precision weights unchanged. At the end the weights are left on their grid.

Packing the result. After :func:`finetune` every quantized tensor holds at most
``2**bits`` distinct values, so::

    result = finetune(model, loader, bits=3)
    qpack.pack(model.state_dict(), "model.qpk", **result.pack_options)

stores them exactly (``pack_options`` is ``method="kmeans"`` with the same ``bits``,
``bias_bits`` and ``bit_overrides``: a k-means codebook of a tensor with at most ``2**bits``
values is those values). For ``method="uniform"`` the snapped weights also come back
exactly from ``qpack.pack(..., method="uniform", bits=bits)`` (their grid is a fixed point of
the codec's min/max fit; :attr:`FinetuneResult.uniform_exact` says whether it was reached
for every tensor), and ``pack_options`` (k-means) is exact regardless.

Which tensors are quantized: those ``qpack.pack`` would quantize with the same options
(floating parameters with two or more dimensions and at least ``min_numel`` elements; 1-D
parameters too with ``bias_bits``; names matching ``exclude`` never), narrowed by
``weight_filter``. Buffers (BatchNorm statistics) are never touched by the quantizer; the
other parameters are trained normally.

This module imports only torch, numpy and qpack's light modules; ``import qpack`` does not
import it (use ``from qpack.finetune import finetune``).
"""

from __future__ import annotations

import fnmatch
import glob
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from .errors import InputError
from .policy import Policy
from .prune import check_fraction, keep_mask

__all__ = [
    "EpochStats",
    "FinetuneResult",
    "QuantizedTensor",
    "finetune",
    "prune_mask",
    "uniform_grid",
]

LossFn = Callable[[Any, Any], torch.Tensor]


@dataclass(frozen=True)
class EpochStats:
    """What one epoch of :func:`finetune` did.

    Attributes:
        phase: ``"prune"`` (full-precision retraining of the pruned network) or
            ``"quantize"`` (trained quantization).
        epoch: 1-based, within its phase.
        epochs: epochs in that phase.
        loss: mean training loss over the epoch's batches (weighted by batch size).
        accuracy: share of correct ``argmax`` predictions when the outputs are ``(N, C)``
            logits and the targets ``(N,)`` class indices, else ``None``.
        batches: batches seen.
        seconds: wall time of the epoch.
    """

    phase: str
    epoch: int
    epochs: int
    loss: float
    accuracy: float | None
    batches: int
    seconds: float


@dataclass(frozen=True)
class QuantizedTensor:
    """One quantized parameter after :func:`finetune`.

    Attributes:
        name: the parameter's name in ``model.named_parameters()``.
        method: ``"kmeans"`` or ``"uniform"``.
        bits: index width; the tensor holds at most ``2**bits`` distinct values.
        numel: elements.
        levels: distinct values it holds now.
        pruned: elements pruned to zero (0 without pruning).
        codebook: k-means: the float32 levels (the zero level first when pruned);
            uniform: the ``2**bits`` grid values. On the CPU.
    """

    name: str
    method: str
    bits: int
    numel: int
    levels: int
    pruned: int
    codebook: torch.Tensor


@dataclass
class FinetuneResult:
    """What :func:`finetune` did.

    Attributes:
        tensors: ``{name: QuantizedTensor}`` for every quantized parameter.
        history: one :class:`EpochStats` per epoch, the pruning phase's first.
        pack_options: keyword arguments for ``qpack.pack`` that store the fine-tuned
            weights exactly: ``method="kmeans"``, ``bits``, ``bias_bits``,
            ``bit_overrides``, ``min_numel`` and ``exclude`` (the caller's patterns plus
            the tensors ``weight_filter`` left out, which ``pack`` then keeps lossless).
        uniform_exact: for ``method="uniform"``: every tensor's grid is a fixed point of
            the ``uniform`` codec, so packing with ``method="uniform"`` and the same bits
            is exact too. ``None`` for k-means.
    """

    tensors: dict[str, QuantizedTensor] = field(default_factory=dict)
    history: list[EpochStats] = field(default_factory=list)
    pack_options: dict[str, Any] = field(default_factory=dict)
    uniform_exact: bool | None = None


# --------------------------------------------------------------------------- pure helpers


def uniform_grid(values: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Snap ``values`` to their own min/max grid of ``2**bits`` levels.

    The arithmetic is the ``uniform`` codec's (specs/qpk-format.md): in float32,
    ``step = (max - min) / (2**bits - 1)``, ``idx = clamp(round((w - min) / step))`` and
    ``w' = min + step * idx`` with two roundings; a constant tensor stays as it is.

    Args:
        values: a finite floating tensor, any shape, at least one element.
        bits: index width, 1 to 16.

    Returns:
        ``(snapped, grid)``: the snapped values (float32, same shape) and the
        ``2**bits`` grid levels (float32).
    """
    w = values.detach().to(torch.float32)
    lo, hi = w.min(), w.max()
    levels = (1 << bits) - 1
    step = ((hi - lo).cpu() / float(levels)).to(w.device)  # a true division, as the codec does
    if float(step) == 0.0:
        return w.clone(), lo.reshape(1).clone()
    idx = ((w - lo) / step).round_().clamp_(0, levels)
    snapped = idx.mul_(step).add_(lo)  # step * idx, rounded, then + min, rounded
    grid = torch.arange(levels + 1, dtype=torch.float32, device=w.device).mul_(step).add_(lo)
    return snapped, grid


def prune_mask(values: torch.Tensor, fraction: float) -> torch.Tensor:
    """The elements to keep when the smallest ``|values|`` ``fraction`` is pruned.

    The same rule as ``qpack.pack(..., prune=...)``: exactly ``round(fraction * numel)``
    elements of smallest magnitude, ties broken by position.

    Returns:
        A bool tensor of ``values``' shape, ``True`` where the element is kept.
    """
    return keep_mask(values, fraction)


def _check_fraction(fraction: object, what: str) -> float:
    return check_fraction(fraction, f"{what} fractions")


# --------------------------------------------------------------------------- per-tensor state


class _KMeans:
    """A parameter written as ``codebook[index]`` with fixed ``index`` (zero level fixed)."""

    def __init__(self, name: str, param: nn.Parameter, bits: int, keep: torch.Tensor | None) -> None:
        from . import kmeans1d

        self.name, self.param, self.bits = name, param, bits
        k = 1 << bits
        values = param.detach().to("cpu", torch.float32).reshape(-1)
        if keep is None:
            book = kmeans1d.fit_codebook(values.numpy(), k)
            index = kmeans1d.assign(values.numpy(), book)
            self.fixed_zero: int | None = None
            self.pruned = 0
        else:
            keep_flat = keep.to("cpu").reshape(-1)
            kept = values[keep_flat].numpy()
            self.pruned = int((~keep_flat).sum())
            if kept.size == 0 or k == 1:
                book = np.zeros(1, dtype=np.float32)
                index = np.zeros(values.numel(), dtype=np.int64)
            else:
                book = np.concatenate([np.zeros(1, np.float32), kmeans1d.fit_codebook(kept, k - 1)])
                index = np.zeros(values.numel(), dtype=np.int64)
                index[keep_flat.numpy()] = 1 + kmeans1d.assign(kept, book[1:])
            self.fixed_zero = 0
        device = param.device
        self.codebook = torch.from_numpy(np.ascontiguousarray(book, dtype=np.float32)).to(device)
        self.index = torch.from_numpy(index).to(device)
        self.trainable = self.codebook  # the optimizer trains the centroids
        self.write()

    def gather(self) -> None:
        grad = self.param.grad
        summed = torch.zeros_like(self.codebook)
        if grad is not None:
            summed.index_add_(0, self.index, grad.detach().reshape(-1).to(torch.float32))
        if self.fixed_zero is not None:
            summed[self.fixed_zero] = 0.0
        self.codebook.grad = summed
        self.param.grad = None

    def write(self) -> None:
        with torch.no_grad():
            if self.fixed_zero is not None:
                self.codebook[self.fixed_zero] = 0.0
            self.param.copy_(self.codebook[self.index].view_as(self.param))

    def finish(self) -> bool:
        return True


class _Uniform:
    """A parameter that holds its latent weights snapped to their min/max grid (STE)."""

    def __init__(self, name: str, param: nn.Parameter, bits: int) -> None:
        self.name, self.param, self.bits = name, param, bits
        self.pruned = 0
        self.latent = param.detach().to(torch.float32).clone()
        self.trainable = self.latent
        self.codebook = torch.zeros(0)
        self.write()

    def gather(self) -> None:  # straight through: d loss / d latent := d loss / d snapped
        grad = self.param.grad
        self.latent.grad = torch.zeros_like(self.latent) if grad is None else grad.detach().to(torch.float32).clone()
        self.param.grad = None

    def write(self) -> None:
        snapped, self.codebook = uniform_grid(self.latent, self.bits)
        with torch.no_grad():
            self.param.copy_(snapped.view_as(self.param))

    def finish(self) -> bool:
        """Re-snap until the grid of the snapped values is the grid itself (the codec's view)."""
        values = self.param.detach().to(torch.float32)
        for _ in range(8):
            snapped, grid = uniform_grid(values, self.bits)
            if torch.equal(snapped, values):
                self.codebook = grid
                with torch.no_grad():
                    self.param.copy_(values.view_as(self.param))
                return True
            values = snapped
        with torch.no_grad():
            self.param.copy_(values.view_as(self.param))
        self.codebook = uniform_grid(values, self.bits)[1]
        return False


class _Masked:
    """A pruned parameter trained in full precision with its pruned elements held at zero."""

    def __init__(self, param: nn.Parameter, keep: torch.Tensor) -> None:
        self.param = param
        self.keep = keep.to(param.device)
        self.trainable = param
        self.write()

    def gather(self) -> None:
        if self.param.grad is not None:
            self.param.grad.mul_(self.keep)

    def write(self) -> None:
        with torch.no_grad():
            self.param.mul_(self.keep)


# --------------------------------------------------------------------------- the loop


def _to(batch: Any, device: torch.device) -> Any:
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to(b, device) for b in batch)
    if isinstance(batch, Mapping):
        return {k: _to(v, device) for k, v in batch.items()}
    return batch


def _split(batch: Any) -> tuple[Any, Any]:
    if isinstance(batch, (list, tuple)) and len(batch) == 2:
        return batch[0], batch[1]
    raise InputError(
        f"the loader must yield (inputs, targets) pairs, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (list, tuple)) else "")
    )


def _run_phase(
    model: nn.Module,
    loader: Iterable[Any],
    states: list[Any],
    optimizer: torch.optim.Optimizer,
    *,
    phase: str,
    epochs: int,
    loss_fn: LossFn,
    device: torch.device,
    progress: Callable[[EpochStats], None] | None,
) -> list[EpochStats]:
    history = []
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        seen = batches = 0
        countable = True
        for batch in loader:
            inputs, targets = _split(_to(batch, device))
            outputs = model(inputs)
            loss = loss_fn(outputs, targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for state in states:
                state.gather()
            optimizer.step()
            for state in states:
                state.write()
            n = len(targets) if hasattr(targets, "__len__") else 1
            loss_sum += loss.detach().to(torch.float64) * n
            seen += n
            batches += 1
            if countable and isinstance(outputs, torch.Tensor) and outputs.dim() == 2 and isinstance(
                targets, torch.Tensor
            ) and targets.dim() == 1 and not targets.is_floating_point():
                correct += (outputs.detach().argmax(1) == targets).sum()
            else:
                countable = False
        if batches == 0:
            raise InputError("the loader yielded no batches")
        stats = EpochStats(
            phase=phase,
            epoch=epoch,
            epochs=epochs,
            loss=loss_sum.item() / seen,
            accuracy=correct.item() / seen if countable else None,
            batches=batches,
            seconds=time.perf_counter() - start,
        )
        history.append(stats)
        if progress is not None:
            progress(stats)
    return history


def _prune_fraction(name: str, prune: float | Mapping[str, float] | None) -> float:
    if prune is None:
        return 0.0
    if isinstance(prune, Mapping):
        for pattern, fraction in prune.items():
            if fnmatch.fnmatchcase(name, pattern):
                return _check_fraction(fraction, "prune")
        return 0.0
    return _check_fraction(prune, "prune")


def finetune(
    model: nn.Module,
    loader: Iterable[Any],
    *,
    bits: int = 3,
    method: str = "kmeans",
    prune: float | Mapping[str, float] | None = None,
    epochs: int = 3,
    lr: float = 1e-4,
    other_lr: float | None = None,
    prune_epochs: int = 0,
    prune_lr: float = 1e-3,
    bias_bits: int | None = None,
    bit_overrides: Mapping[str, int] | None = None,
    exclude: Iterable[str] = (),
    min_numel: int = 64,
    loss_fn: LossFn | None = None,
    device: str | torch.device | None = None,
    weight_filter: Callable[[str, torch.Tensor], bool] | None = None,
    progress: Callable[[EpochStats], None] | None = None,
) -> FinetuneResult:
    """Quantization-aware fine-tuning of ``model`` in place (see the module docstring).

    Steps: choose the tensors (qpack's packing policy with these options, then
    ``weight_filter``); with ``prune``, zero the smallest weights of each chosen tensor
    and, for ``prune_epochs`` epochs, train the whole model with those zeros held (Adam,
    ``prune_lr``); quantize (k-means codebooks with fixed assignments, or the uniform grid);
    train ``epochs`` epochs with Adam: the centroids (or latent uniform weights) at ``lr``,
    every other parameter at ``other_lr``. The model ends in the training mode it had.

    Args:
        model: the network, trained in full precision; changed in place.
        loader: an iterable of ``(inputs, targets)`` batches, iterated once per epoch
            (a ``torch.utils.data.DataLoader`` or any re-iterable sequence).
        bits: index width of the quantized weights, 1 to 16 (at most ``2**bits`` values).
        method: ``"kmeans"`` or ``"uniform"``.
        prune: with ``"kmeans"``: a fraction in ``[0, 1)`` of each quantized tensor's
            smallest-magnitude weights set and kept at exactly zero, or ``{glob: fraction}``
            (the first matching pattern decides; unmatched tensors are not pruned).
            Pruned tensors get ``2**bits - 1`` trained centroids plus the zero level.
        epochs: epochs of trained quantization (0: quantize only).
        lr: Adam learning rate of the centroids (k-means) or latent weights (uniform).
            Adam moves each centroid by about ``lr`` per step whatever its member count,
            so keep it well below the spacing of the centroids.
        other_lr: learning rate of the parameters that are not quantized (biases,
            normalisation); default ``lr``.
        prune_epochs: epochs of full-precision training after pruning, before clustering.
        prune_lr: Adam learning rate of that phase.
        bias_bits: also quantize 1-D parameters at this width (as ``qpack.pack`` does).
        bit_overrides: ``{glob: bits}`` as in ``qpack.pack`` (first match wins; also
            selects 1-D or small tensors it matches).
        exclude: glob patterns of parameter names left in full precision.
        min_numel: parameters with fewer elements stay in full precision (unless a
            ``bit_overrides`` pattern names them).
        loss_fn: ``loss_fn(model(inputs), targets)``; default cross-entropy.
        device: moves the model there and every batch; default: the device of the model's
            first parameter.
        weight_filter: ``weight_filter(name, parameter)``: quantize only where it returns
            true (among the tensors the options above choose).
        progress: called with each epoch's :class:`EpochStats`.

    Returns:
        A :class:`FinetuneResult`; pack with ``qpack.pack(model.state_dict(), path,
        **result.pack_options)`` to store the weights exactly.

    Raises:
        InputError: (a ``ValueError``) a bad option, ``prune`` with ``"uniform"``, a
            loader that yields no batches or no ``(inputs, targets)`` pairs, or no tensor
            to quantize.
    """
    if method not in ("kmeans", "uniform"):
        raise InputError(f"unknown method {method!r}; choose kmeans or uniform")
    for what, value in (("epochs", epochs), ("prune_epochs", prune_epochs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{what} must be a non-negative integer, got {value!r}")
    for what, value in (("lr", lr), ("prune_lr", prune_lr), ("other_lr", other_lr)):
        if value is not None and not (isinstance(value, (int, float)) and math.isfinite(value) and value >= 0):
            raise InputError(f"{what} must be a finite non-negative number, got {value!r}")
    if prune is not None and method != "kmeans":
        raise InputError("prune needs method='kmeans' (a uniform grid has no exact zero level)")
    if prune is not None and not isinstance(prune, Mapping):
        _check_fraction(prune, "prune")
    exclude = tuple(exclude)
    overrides = dict(bit_overrides or {})
    policy = Policy(bits=bits, method="kmeans", bias_bits=bias_bits, exclude=exclude,
                    bit_overrides=tuple(overrides.items()), min_numel=min_numel)
    loss_fn = loss_fn if loss_fn is not None else F.cross_entropy
    if device is not None:
        model.to(device)
    first = next(iter(model.parameters()), None)
    dev = torch.device(device) if device is not None else (first.device if first is not None else torch.device("cpu"))
    was_training = model.training

    chosen: list[tuple[str, nn.Parameter, int]] = []
    left_out: list[str] = []
    for name, p in model.named_parameters():
        decision = policy.decide(name, p.detach())
        if decision.encoding == "raw":
            continue
        if weight_filter is not None and not weight_filter(name, p):
            left_out.append(name)
            continue
        if not bool(torch.isfinite(p.detach()).all()):
            raise InputError(f"{name}: holds NaN or infinity; cannot quantize it")
        chosen.append((name, p, decision.bits))
    if not chosen:
        raise InputError("no parameter to quantize: every one is 1-D, small, excluded or filtered out")
    chosen_ids = {id(p) for _, p, _ in chosen}
    others = [p for p in model.parameters() if id(p) not in chosen_ids and p.requires_grad]
    result = FinetuneResult()

    # pruning, then full-precision retraining with the zeros held
    keeps: dict[str, torch.Tensor] = {}
    for name, p, _ in chosen:
        fraction = _prune_fraction(name, prune)
        if fraction > 0:
            keeps[name] = prune_mask(p, fraction)
    try:
        if keeps:
            masked = [_Masked(p, keeps[name]) for name, p, _ in chosen if name in keeps]
            if prune_epochs:
                optimizer = torch.optim.Adam(
                    [p for p in model.parameters() if p.requires_grad], lr=prune_lr
                )
                result.history += _run_phase(
                    model, loader, masked, optimizer, phase="prune", epochs=prune_epochs,
                    loss_fn=loss_fn, device=dev, progress=progress,
                )

        # quantization, then trained quantization
        states: list[Any] = []
        for name, p, b in chosen:
            if method == "kmeans":
                states.append(_KMeans(name, p, b, keeps.get(name)))
            else:
                states.append(_Uniform(name, p, b))
        if epochs:
            for state in states:
                state.trainable.requires_grad_(True)
            groups = [{"params": [s.trainable for s in states], "lr": lr}]
            if others:
                groups.append({"params": others, "lr": other_lr if other_lr is not None else lr})
            optimizer = torch.optim.Adam(groups)
            result.history += _run_phase(
                model, loader, states, optimizer, phase="quantize", epochs=epochs,
                loss_fn=loss_fn, device=dev, progress=progress,
            )
    finally:
        model.train(was_training)
    finished = [state.finish() for state in states]  # every one, not up to the first False
    exact = all(finished)
    for state in states:
        state.trainable.requires_grad_(False)
        state.trainable.grad = None
        values = state.param.detach()
        result.tensors[state.name] = QuantizedTensor(
            name=state.name,
            method=method,
            bits=state.bits,
            numel=values.numel(),
            levels=int(torch.unique(values).numel()),
            pruned=state.pruned,
            codebook=state.codebook.detach().to("cpu").clone(),
        )
    result.uniform_exact = exact if method == "uniform" else None
    result.pack_options = {
        "method": "kmeans",
        "bits": bits,
        "bias_bits": bias_bits,
        "bit_overrides": overrides,
        "min_numel": min_numel,
        "exclude": exclude + tuple(glob.escape(name) for name in left_out),
    }
    return result
