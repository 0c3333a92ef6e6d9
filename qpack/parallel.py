"""Running per-tensor work on a few threads, in order, without oversubscribing the CPU.

zstd, numpy and torch release the GIL, so tensors can be encoded or decoded side by side.
Each tensor's torch operations run single-threaded, whatever the number of workers: several
threads each asking torch for all cores fight over them (measured 4-7x slower on a busy
2-core machine), and even one thread's multi-threaded torch operations collapse when
another process holds a core (OpenMP's waiting threads spin: a 30 M-parameter 8-bit load
took 9.6 s instead of 0.27 s on the 2-core machine while another job ran).
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

import torch

__all__ = ["default_workers", "torch_threads", "ordered_map", "pipelined_map"]

T = TypeVar("T")
R = TypeVar("R")
M = TypeVar("M")


def default_workers(limit: int = 8) -> int:
    """Worker threads to use: one per two cores, at most ``limit``.

    Measured: on 2 cores one worker loads and packs faster than two, which contend (a
    100M-parameter 8-bit load took 0.22 s against 0.43 s); on a 16-core host 8 workers load
    as fast as torch.load.
    """
    return max(1, min(limit, (os.cpu_count() or 1) // 2))


@contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """Run the block with torch's intra-op thread count set to ``count`` (restored after)."""
    previous = torch.get_num_threads()
    if count != previous:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        if count != previous:
            torch.set_num_threads(previous)


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, results in order, at most ``workers`` in flight.

    Items are taken from ``items`` only as results are consumed, so a lazy source (a
    memory-mapped checkpoint, shards) never has more than a few tensors loaded at once.
    """
    if workers <= 1:
        with torch_threads(1):
            yield from map(fn, items)
        return
    with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[Future[R]] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def pipelined_map(first: Callable[[T], M], second: Callable[[T, M], R], items: Iterable[T],
                  ahead: int = 2) -> Iterator[R]:
    """``second(item, first(item))`` for each item, in order: ``first`` on one helper thread,
    up to ``ahead`` items before the one ``second`` works on, and ``second`` on the caller's.

    For two cores: the helper decompresses the next tensors while the caller dequantizes
    this one. Whole tensors on two worker threads were slower (measured 2x on the 2-core
    machine): outputs allocated on a worker come from its own malloc arena, which returns
    their pages to the kernel when they are freed, so every load faulted them in again
    (about 14,000 page faults for 100 MB), while the caller's arena keeps them.
    """
    with torch_threads(1), ThreadPoolExecutor(max_workers=1) as pool:
        pending: deque[tuple[T, Future[M]]] = deque()
        source = iter(items)
        for item in source:
            pending.append((item, pool.submit(first, item)))
            if len(pending) >= ahead:
                break
        while pending:
            item, future = pending.popleft()
            following = next(source, _END)
            if following is not _END:
                pending.append((following, pool.submit(first, following)))
            try:
                value = future.result()
            except BaseException:
                for _, later in pending:
                    later.cancel()
                raise
            yield second(item, value)


_END: object = object()
