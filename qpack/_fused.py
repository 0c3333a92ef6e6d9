"""Fused dequantizing matmuls for small batches on the CPU (numba, optional).

- ``int8_matmul``: ``y[m, n] = scale[n] * sum_k x[m, k] * s[n, k] + offset[n] * sum_k x[m, k]``
  for int8 ``s`` (uniform, per tensor or channel): the int8 weights are read once, a quarter
  of the fp32 weight's memory traffic, and never turned into floats in memory.
  ``torch._weight_int8pack_mm`` computes the same sum 3-5 times slower than the fp32 matmul
  with fp32 activations on this machine (tests/benchmarks/bench_packed.py).
- ``decode_matmul``: any byte or nibble container (uniform or k-means, any granularity):
  each weight row is rebuilt into a float buffer that stays in the L1 cache, takes its dot
  products with every activation row, and is dropped.

Only imported when numba is installed (``pip install qpack[fast]``); without it the packed
layers use ``torch._weight_int8pack_mm``.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

__all__ = ["int8_matmul", "decode_matmul", "MAX_ROWS", "THREADS"]

#: batch rows up to which the fused kernel is used; above, the weight is rebuilt and the BLAS
#: matmul (blocked for cache reuse) wins
MAX_ROWS = 64

_BLOCK = 16  # output rows per parallel task: one float buffer per task, not per row

#: numba threads per call. numba's pool is not torch's: on this 2-core machine both pools
#: spinning on the same cores made a 2-thread kernel slower than a 1-thread one (10.7 ms
#: against 28 ms for 4096 x 4096 at batch 1, fp32 F.linear 20 ms); raise it where the
#: cores are idle
THREADS = 1


@njit(parallel=True, fastmath=True, boundscheck=False, error_model="numpy", cache=True)
def _matmul(x: np.ndarray, s: np.ndarray, scale: np.ndarray, offset: np.ndarray, out: np.ndarray) -> None:  # pragma: no cover - compiled
    rows, inner = x.shape
    outputs = s.shape[0]
    sums = np.empty(rows, np.float32)
    for m in range(rows):
        total = np.float32(0)
        for k in range(inner):
            total += x[m, k]
        sums[m] = total
    for block in prange((outputs + _BLOCK - 1) // _BLOCK):
        buffer = np.empty(inner, np.float32)
        for n in range(block * _BLOCK, min(outputs, (block + 1) * _BLOCK)):
            if rows == 1:
                acc = np.float32(0)
                for k in range(inner):
                    acc += x[0, k] * np.float32(s[n, k])
                out[0, n] = scale[n] * acc + offset[n] * sums[0]
                continue
            for k in range(inner):
                buffer[k] = np.float32(s[n, k])
            for m in range(rows):
                acc = np.float32(0)
                for k in range(inner):
                    acc += x[m, k] * buffer[k]
                out[m, n] = scale[n] * acc + offset[n] * sums[m]


def int8_matmul(x: torch.Tensor, s: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """``x @ (scale[:, None] * s + offset[:, None]).T`` for float32 ``x`` (M, K) and int8 ``s``
    (N, K), all on the CPU, without building the float weight."""
    out = torch.empty(x.shape[0], s.shape[0], dtype=torch.float32)
    numba.set_num_threads(max(1, min(THREADS, numba.config.NUMBA_NUM_THREADS)))
    _matmul(x.numpy(), s.numpy(), scale.numpy(), offset.numpy(), out.numpy())
    return out


@njit(parallel=True, fastmath=True, boundscheck=False, error_model="numpy", cache=True)
def _decode_matmul(x: np.ndarray, container: np.ndarray, nibbles: bool, outputs: int, group: int,
                   lo: np.ndarray, step: np.ndarray, book: np.ndarray, book_width: int,
                   out: np.ndarray) -> None:  # pragma: no cover - compiled
    rows, inner = x.shape
    uniform = book_width == 0
    for block in prange((outputs + _BLOCK - 1) // _BLOCK):
        codes = np.empty(inner, np.uint8)
        buffer = np.empty(inner, np.float32)
        for n in range(block * _BLOCK, min(outputs, (block + 1) * _BLOCK)):
            base = n * inner
            if nibbles:  # inner is even, so a row starts on a byte
                half = base // 2
                for j in range(inner // 2):
                    byte = container[half + j]
                    codes[2 * j] = byte & 15
                    codes[2 * j + 1] = byte >> 4
            else:
                for k in range(inner):
                    codes[k] = container[base + k]
            # runs of one parameter set: a set is `group` consecutive elements of the tensor
            k = 0
            while k < inner:
                s = (base + k) // group
                stop = min(inner, (s + 1) * group - base)
                if uniform:
                    low, size = lo[s], step[s]
                    for j in range(k, stop):
                        buffer[j] = low + size * np.float32(codes[j])
                else:
                    offset = s * book_width
                    for j in range(k, stop):
                        buffer[j] = book[offset + codes[j]]
                k = stop
            for m in range(rows):
                acc = np.float32(0)
                for j in range(inner):
                    acc += x[m, j] * buffer[j]
                out[m, n] = acc


def decode_matmul(x: torch.Tensor, container: torch.Tensor, nibbles: bool, shape: tuple[int, int], group: int,
                  lo: torch.Tensor | None = None, step: torch.Tensor | None = None,
                  codebook: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ W.T`` for float32 ``x`` (M, K) and the (N, K) weight ``W`` that a byte or nibble
    container of indices and its parameters describe (uniform ``lo``, ``step`` or a k-means
    ``codebook`` of shape (sets, width)); a parameter set covers ``group`` consecutive
    elements. Each weight row is rebuilt into a cached float buffer, used and dropped."""
    outputs, inner = shape
    out = torch.empty(x.shape[0], outputs, dtype=torch.float32)
    empty = np.empty(1, np.float32)
    if codebook is None:
        book, width, lows, steps = empty, 0, lo.numpy(), step.numpy()
    else:
        book, width, lows, steps = codebook.reshape(-1).numpy(), codebook.shape[1], empty, empty
    numba.set_num_threads(max(1, min(THREADS, numba.config.NUMBA_NUM_THREADS)))
    _decode_matmul(x.numpy(), container.numpy(), nibbles, outputs, group, lows, steps, book, width, out.numpy())
    return out
