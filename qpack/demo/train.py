"""Training, evaluation, retraining and trained quantization for the seed network.

The recipe is the seed's: Adam (learning rate 0.001), batches of 100, cross-entropy plus
an L1 term ``0.001 * sum |w|`` over every parameter. Shuffling uses its own seeded
generator so a run is reproducible.

Trained quantization follows Han et al., "Deep Compression" (ICLR 2016): every quantized
tensor is ``centroids[index]``; the assignments ``index`` stay fixed and each centroid is
trained with the sum of its members' gradients (one ``index_add_`` per tensor).
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
    "Codebook",
    "EpochStats",
    "TrainConfig",
    "codebooks_from_state_dict",
    "evaluate",
    "l1_penalty",
    "seed_everything",
    "train",
    "train_centroids",
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


@dataclass
class Codebook:
    """A parameter written as ``centroids[index]``.

    Attributes:
        centroids: ``(k,)`` float32, trained.
        index: ``(numel,)`` int64 assignments, fixed.
    """

    centroids: torch.Tensor
    index: torch.Tensor


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
    after_backward: Callable[[], None] | None,
    after_step: Callable[[], None] | None,
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
            if after_backward is not None:
                after_backward()
            optimizer.step()
            if after_step is not None:
                after_step()
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
    """Train ``model`` in place with the seed's recipe (a fresh Adam).

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
    return _run_epochs(model, x, y, epochs, optimizer, config, generator, None, None, label, log)


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


def codebooks_from_state_dict(
    model: nn.Module, state_dict: dict[str, torch.Tensor], max_levels: int
) -> dict[str, Codebook]:
    """Find the parameters of ``state_dict`` that hold at most ``max_levels`` distinct values.

    For a state dict loaded from a k-means ``.qpk`` file these are the quantized tensors;
    their distinct values become the centroids and the positions the fixed assignments.

    Args:
        model: names the parameters (buffers are never clustered).
        state_dict: the quantized weights.
        max_levels: ``2 ** bits``.

    Returns:
        ``{parameter name: Codebook}`` (on the model's device).
    """
    books = {}
    for name, p in model.named_parameters():
        t = state_dict[name].detach().to(device=p.device, dtype=torch.float32).flatten()
        values, inverse = torch.unique(t, return_inverse=True)
        if len(values) <= max_levels:
            books[name] = Codebook(values.clone(), inverse.long())
    return books


def train_centroids(
    model: nn.Module,
    books: dict[str, Codebook],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    lr: float | None = None,
    config: TrainConfig = TrainConfig(),
    label: str = "train centroids",
    log: Log | None = None,
) -> list[EpochStats]:
    """Trained quantization: fixed assignments, each centroid moved by its members' summed gradient.

    The parameters named in ``books`` are set to ``centroids[index]`` and stay so: after
    each backward pass the gradient of every member is summed into its centroid
    (``index_add_``), Adam updates the centroids and the parameters are rewritten from
    them. Parameters not in ``books`` train as usual. BatchNorm running statistics update
    as in ordinary training.

    Args:
        model: the network, holding the quantized weights, on the same device as ``x``.
        books: from :func:`codebooks_from_state_dict`; their centroids are updated in place.
        x: images.
        y: labels.
        epochs: passes over the data.
        seed: seeds the shuffling.
        lr: Adam learning rate for the centroids; default ``config.lr``.
        config: the recipe.
        label: names the run in progress lines.
        log: receives one line per epoch.

    Returns:
        One :class:`EpochStats` per epoch. Afterwards every parameter in ``books`` has at
        most ``len(centroids)`` distinct values.
    """
    named = dict(model.named_parameters())
    pairs = [(named[name], book) for name, book in books.items()]
    free = [p for name, p in named.items() if name not in books]
    for _, book in pairs:
        book.centroids.requires_grad_(True)

    def write_back() -> None:
        with torch.no_grad():
            for p, book in pairs:
                p.copy_(book.centroids[book.index].view_as(p))

    def gather_gradients() -> None:
        for p, book in pairs:
            grad = p.grad.flatten() if p.grad is not None else torch.zeros_like(book.index, dtype=p.dtype)
            book.centroids.grad = torch.zeros_like(book.centroids).index_add_(0, book.index, grad)
            p.grad = None

    groups = [{"params": [book.centroids for _, book in pairs], "lr": lr if lr is not None else config.lr}]
    if free:
        groups.append({"params": free, "lr": config.lr})
    optimizer = torch.optim.Adam(groups)
    write_back()
    generator = torch.Generator().manual_seed(seed)
    try:
        return _run_epochs(model, x, y, epochs, optimizer, config, generator, gather_gradients, write_back, label, log)
    finally:
        for _, book in pairs:
            book.centroids.requires_grad_(False)
            book.centroids.grad = None
