"""A fused dequantizing matmul for small batches on the CPU (numba, optional).

``y[m, n] = scale[n] * sum_k x[m, k] * s[n, k] + offset[n] * sum_k x[m, k]`` for int8
``s``: each output row converts its weight row once into a float buffer that stays in the
L1 cache and takes its dot products with every activation row, so the int8 weights are read
once, at a quarter of the fp32 weight's memory traffic. ``torch._weight_int8pack_mm`` does
the same sum but is 4-5 times slower than the fp32 matmul with fp32 activations on this
machine (tests/benchmarks/bench_packed.py).

Only imported when numba is installed (``pip install qpack[fast]``); without it the packed
layers use ``torch._weight_int8pack_mm``.
"""

from __future__ import annotations

import numba
import numpy as np
import torch
from numba import njit, prange

__all__ = ["int8_matmul", "MAX_ROWS"]

#: batch rows up to which the fused kernel is used; above, the weight is rebuilt and the BLAS
#: matmul (blocked for cache reuse) wins
MAX_ROWS = 64

_BLOCK = 16  # output rows per parallel task: one float buffer per task, not per row


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
    numba.set_num_threads(max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS)))
    _matmul(x.numpy(), s.numpy(), scale.numpy(), offset.numpy(), out.numpy())
    return out
