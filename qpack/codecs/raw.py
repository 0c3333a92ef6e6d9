"""``raw``: the tensor's own bytes, little-endian, C order. Lossless for every dtype."""

from __future__ import annotations

import torch

__all__ = ["encode", "decode"]


def encode(tensor: torch.Tensor) -> memoryview:
    """The tensor's bytes in C order (a view when the tensor is already contiguous on CPU)."""
    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return memoryview(flat.view(torch.uint8).numpy())


def decode(data: torch.Tensor, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    """Rebuild a tensor from its raw bytes (a 1-D uint8 tensor of the exact length)."""
    if data.numel() == 0:
        return torch.empty(shape, dtype=dtype, device=data.device)
    return data.view(dtype).reshape(shape)
