"""Parameter rows: how a flat run of elements lines up with its parameter sets.

Row ``r`` covers elements ``r * row_length`` up to the next row; only the last row of a
tensor stored per group may be shorter. Codecs work on a ``(rows, row_length)`` view; a short
last row is padded for the arithmetic and the padding cut off afterwards.
"""

from __future__ import annotations

import torch

__all__ = ["as_rows", "from_rows"]


def as_rows(flat: torch.Tensor, rows: int, row_length: int | None) -> torch.Tensor:
    """``flat`` (1-D) as ``(rows, row_length)``; a short last row is padded with its last value."""
    flat = flat.reshape(-1)
    if row_length is None:
        return flat.reshape(rows, -1)
    missing = rows * row_length - flat.numel()
    if missing == 0:
        return flat.reshape(rows, row_length)
    return torch.cat([flat, flat[-1:].expand(missing)]).reshape(rows, row_length)


def from_rows(values: torch.Tensor, count: int) -> torch.Tensor:
    """The first ``count`` elements of a row view, flat."""
    flat = values.reshape(-1)
    return flat if flat.numel() == count else flat[:count]
