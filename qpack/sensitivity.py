"""Sensitivity weights from calibration batches: what each tensor's quantization error costs in loss.

Near a trained point, a small change dW of the weights raises the loss by about
1/2 * sum_i F_i * dW_i^2, with F the diagonal of the Fisher information (the expected squared
gradient of the loss). Quantization noise spreads over a whole tensor, so for one tensor this
is about 1/2 * mean(F) * ||dW||^2 = 1/2 * mean(F) * mean(W^2) * rel_rms^2 * numel, where
rel_rms is the error's RMS over the tensor's RMS. A weight of mean(F) * mean(W^2) thus makes
the allocator's cost, weight * numel * rel_rms^2, proportional to the loss increase
(qpack.allocate), so ``pack(..., sensitivity=...)`` spends bits where the loss feels them.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable
from numbers import Real
from pathlib import Path
from typing import Any

import torch

from .errors import InputError

__all__ = ["measure_sensitivity", "load_sensitivity", "save_sensitivity", "MIN_WEIGHT", "FILE_KIND"]

#: the "kind" of a sensitivity file (JSON: {"kind": FILE_KIND, "version": 1, "weights": {name: weight}})
FILE_KIND = "qpack.sensitivity"

#: the least weight, as a fraction of the mean: a tensor the batches do not reach (or whose
#: gradient vanishes on them) still costs something, so it is not cut to one bit for free
MIN_WEIGHT = 1e-3


def measure_sensitivity(model: torch.nn.Module, batches: Iterable[tuple[Any, Any]],
                        loss_fn: Callable[[Any, Any], torch.Tensor], *,
                        path: str | os.PathLike[str] | None = None) -> dict[str, float]:
    """Sensitivity weights of a model's parameters, from the gradients on calibration batches.

    Runs ``loss_fn(model(inputs), targets)`` on each batch in eval mode (no dropout; BatchNorm
    uses and keeps its running statistics) and accumulates each parameter's squared gradient,
    a diagonal Fisher estimate. A tensor's weight is mean(F) * mean(W^2), so that
    weight * numel * rel_rms^2 approximates twice the loss increase its quantization error
    causes. Batches of one sample give the empirical Fisher; larger batches cost less and
    estimate it up to a common factor, which the normalisation removes. Pass the result to
    ``qpack.pack(..., sensitivity=weights)`` with ``target_bpw`` or ``max_error``.

    The model is left as it was: its train/eval mode (module by module), ``requires_grad``
    flags, ``.grad`` fields, weights and buffers. Frozen parameters are measured too.

    Args:
        model: the network, on any device; tensors in a batch are moved to the device of its
            first parameter (anything else in a batch is passed as it is).
        batches: an iterable of ``(inputs, targets)`` pairs; ``model(inputs)`` is called.
        loss_fn: ``loss_fn(outputs, targets)`` -> a scalar tensor, e.g.
            ``torch.nn.functional.cross_entropy``.
        path: also write the weights there as JSON (:func:`save_sensitivity`), for
            ``qpack pack --sensitivity FILE.json``.

    Returns:
        ``{state_dict name: weight}`` for every floating-point parameter (tied parameters
        under each of their names), with mean 1 over the names and none below about
        ``MIN_WEIGHT``.

    Raises:
        InputError: no batches, a batch that is not a pair, a loss that is not a finite
            scalar depending on the parameters, or a gradient that is zero everywhere.
    """
    named = [(name, p) for name, p in model.named_parameters(remove_duplicate=False) if p.is_floating_point()]
    if not named:
        raise InputError("the model has no floating-point parameters to measure")
    params = list({id(p): p for _, p in named}.values())
    modes = [(module, module.training) for module in model.modules()]
    requires = [p.requires_grad for p in params]
    try:
        model.eval()
        for p in params:
            p.requires_grad_(True)
        squares, count = _squared_gradients(model, params, batches, loss_fn)
    finally:  # attributes, not .train(): that would also reset the children
        for module, training in modes:
            module.training = training
        for p, flag in zip(params, requires):
            p.requires_grad_(flag)
    with torch.no_grad():
        raw = {id(p): squares[i] / (count * p.numel()) * float(p.float().square().mean())
               for i, p in enumerate(params)}
    weights = [raw[id(p)] for _, p in named]
    if not all(math.isfinite(w) for w in weights):
        raise InputError("the gradients on the calibration batches are not finite")
    mean = sum(weights) / len(weights)
    if mean == 0:
        raise InputError("the loss's gradient is zero for every parameter on these batches; "
                         "sensitivity cannot be measured from them")
    floored = [max(w, MIN_WEIGHT * mean) for w in weights]
    scale = len(floored) / sum(floored)
    result = {name: w * scale for (name, _), w in zip(named, floored)}
    if path is not None:
        save_sensitivity(result, path)
    return result


def save_sensitivity(weights: dict[str, float], path: str | os.PathLike[str]) -> Path:
    """Write sensitivity weights as the JSON file ``qpack pack --sensitivity`` reads (atomically)."""
    from .writer import atomic_output

    path = Path(path)
    text = json.dumps({"kind": FILE_KIND, "version": 1, "weights": _checked(weights, str(path))}, indent=1,
                      sort_keys=True)
    with atomic_output(path, overwrite=True) as handle:
        handle.write(text.encode() + b"\n")
    return path


def load_sensitivity(path: str | os.PathLike[str]) -> dict[str, float]:
    """Read a sensitivity file written by :func:`save_sensitivity` (or ``measure_sensitivity(path=)``).

    Raises:
        InputError: a missing or unreadable file, not JSON, not a sensitivity file, or a weight
            that is not a finite number >= 0 (one line, naming the file).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: no such sensitivity file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"{path}: cannot read the sensitivity file ({getattr(exc, 'strerror', None) or exc})") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise InputError(f"{path}: not a JSON sensitivity file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("kind") != FILE_KIND or not isinstance(doc.get("weights"), dict):
        raise InputError(f"{path}: not a qpack sensitivity file (expected a JSON object with \"kind\": "
                         f"\"{FILE_KIND}\" and \"weights\"; write one with qpack.measure_sensitivity(..., path=...))")
    if doc.get("version") != 1:
        raise InputError(f"{path}: sensitivity file version {doc.get('version')!r}; this qpack reads version 1")
    return _checked(doc["weights"], str(path))


def _checked(weights: dict[Any, Any], where: str) -> dict[str, float]:
    for name, weight in weights.items():
        if not isinstance(name, str) or isinstance(weight, bool) or not isinstance(weight, Real) \
                or not math.isfinite(weight) or weight < 0:
            raise InputError(f"{where}: the sensitivity of {name!r} must be a finite number >= 0, got {weight!r}")
    if not weights:
        raise InputError(f"{where}: the sensitivity file names no tensor")
    return {name: float(weight) for name, weight in weights.items()}


def _squared_gradients(model: torch.nn.Module, params: list[torch.nn.Parameter],
                       batches: Iterable[tuple[Any, Any]],
                       loss_fn: Callable[[Any, Any], torch.Tensor]) -> tuple[list[float], int]:
    """Per parameter, the sum over batches of its squared gradient's sum; and the batch count."""
    device = params[0].device
    sums = [torch.zeros((), device=p.device) for p in params]
    count = 0
    with torch.enable_grad():
        for batch in batches:
            if not isinstance(batch, (tuple, list)) or len(batch) != 2:
                raise InputError(f"each calibration batch must be an (inputs, targets) pair, got {type(batch).__name__}")
            inputs, targets = (x.to(device) if isinstance(x, torch.Tensor) else x for x in batch)
            loss = loss_fn(model(inputs), targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise InputError("loss_fn must return a scalar tensor that depends on the model's parameters")
            # autograd.grad, not backward(): the parameters' .grad fields stay untouched
            grads = torch.autograd.grad(loss.reshape(()), params, allow_unused=True)
            for i, grad in enumerate(grads):
                if grad is not None:  # None: the loss does not reach this parameter
                    sums[i] += grad.detach().float().square().sum()
            count += 1
    if not count:
        raise InputError("no calibration batches were given")
    return [float(total) for total in sums], count
