"""Magnitude pruning: zero the smallest weights of a tensor (``--prune FRACTION``)."""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

__all__ = ["check_fraction", "keep_mask", "prune_smallest"]


def check_fraction(fraction: object, what: str = "prune") -> float:
    """``fraction`` as a float in [0, 1), or an InputError naming ``what``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise InputError(f"{what} must be a fraction from 0 up to (not including) 1, got {fraction!r}")
    return float(fraction)


def keep_mask(tensor: torch.Tensor, fraction: float) -> torch.Tensor:
    """The elements that survive pruning the smallest ``|tensor|`` ``fraction``.

    Exactly ``round(fraction * numel)`` elements are pruned: those of smallest magnitude,
    ties at the threshold broken by position (first ones first), so the mask is
    deterministic. Memory: one float32 copy of the magnitudes (on the CPU).

    Returns:
        A bool tensor of ``tensor``'s shape and device, True where the element is kept.
    """
    check_fraction(fraction)
    flat = tensor.detach().reshape(-1)
    count = int(round(fraction * flat.numel()))
    keep = np.ones(flat.numel(), dtype=bool)
    if count:
        magnitude = flat.abs().to("cpu", torch.float32).numpy()
        threshold = np.partition(magnitude, count - 1)[count - 1]
        below = magnitude < threshold
        at_threshold = np.flatnonzero(magnitude == threshold)[: count - int(below.sum())]
        below[at_threshold] = True
        keep = ~below
    return torch.from_numpy(keep).to(tensor.device).view(tensor.shape)


def prune_smallest(tensor: torch.Tensor, fraction: float) -> tuple[torch.Tensor, int]:
    """Zero the elements :func:`keep_mask` drops.

    Returns:
        (a new tensor with those elements set to zero, how many were zeroed).
    """
    keep = keep_mask(tensor, fraction)
    pruned = int(keep.numel() - keep.sum())
    if pruned == 0:
        return tensor, 0
    return tensor.detach().where(keep, torch.zeros((), dtype=tensor.dtype)), pruned
