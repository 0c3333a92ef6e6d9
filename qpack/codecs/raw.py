"""``raw``: the tensor's own bytes, little-endian, C order. Lossless for every dtype."""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["encode", "decode", "split_planes", "join_planes"]


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


def split_planes(data: memoryview | bytes, itemsize: int) -> bytes:
    """Byte planes of elements of ``itemsize`` bytes (spec 2.2, "zstd_planes"): byte j of
    every element, for j = 0 .. itemsize - 1, plane after plane. Float exponents and sign
    bytes vary little along a tensor, so zstd finds them once they are adjacent."""
    array = np.frombuffer(data, dtype=np.uint8)
    return array.reshape(-1, itemsize).T.tobytes()


def join_planes(planes: torch.Tensor, itemsize: int) -> torch.Tensor:
    """The inverse of ``split_planes``, on a 1-D uint8 tensor: the elements' bytes in order."""
    if planes.numel() == 0:
        return planes
    return planes.reshape(itemsize, -1).t().contiguous().reshape(-1)
