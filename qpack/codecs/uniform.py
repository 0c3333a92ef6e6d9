"""``uniform``: min/max per tensor or per output channel, b-bit indices.

Reconstruction (spec section "Encoding uniform"), every step in float32 and rounded:

    step = fl32(fl32(max - min) / fl32(2^b - 1))
    W    = fl32(min + fl32(step * idx))

The encoder picks ``idx = clamp(round((w - min) / step), 0, 2^b - 1)``; a constant row
(``min == max``) has step 0 and every index 0.
"""

from __future__ import annotations

import torch

__all__ = ["choose_params", "quantize", "dequantize", "step_of"]


def _rows(tensor: torch.Tensor, channels: int) -> torch.Tensor:
    return tensor.reshape(channels, -1).to(torch.float32)


def step_of(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> torch.Tensor:
    """The float32 grid step per row, computed exactly as the spec states, on ``lo``'s device.

    The division runs on the CPU: CUDA divides a tensor by a scalar as a multiplication by
    the scalar's reciprocal, which can round differently from a true division.
    """
    step = (hi.cpu() - lo.cpu()) / float((1 << bits) - 1)
    return step.to(lo.device)


def choose_params(tensor: torch.Tensor, bits: int, channels: int = 1) -> dict[str, torch.Tensor]:
    """Per-row float32 min and max of ``tensor`` viewed as ``(channels, -1)``.

    Args:
        tensor: a finite floating tensor with at least one element.
        bits: index width (unused for the choice, kept for a uniform codec signature).
        channels: 1 for per-tensor, ``shape[0]`` for per-output-channel.

    Returns:
        ``{"min": Tensor[channels], "max": Tensor[channels]}`` in float32.
    """
    rows = tensor.reshape(channels, -1)  # min and max are exact in any dtype: no float32 copy
    return {"min": rows.amin(dim=1).to(torch.float32), "max": rows.amax(dim=1).to(torch.float32)}


def quantize(tensor: torch.Tensor, params: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Nearest grid index of every element, as a flat int32 tensor in C order."""
    lo, hi = params["min"], params["max"]
    channels = lo.numel()
    step = step_of(lo, hi, bits)
    constant = step == 0
    safe_step = torch.where(constant, torch.ones_like(step), step)
    idx = _rows(tensor, channels) - lo[:, None]  # a new tensor: the caller's is never touched
    idx.div_(safe_step[:, None]).round_().clamp_(0, (1 << bits) - 1)
    if bool(constant.any()):
        idx[constant] = 0
    return idx.to(torch.int32).reshape(-1)


def dequantize(
    indices: torch.Tensor,
    params: dict[str, torch.Tensor],
    bits: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Rebuild the tensor from its indices on the indices' device (two roundings, no FMA)."""
    lo, hi = params["min"], params["max"]
    channels = lo.numel()
    step = step_of(lo, hi, bits)
    values = indices.reshape(channels, -1).to(torch.float32)
    values.mul_(step[:, None])
    values.add_(lo[:, None])
    return values.reshape(shape).to(dtype)
