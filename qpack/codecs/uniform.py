"""``uniform``: min/max per tensor, per output channel or per group, b-bit indices.

Reconstruction (spec section 3.2), every step in float32 and rounded:

    step = fl32(fl32(max - min) / fl32(2^b - 1))
    W    = fl32(min + fl32(step * idx))

The encoder picks ``idx = clamp(round((w - min) / step), 0, 2^b - 1)``; a constant row
(``min == max``) has step 0 and every index 0.
"""

from __future__ import annotations

import torch

from .rows import as_rows, from_rows

__all__ = ["choose_params", "quantize", "dequantize", "step_of"]


def step_of(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 grid step per row, computed exactly as the spec states, on ``lo``'s device.

    The division runs on the CPU: CUDA divides a tensor by a scalar as a multiplication by
    the scalar's reciprocal, which can round differently from a true division.
    """
    step = (hi.cpu() - lo.cpu()) / float((1 << bits) - 1)
    return step.to(lo.device)


def choose_params(tensor: torch.Tensor, bits: int, rows: int = 1,
                  row_length: int | None = None) -> dict[str, torch.Tensor]:
    """Per-row float32 min and max of ``tensor`` (flattened in C order).

    Args:
        tensor: a finite floating tensor with at least one element.
        bits: index width (unused for the choice, kept for a uniform codec signature).
        rows: number of parameter sets: 1 per tensor, ``shape[0]`` per channel, or the number
            of groups.
        row_length: elements per row when rows are groups (the last may be shorter).

    Returns:
        ``{"min": Tensor[rows], "max": Tensor[rows]}`` in float32.
    """
    view = as_rows(tensor, rows, row_length)  # min and max are exact in any dtype: no float32 copy
    return {"min": view.amin(dim=1).to(torch.float32), "max": view.amax(dim=1).to(torch.float32)}


def quantize(values: torch.Tensor, params: dict[str, torch.Tensor], bits: int,
             row_length: int | None = None) -> torch.Tensor:
    """Nearest grid index of every element of ``values`` (whole rows), flat int32 in C order."""
    lo, hi = params["min"], params["max"]
    step = step_of(lo, hi, bits)
    constant = step == 0
    safe_step = torch.where(constant, torch.ones_like(step), step)
    idx = as_rows(values, lo.numel(), row_length).to(torch.float32) - lo[:, None]  # a new tensor
    idx.div_(safe_step[:, None]).round_().clamp_(0, (1 << bits) - 1)
    if bool(constant.any()):
        idx[constant] = 0
    return from_rows(idx.to(torch.int32), values.numel())


def dequantize(indices: torch.Tensor, params: dict[str, torch.Tensor], bits: int,
               shape: tuple[int, ...], dtype: torch.dtype, row_length: int | None = None) -> torch.Tensor:
    """Rebuild the tensor from its indices on the indices' device (two roundings, no FMA)."""
    lo, hi = params["min"], params["max"]
    step = step_of(lo, hi, bits)
    count = indices.numel()
    values = as_rows(indices, lo.numel(), row_length).to(torch.float32)
    values.mul_(step[:, None])
    values.add_(lo[:, None])
    return from_rows(values, count).reshape(shape).to(dtype)
