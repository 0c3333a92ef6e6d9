"""Training, evaluation and retraining for the demo's networks, and the batches they use.

The recipe is the seed's: Adam (learning rate 0.001), batches of 100, cross-entropy plus
an L1 term ``0.001 * sum |w|`` over every parameter. Shuffling uses its own seeded
generator so a run is reproducible.

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
    "EpochStats",
    "ShuffledBatches",
    "TrainConfig",
    "evaluate",
    "l1_penalty",
    "seed_everything",
    "train",
]

Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe (defaults: the seed's).

    Attributes:
        lr: Adam learning rate.
        batch_size: images per step.
        l1: weight of the ``sum |w|`` term.
        progress_bar: show a tqdm bar per epoch (when tqdm is installed).
    """

    lr: float = 1e-3
    batch_size: int = 100
    l1: float = 1e-3
    progress_bar: bool = False


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
        progress_bar: show a tqdm bar per pass (when tqdm is installed).
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
    except ImportError:
        return None
    return tqdm(total=total, desc=desc, leave=False, file=sys.stdout)


def _run_epochs(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    epochs: int,
    optimizer: torch.optim.Optimizer,
    config: TrainConfig,
    generator: torch.Generator,
    label: str,
    log: Log | None,
) -> list[EpochStats]:
    stats = []
    params = list(model.parameters())
    for epoch in range(1, epochs + 1):
        model.train()
        start = time.perf_counter()
        batches = _batches(len(y), config.batch_size, generator, x.device)
        bar = _bar(len(batches), f"{label} {epoch}/{epochs}", config.progress_bar)
        loss_sum = torch.zeros((), device=x.device)
        correct = torch.zeros((), dtype=torch.long, device=x.device)
        for idx in batches:
            xb, yb = x[idx], y[idx]
            logits = model(xb)
            loss = F.cross_entropy(logits, yb) + config.l1 * l1_penalty(params)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
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
    config: TrainConfig = TrainConfig(),
    label: str = "train",
    log: Log | None = None,
) -> list[EpochStats]:
    """Train ``model`` in place with the seed's recipe (a fresh Adam and L1).

    Used both for the first training and for retraining after quantization (load the
    quantized weights first; the result is again full precision).

    Args:
        model: the network, on the same device as ``x``.
        x: images ``(N, 1, 28, 28)`` in [0, 1].
        y: labels ``(N,)``.
        epochs: passes over the data.
        seed: seeds the shuffling.
        config: the recipe.
        label: names the run in progress lines.
        log: receives one line per epoch.

    Returns:
        One :class:`EpochStats` per epoch.
    """
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    return _run_epochs(model, x, y, epochs, optimizer, config, generator, label, log)


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
