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

__all__ = ["default_workers", "trial_workers", "torch_threads", "ordered_map", "map_all"]

T = TypeVar("T")
R = TypeVar("R")


def default_workers(limit: int = 8) -> int:
    """Worker threads to use: one per two cores, at most ``limit``.

    Measured: on 2 cores one worker loads and packs faster than two, which contend (a
    100M-parameter 8-bit load took 0.22 s against 0.43 s; measured again on 25 M parameters,
    two took 1.5-2x one's time, and each of their loads faulted in ~14,000 fresh pages, as
    outputs allocated on a worker come from its malloc arena, which hands freed pages back,
    where the calling thread's keeps them; a helper thread decompressing ahead of the caller
    did not pay either while another job held a core); on a 16-core host 8 workers load as
    fast as torch.load.
    """
    return max(1, min(limit, (os.cpu_count() or 1) // 2))


def trial_workers(limit: int = 4) -> int:
    """Worker threads for the allocation's trial encodings: one per core, at most ``limit``.

    Unlike loading, this work is compute-bound (sorting, k-means fits, rounding, zstd and
    rANS on one tensor at a time), and its outputs are the encoded payloads, not tensors
    that fault in fresh pages. Measured on the 2-core machine (bench_formats' 25 M synthetic
    model, ``--target-bpw 4.53``): two workers packed in 6.2 s against 8.6-9.2 s for one
    with channel grids, 5.2-5.3 s against 5.5-5.9 s without; with another process spinning
    on one core, 7.8-8.3 s against 8.2-9.3 s, and 5.4-6.1 s against 6.3-6.6 s.
    """
    return max(1, min(limit, os.cpu_count() or 1))


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


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int, *,
                ahead: Callable[[T], int] | None = None, ahead_limit: int = 0) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, results in order, at most ``workers`` in flight.

    Items are taken from ``items`` only as results are consumed, so a lazy source (a
    memory-mapped checkpoint, shards) never has more than a few tensors loaded at once.
    With ``ahead``, more items are submitted while the ``ahead(item)`` of those in flight
    sum to less than ``ahead_limit`` (bytes their results hold, say), so the workers run
    ahead of a slow consumer by that much.

    A consumer that may stop early (an error) must close the generator itself, e.g. with
    ``contextlib.closing``: one left to the garbage collector joins its workers wherever the
    collector happens to run, and that deadlocked the test suite once, inside threading's own
    bookkeeping while a new thread started (Thread.start waiting on a thread whose bootstrap,
    holding threading's shutdown lock, was joining this pool).
    """
    if workers <= 1 and ahead is None:
        with torch_threads(1):
            yield from map(fn, items)
        return
    with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        pending: deque[tuple[Future[R], int]] = deque()
        in_flight = 0
        for item in items:
            cost = ahead(item) if ahead is not None else 0
            pending.append((pool.submit(fn, item), cost))
            in_flight += cost
            while pending and len(pending) >= workers and (ahead is None or in_flight >= ahead_limit):
                future, cost = pending.popleft()
                in_flight -= cost
                yield future.result()
        while pending:
            yield pending.popleft()[0].result()


def map_all(fn: Callable[[T], R], items: list[T], workers: int, cost: Callable[[T], int] | None = None) -> list[R]:
    """``[fn(item) for item in items]`` on ``workers`` threads, every item submitted at once,
    the costliest first.

    For work whose inputs are all at hand and whose results are kept (the allocation's
    confirmations): ``ordered_map`` keeps at most ``workers`` in flight, so one large tensor
    at the head of the queue leaves the other workers idle once the small ones behind it
    are done; starting the largest first (longest-processing-time order) keeps every worker
    busy until the last few small items.
    """
    if workers <= 1 or len(items) <= 1:
        with torch_threads(1):
            return [fn(item) for item in items]
    order = sorted(range(len(items)), key=lambda i: -cost(items[i])) if cost is not None else range(len(items))
    with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {i: pool.submit(fn, items[i]) for i in order}
        return [futures[i].result() for i in range(len(items))]
