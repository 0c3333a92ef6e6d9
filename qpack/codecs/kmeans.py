"""``kmeans``: a codebook of at most 2^b float32 centroids per tensor (or per channel or
group), b-bit indices of the nearest centroid. Reconstruction: ``W = codebook[idx]``, exact
(no arithmetic), then cast to the original dtype.
"""

from __future__ import annotations

import hashlib
import threading
from typing import Any

import numpy as np
import torch

from .lookup import lookup, worth_a_table
from .rows import as_rows, from_rows

__all__ = ["choose_params", "quantize", "dequantize", "as_float16"]


def choose_params(tensor: torch.Tensor, bits: int, rows: int = 1,
                  row_length: int | None = None, keep_zero: bool = False) -> dict[str, torch.Tensor]:
    """Fit one sorted codebook of at most ``2**bits`` centroids per row.

    Rows whose codebooks come out shorter than the longest are padded by repeating their
    last centroid, so the stored codebook is a ``(rows, K)`` float32 matrix. (The padded
    last group repeats its last value, which does not change its codebook.) With
    ``keep_zero`` (pruned weights), each row's codebook is an exact 0 plus at most
    ``2**bits - 1`` centroids fitted to the row's nonzero values.

    Returns:
        ``{"codebook": Tensor[rows, K]}`` in float32.
    """
    view = as_rows(tensor.detach().to("cpu"), rows, row_length).to(torch.float32).numpy()
    # the allocation fits a chosen codebook, then the pack fits it again: the same values give
    # the same codebook, so the last few are kept, keyed by the values' bytes
    key = (hashlib.blake2b(np.ascontiguousarray(view).view(np.uint8), digest_size=16).digest(), view.shape,
           bits, keep_zero)
    with _lock:
        if key in _recent:
            return {"codebook": _recent[key].clone()}
    books = [_fit_row(row, bits, keep_zero) for row in view]
    width = max(len(book) for book in books)
    padded = np.stack([np.pad(book, (0, width - len(book)), mode="edge") for book in books])
    book = torch.from_numpy(padded.astype(np.float32))
    with _lock:
        _recent[key] = book.clone()
        while len(_recent) > _RECENT:
            _recent.pop(next(iter(_recent)))
    return {"codebook": book}


#: codebooks kept (a few: each is at most rows x 2^bits floats)
_RECENT = 16
_recent: dict[tuple[Any, ...], torch.Tensor] = {}
_lock = threading.Lock()


def _fit_row(row: np.ndarray, bits: int, keep_zero: bool) -> np.ndarray:
    from .. import kmeans1d  # numpy only, but needed only when packing

    if not keep_zero:
        return kmeans1d.fit_codebook(row, 1 << bits)
    nonzero = row[row != 0]
    if nonzero.size == 0:
        return np.zeros(1, dtype=np.float32)
    book = kmeans1d.fit_codebook(nonzero, (1 << bits) - 1)
    return np.unique(np.concatenate([book, np.zeros(1, dtype=np.float32)]))


def as_float16(params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor] | None:
    """The codebooks rounded to the nearest float16 values (kept as float32), or None when a
    centroid is beyond float16's range. Indices are then chosen against the rounded centroids."""
    book16 = params["codebook"].numpy().astype(np.float16)
    if not np.isfinite(book16).all():
        return None
    return {"codebook": torch.from_numpy(book16.astype(np.float32))}


def quantize(values: torch.Tensor, params: dict[str, torch.Tensor], bits: int,
             row_length: int | None = None) -> torch.Tensor:
    """Index of the nearest centroid of every element (whole rows), flat int32 in C order."""
    from .. import kmeans1d

    codebook = params["codebook"].numpy()
    view = as_rows(values.detach().to("cpu"), codebook.shape[0], row_length).to(torch.float32).numpy()
    if codebook.shape[0] == 1:
        idx = kmeans1d.assign(view[0], codebook[0])[None, :]
    else:
        idx = np.stack([kmeans1d.assign(row, book) for row, book in zip(view, codebook)])
    return from_rows(torch.from_numpy(idx.astype(np.int32)), values.numel())


def dequantize(indices: torch.Tensor, params: dict[str, torch.Tensor], bits: int,
               shape: tuple[int, ...], dtype: torch.dtype, row_length: int | None = None) -> torch.Tensor:
    """Look every index up in its row's codebook, on the indices' device."""
    codebook = params["codebook"]
    rows, size = codebook.shape
    count = indices.numel()
    if worth_a_table(indices, rows, size):
        return lookup(indices, codebook.to(torch.float32), row_length or -(-count // rows)).reshape(shape).to(dtype)
    idx = as_rows(indices, rows, row_length).to(torch.int32)
    if rows > 1:
        idx = idx + (torch.arange(rows, device=idx.device, dtype=idx.dtype) * size)[:, None]
    values = codebook.reshape(-1).index_select(0, idx.reshape(-1))
    return from_rows(values, count).reshape(shape).to(dtype)
