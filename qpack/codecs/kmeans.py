"""``kmeans``: a codebook of at most 2^b float32 centroids per tensor (or per output
channel), b-bit indices of the nearest centroid. Reconstruction: ``W = codebook[idx]``,
exact (no arithmetic), then cast to the original dtype.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["choose_params", "quantize", "dequantize"]


def choose_params(tensor: torch.Tensor, bits: int, channels: int = 1) -> dict[str, torch.Tensor]:
    """Fit one sorted codebook of at most ``2**bits`` centroids per row.

    Rows whose codebooks come out shorter than the longest are padded by repeating their
    last centroid, so the stored codebook is a ``(channels, K)`` float32 matrix.

    Returns:
        ``{"codebook": Tensor[channels, K]}`` in float32.
    """
    from .. import kmeans1d

    rows = tensor.detach().to("cpu", torch.float32).reshape(channels, -1).numpy()
    books = [kmeans1d.fit_codebook(row, 1 << bits) for row in rows]
    width = max(len(book) for book in books)
    padded = np.stack([np.pad(book, (0, width - len(book)), mode="edge") for book in books])
    return {"codebook": torch.from_numpy(padded.astype(np.float32))}


def quantize(tensor: torch.Tensor, params: dict[str, torch.Tensor], bits: int) -> torch.Tensor:
    """Index of the nearest centroid of every element, flat int32 in C order."""
    from .. import kmeans1d

    codebook = params["codebook"].numpy()
    rows = tensor.detach().to("cpu", torch.float32).reshape(codebook.shape[0], -1).numpy()
    idx = np.stack([kmeans1d.assign(row, book) for row, book in zip(rows, codebook)])
    return torch.from_numpy(idx.astype(np.int32).reshape(-1))


def dequantize(
    indices: torch.Tensor,
    params: dict[str, torch.Tensor],
    bits: int,
    shape: tuple[int, ...],
    dtype: torch.dtype,
) -> torch.Tensor:
    """Look every index up in its row's codebook, on the indices' device."""
    codebook = params["codebook"]
    channels, width = codebook.shape
    flat_book = codebook.reshape(-1)
    idx = indices.reshape(channels, -1).to(torch.int32)
    if channels > 1:
        idx = idx + (torch.arange(channels, device=idx.device, dtype=idx.dtype) * width)[:, None]
    return flat_book.index_select(0, idx.reshape(-1)).reshape(shape).to(dtype)
