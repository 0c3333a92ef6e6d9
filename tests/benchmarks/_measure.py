"""Measurement helpers for the benchmark scripts: resident memory from /proc and best-of timing.

Linux only (``/proc/self/status``). Nothing here imports torch, so a worker process can start
measuring before the heavy imports if it wants to.
"""

from __future__ import annotations

import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

__all__ = ["MemoryPeak", "PeakSampler", "interleaved_best", "read_status", "reset_peak_rss"]

_FIELDS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def read_status() -> dict[str, int]:
    """The memory lines of ``/proc/self/status`` that we use, in bytes (missing ones left out)."""
    out: dict[str, int] = {}
    with open("/proc/self/status", "rb") as handle:
        for line in handle:
            key, _, rest = line.partition(b":")
            name = key.decode()
            if name in _FIELDS:
                out[name] = int(rest.split()[0]) * 1024  # the kernel reports kB
    return out


def reset_peak_rss() -> bool:
    """Reset the kernel's VmHWM of this process to its current RSS (``echo 5 > clear_refs``).

    Returns:
        True if the kernel accepted it (so a later VmHWM is the peak since now).
    """
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


@dataclass
class MemoryPeak:
    """What a :class:`PeakSampler` saw, in bytes."""

    baseline_anon: int = 0
    baseline_rss: int = 0
    peak_anon: int = 0
    peak_rss: int = 0
    #: the kernel's exact peak RSS (anonymous + file-backed + shared); since the reset if
    #: ``hwm_reset`` is True, else since the process started
    vm_hwm: int = 0
    hwm_reset: bool = False
    samples: int = 0
    interval_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict."""
        return dict(self.__dict__)


@dataclass
class PeakSampler:
    """Sample VmRSS and RssAnon from a background thread while a block runs.

    ``RssAnon`` is anonymous memory only: pages of a memory-mapped input file are not in it
    (they are in ``RssFile``), so it measures what the process itself allocated. Spikes
    shorter than ``interval_s`` can be missed by the sampler; ``vm_hwm`` (the kernel's own
    high-water mark of the total RSS) cannot miss them.

    Usage::

        with PeakSampler() as sampler:
            work()
        sampler.result.peak_anon
    """

    interval_s: float = 0.002
    result: MemoryPeak = field(default_factory=MemoryPeak)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _sample(self) -> None:
        status = read_status()
        r = self.result
        r.peak_anon = max(r.peak_anon, status.get("RssAnon", 0))
        r.peak_rss = max(r.peak_rss, status.get("VmRSS", 0))
        r.samples += 1

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> PeakSampler:
        gc.collect()
        status = read_status()
        self.result = MemoryPeak(baseline_anon=status.get("RssAnon", 0), baseline_rss=status.get("VmRSS", 0),
                                 interval_s=self.interval_s)
        self.result.hwm_reset = reset_peak_rss()
        self._sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()
        self.result.vm_hwm = read_status().get("VmHWM", 0)
        self.result.peak_rss = max(self.result.peak_rss, self.result.vm_hwm)


def interleaved_best(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                     after: Callable[[str, Any], None] | None = None) -> dict[str, list[float]]:
    """Time several functions round-robin (one warm-up round, then ``repeats`` timed rounds).

    Interleaving spreads the noise of a shared machine over all contenders alike, instead of
    giving one of them a quiet minute and another a busy one.

    Args:
        fns: name -> function to time; each result is dropped before the next call.
        repeats: timed rounds.
        warmup: untimed rounds before them.
        after: called with (name, result) after the last timed run of each function, outside
            the timing (e.g. to check the result).

    Returns:
        name -> the timed runs, in seconds.
    """
    times: dict[str, list[float]] = {name: [] for name in fns}
    rounds = warmup + repeats
    for round_no in range(rounds):
        for name, fn in fns.items():
            gc.collect()
            started = time.perf_counter()
            result = fn()
            elapsed = time.perf_counter() - started
            if round_no >= warmup:
                times[name].append(elapsed)
            if round_no == rounds - 1 and after is not None:
                after(name, result)
            del result
    gc.collect()
    return times
