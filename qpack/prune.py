"""Magnitude pruning: zero the smallest weights of a tensor (``--prune FRACTION``)."""

from __future__ import annotations

import numpy as np
import torch

from .errors import InputError

__all__ = ["check_fraction", "prune_smallest"]


def check_fraction(fraction: object, what: str = "prune") -> float:
    """``fraction`` as a float in [0, 1), or an InputError naming ``what``."""
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 <= fraction < 1:
        raise InputError(f"{what} must be a fraction from 0 up to (not including) 1, got {fraction!r}")
    return float(fraction)


def prune_smallest(tensor: torch.Tensor, fraction: float) -> tuple[torch.Tensor, int]:
    """Zero exactly ``round(fraction * numel)`` elements of smallest magnitude.

    Ties at the threshold are broken by position (first ones first), so the result is
    deterministic. Memory: one float32 copy of the magnitudes and the result.

    Returns:
        (a new tensor with those elements set to zero, how many were zeroed).
    """
    check_fraction(fraction)
    flat = tensor.detach().reshape(-1)
    count = int(round(fraction * flat.numel()))
    if count == 0:
        return tensor, 0
    magnitude = flat.abs().to(torch.float32).numpy()
    threshold = np.partition(magnitude, count - 1)[count - 1]
    below = magnitude < threshold
    at_threshold = np.flatnonzero(magnitude == threshold)[: count - int(below.sum())]
    below[at_threshold] = True
    pruned = flat.clone()
    pruned[torch.from_numpy(below)] = 0
    return pruned.view_as(tensor), count
