"""Training, evaluation and retraining for the demo's networks, and the batches they use.

Two recipes (:class:`TrainConfig`): the seed's (:data:`SEED_RECIPE`: Adam at 0.001,
batches of 100, cross-entropy plus an L1 term ``0.001 * sum |w|`` over every parameter) and
Caffe's LeNet solver (:data:`CAFFE_LENET_RECIPE`: SGD with momentum 0.9, learning rate 0.01
with the "inv" policy, weight decay 5e-4, batches of 64, biases at twice the rate, no L1),
with which LeNet-300-100 and LeNet-5 are trained in Deep Compression. Shuffling uses its own
seeded generator so a run is reproducible. :func:`train` takes ``masks`` to retrain a pruned
network with its pruned weights held at zero.

Trained quantization (Han et al., "Deep Compression") is :func:`qpack.finetune.finetune`;
:class:`ShuffledBatches` is the loader the demo gives it.
"""

from __future__ import annotations

import random
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "CAFFE_LENET_RECIPE",
    "SEED_RECIPE",
    "EpochStats",
    "ShuffledBatches",
    "TrainConfig",
    "evaluate",
    "predict",
    "l1_penalty",
    "make_optimizer",
    "random_shift",
    "seed_everything",
    "train",
]

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    """A training recipe (defaults: the seed's).

    Attributes:
        lr: base learning rate.
        batch_size: images per step.
        l1: weight of the ``sum |w|`` term.
        optimizer: ``"adam"`` or ``"sgd"``.
        momentum: SGD momentum.
        weight_decay: L2 weight decay (SGD's, as in Caffe: added to the gradient).
        lr_policy: ``"fixed"``, or Caffe's ``"inv"``: ``lr * (1 + gamma * step) ** -power``
            after ``step`` optimizer steps.
        gamma: the ``inv`` policy's gamma.
        power: the ``inv`` policy's power.
        bias_lr_mult: learning-rate multiplier of 1-D parameters (Caffe's LeNet: 2).
        shift: augment each training image by a random shift of up to this many pixels in
            each direction (0: none; the demo's recipe for scikit-learn's digits uses it).
        progress_bar: show a tqdm bar per epoch.
    """

    lr: float = 1e-3
    batch_size: int = 100
    l1: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_policy: str = "fixed"
    gamma: float = 1e-4
    power: float = 0.75
    bias_lr_mult: float = 1.0
    shift: int = 0
    progress_bar: bool = False

    def __post_init__(self) -> None:
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"unknown optimizer {self.optimizer!r}; choose adam or sgd")
        if self.lr_policy not in ("fixed", "inv"):
            raise ValueError(f"unknown lr_policy {self.lr_policy!r}; choose fixed or inv")

    def describe(self) -> str:
        """One line, e.g. ``SGD momentum 0.9, lr 0.01 (inv), weight decay 0.0005, batch 64``."""
        if self.optimizer == "adam":
            text = f"Adam, lr {self.lr:g}"
        else:
            text = f"SGD momentum {self.momentum:g}, lr {self.lr:g}"
        if self.lr_policy == "inv":
            text += f' ("inv": gamma {self.gamma:g}, power {self.power:g})'
        if self.weight_decay:
            text += f", weight decay {self.weight_decay:g}"
        if self.bias_lr_mult != 1.0:
            text += f", biases x{self.bias_lr_mult:g} lr"
        text += f", batch {self.batch_size}"
        text += f", L1 {self.l1:g} * sum|w|" if self.l1 else ", no L1"
        return text + (f", random shifts of up to {self.shift} px" if self.shift else "")


#: the seed experiment's recipe
SEED_RECIPE = TrainConfig()
#: Caffe's ``lenet_solver.prototxt`` (and Deep Compression's LeNets): SGD, momentum 0.9, lr
#: 0.01 with the "inv" policy (gamma 1e-4, power 0.75), weight decay 5e-4, batch 64, biases
#: at twice the learning rate (``lr_mult: 2``), no L1
CAFFE_LENET_RECIPE = TrainConfig(
    lr=0.01, batch_size=64, l1=0.0, optimizer="sgd", momentum=0.9, weight_decay=5e-4, lr_policy="inv",
    bias_lr_mult=2.0,
)


@dataclass(frozen=True)
class EpochStats:
    """What one epoch did: mean loss, accuracy on its own batches, seconds."""

    epoch: int
    loss: float
    train_accuracy: float
    seconds: float


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators.

    Args:
        seed: the seed.
    """
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def l1_penalty(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum |w|`` over all elements of all ``params`` (a sum, not a mean, as in the seed)."""
    return torch.stack([p.abs().sum() for p in params]).sum()


def _batches(n: int, batch_size: int, generator: torch.Generator, device: torch.device) -> list[torch.Tensor]:
    order = torch.randperm(n, generator=generator).to(device)
    return list(order.split(batch_size))


class ShuffledBatches:
    """``(x[idx], y[idx])`` batches in a new seeded order on every pass: a loader for :func:`qpack.finetune.finetune`.

    The order of each pass comes from one generator seeded once, as in :func:`train`, so a
    run is reproducible and successive epochs differ.

    Args:
        x: images, on the device to train on.
        y: labels.
        batch_size: images per batch (the last may be smaller).
        seed: seeds the shuffling.
        label: names the progress bar.
        progress_bar: show a tqdm bar per pass.
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        batch_size: int,
        seed: int,
        *,
        label: str = "batches",
        progress_bar: bool = False,
    ) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size
        self.generator = torch.Generator().manual_seed(seed)
        self.label, self.progress_bar = label, progress_bar
        self.passes = 0

    def __len__(self) -> int:
        return (len(self.y) + self.batch_size - 1) // self.batch_size

    def __iter__(self):  # type: ignore[no-untyped-def]
        self.passes += 1
        batches = _batches(len(self.y), self.batch_size, self.generator, self.x.device)
        bar = _bar(len(batches), f"{self.label} {self.passes}", self.progress_bar)
        for idx in batches:
            yield self.x[idx], self.y[idx]
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()


def _bar(total: int, desc: str, enabled: bool):  # type: ignore[no-untyped-def]
    if not enabled:
        return None
    try:
        from tqdm import tqdm
    except ImportError:  # a dependency, but an install without it still runs
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stdout)


def random_shift(x: torch.Tensor, pixels: int, generator: torch.Generator) -> torch.Tensor:
    """Each image of ``x`` ``(N, C, H, W)`` moved by its own random ``(dy, dx)`` in ``[-pixels, pixels]``, zero-filled.

    One gather over the zero-padded batch (no loop over images).

    Args:
        x: images.
        pixels: the largest shift.
        generator: draws the shifts (on the CPU).

    Returns:
        A new tensor of ``x``'s shape.
    """
    n, _, h, w = x.shape
    dy = torch.randint(-pixels, pixels + 1, (n,), generator=generator).to(x.device)
    dx = torch.randint(-pixels, pixels + 1, (n,), generator=generator).to(x.device)
    padded = F.pad(x, (pixels, pixels, pixels, pixels))
    rows = torch.arange(h, device=x.device)[None, :] + pixels - dy[:, None]  # (n, h)
    cols = torch.arange(w, device=x.device)[None, :] + pixels - dx[:, None]  # (n, w)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


def make_optimizer(
    model: nn.Module, config: TrainConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """The recipe's optimizer over ``model``'s parameters and its per-step schedule.

    Args:
        model: the network.
        config: the recipe.

    Returns:
        ``(optimizer, scheduler)``; call ``scheduler.step()`` after every optimizer step.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    weights = [p for p in params if p.dim() > 1]
    biases = [p for p in params if p.dim() <= 1]
    groups = [{"params": weights, "lr": config.lr}]
    if biases:
        groups.append({"params": biases, "lr": config.lr * config.bias_lr_mult})
    if config.optimizer == "adam":
        optimizer: torch.optim.Optimizer = torch.optim.Adam(groups, lr=config.lr, weight_decay=config.weight_decay)
    else:
        optimizer = torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.lr_policy == "inv":
        gamma, power = config.gamma, config.power
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: (1.0 + gamma * step) ** -power)
    else:
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return optimizer, scheduler


def _run_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LambdaLR,
    config: TrainConfig,
    generator: torch.Generator,
    label: str,
    log: Log | None,
    masks: dict[str, torch.Tensor],
) -> list[EpochStats]:
    stats = []
    params = list(model.parameters())
    named = dict(model.named_parameters())
    held = [(named[name], keep.to(x.device)) for name, keep in masks.items()]
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        batches = _batches(len(y), config.batch_size, generator, x.device)
        bar = _bar(len(batches), f"{label} {epoch}/{epochs}", config.progress_bar)
        loss_sum = torch.zeros((), device=x.device)
        correct = torch.zeros((), dtype=torch.long, device=x.device)
        for idx in batches:
            xb, yb = x[idx], y[idx]
            if config.shift:
                xb = random_shift(xb, config.shift, generator)
            logits = model(xb)
            loss = F.cross_entropy(logits, yb) + config.l1 * l1_penalty(params)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            for p, keep in held:  # pruned weights get no gradient ...
                p.grad.mul_(keep)
            optimizer.step()
            scheduler.step()
            if held:
                with torch.no_grad():  # ... and stay exactly zero (weight decay, momentum)
                    for p, keep in held:
                        p.mul_(keep)
            loss_sum += loss.detach() * len(idx)
            correct += (logits.detach().argmax(1) == yb).sum()
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        s = EpochStats(epoch, loss_sum.item() / len(y), correct.item() / len(y), time.perf_counter() - start)
        stats.append(s)
        if log is not None:
            log(
                f"  {label} epoch {epoch}/{epochs}: loss {s.loss:.4f}, "
                f"train accuracy {100 * s.train_accuracy:.2f} %, {s.seconds:.1f} s"
            )
    return stats


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    config: TrainConfig = SEED_RECIPE,
    label: str = "train",
    log: Log | None = None,
    masks: dict[str, torch.Tensor] | None = None,
) -> list[EpochStats]:
    """Train ``model`` in place with a recipe (a fresh optimizer and schedule).

    Used for the first training, for retraining after quantization (load the quantized
    weights first; the result is again full precision) and, with ``masks``, for retraining
    a pruned network.

    Args:
        model: the network, on the same device as ``x``.
        x: images ``(N, 1, 28, 28)`` in [0, 1].
        y: labels ``(N,)``.
        epochs: passes over the data.
        seed: seeds the shuffling.
        config: the recipe.
        label: names the run in progress lines.
        log: receives one line per epoch.
        masks: ``{parameter name: bool keep mask}``: those parameters are multiplied by
            their mask first and their masked elements stay zero.

    Returns:
        One :class:`EpochStats` per epoch.
    """
    masks = dict(masks or {})
    if masks:
        named = dict(model.named_parameters())
        with torch.no_grad():
            for name, keep in masks.items():
                named[name].mul_(keep.to(named[name].device))
    generator = torch.Generator().manual_seed(seed)
    optimizer, scheduler = make_optimizer(model, config)
    return _run_epochs(model, x, y, epochs, optimizer, scheduler, config, generator, label, log, masks)


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 2000) -> torch.Tensor:
    """The predicted class of each image (``model`` in eval mode), on the CPU.

    Args:
        model: the network, on the same device as ``x``.
        x: images.
        batch_size: images per forward pass.

    Returns:
        int64 ``(len(x),)``.
    """
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(xb).argmax(1).cpu() for xb in x.split(batch_size)])


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 2000) -> float:
    """Accuracy of ``model`` (in eval mode) on ``x``, ``y``.

    Args:
        model: the network, on the same device as ``x``.
        x: images.
        y: labels.
        batch_size: images per forward pass.

    Returns:
        Correct predictions / ``len(y)``, in [0, 1].
    """
    model.eval()
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    with torch.inference_mode():
        for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
            correct += (model(xb).argmax(1) == yb).sum()
    return correct.item() / len(y)
