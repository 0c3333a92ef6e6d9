"""One QpkReader shared by several threads gives every thread the same tensors."""

from __future__ import annotations

import random
import threading

import pytest
import torch
from test_reader_rules import write_sample

import qpack
from qpack import QpkReader, api
from qpack.errors import FormatError
from qpack.parallel import map_all, ordered_map


def as_bytes(tensor: torch.Tensor) -> tuple:
    return tensor.dtype, tuple(tensor.shape), tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def read_concurrently(reader: QpkReader, threads: int, rounds: int) -> list[dict[str, tuple]]:
    names = reader.keys()
    start = threading.Barrier(threads)
    results: list[dict[str, tuple]] = [{} for _ in range(threads)]
    errors: list[BaseException] = []

    def work(index: int) -> None:
        order = list(names) * rounds
        random.Random(index).shuffle(order)
        try:
            start.wait()
            for name in order:
                got = as_bytes(reader.tensor(name))
                seen = results[index].setdefault(name, got)
                assert seen == got, f"thread {index} read {name} two different ways"
        except BaseException as exc:  # noqa: BLE001 - handed to the main thread
            errors.append(exc)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not errors, errors
    return results


def test_threads_share_one_reader(tmp_path):
    write_sample(tmp_path / "sample.qpk")  # raw, zstd, uniform and kmeans entries
    gen = torch.Generator().manual_seed(3)
    state = {f"w{i}": torch.randn(128, 96, generator=gen) for i in range(6)}
    state["zeros"] = torch.zeros(256, 64)  # compresses: read through zstd
    state["steps"] = torch.tensor(5)
    qpack.pack(state, tmp_path / "packed.qpk", bits=5, granularity="channel")
    for name in ("sample.qpk", "packed.qpk"):
        with QpkReader(tmp_path / name) as reader:
            expected = {n: as_bytes(reader.tensor(n)) for n in reader}
            for result in read_concurrently(reader, threads=8, rounds=4):
                assert result == expected


def test_load_with_threads_matches_one_thread(tmp_path):
    gen = torch.Generator().manual_seed(4)
    state = {f"layer{i}.weight": torch.randn(64, 64, generator=gen) for i in range(12)}
    qpack.pack(state, tmp_path / "m.qpk", bits=4)
    one = qpack.load(tmp_path / "m.qpk", threads=1)
    many = qpack.load(tmp_path / "m.qpk", threads=6)
    assert list(one) == list(many)
    assert all(torch.equal(one[k], many[k]) for k in one)


def test_allocation_is_the_same_on_one_or_several_trial_workers(tmp_path, monkeypatch):
    # the trial encodings run side by side (parallel.trial_workers); the plan and the
    # file must not depend on how many
    from qpack import allocate

    gen = torch.Generator().manual_seed(11)
    state = {f"l{i}.weight": torch.randn(64, 96, generator=gen) * (0.5 + i) for i in range(6)}
    state["l0.bias"] = torch.randn(64, generator=gen)
    files = []
    for workers in (1, 3):
        monkeypatch.setattr(allocate, "trial_workers", lambda limit=4, workers=workers: workers)
        path = tmp_path / f"w{workers}.qpk"
        qpack.pack(state, path, target_bpw=3.5, allocate_granularity="tensor,channel")
        files.append(path.read_bytes())
    assert files[0] == files[1]


@pytest.fixture
def two_cores(monkeypatch):
    """The 2-3 core case, whatever this machine has: one default worker, a second core."""
    monkeypatch.setattr(api, "default_workers", lambda limit=8: 1)
    monkeypatch.setattr(api.os, "cpu_count", lambda: 2)


def test_default_load_inflates_on_helpers_and_gives_what_tensor_gives(tmp_path, two_cores, monkeypatch):
    expected = write_sample(tmp_path / "s.qpk", version=3)
    inflated = []
    original = QpkReader.inflate
    monkeypatch.setattr(QpkReader, "inflate", lambda self, name, device="cpu": inflated.append(name) or original(self, name, device))
    loaded = qpack.load(tmp_path / "s.qpk")
    with QpkReader(tmp_path / "s.qpk") as reader:
        stored = [n for n in reader if reader.entry(n).encoding != "derived"]
        assert sorted(inflated) == sorted(stored)  # every stored tensor took the helpers' path
        assert list(loaded) == reader.keys() == list(expected)
        assert all(as_bytes(loaded[n]) == as_bytes(reader.tensor(n)) for n in reader)


def test_default_load_reports_a_corrupted_payload(tmp_path, two_cores):
    gen = torch.Generator().manual_seed(5)
    qpack.pack({f"w{i}": torch.randn(256, 256, generator=gen) for i in range(6)}, tmp_path / "m.qpk", bits=8)
    data = bytearray((tmp_path / "m.qpk").read_bytes())
    data[-100] ^= 0xFF  # inside the last payload
    (tmp_path / "bad.qpk").write_bytes(bytes(data))
    with pytest.raises(FormatError, match="checksum"):
        qpack.load(tmp_path / "bad.qpk")


def pool_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("ThreadPoolExecutor")}


class Interrupted(Exception):
    pass


def interrupt_at(count: int):
    """A progress callback that raises at the ``count``-th tensor, as Ctrl-C would."""
    def progress(name: str, done: int, total: int) -> None:
        if done == count:
            raise Interrupted(name)
    return progress


@pytest.mark.parametrize("threads", [None, 2])
def test_a_load_stopped_midway_stops_its_workers_before_it_returns(tmp_path, two_cores, threads):
    """The consumer raises (here the progress callback, as Ctrl-C would): no worker is left
    for the garbage collector to join later (finalized at a bad moment, that deadlocked the
    suite)."""
    gen = torch.Generator().manual_seed(6)
    qpack.pack({f"w{i}": torch.randn(256, 256, generator=gen) for i in range(8)}, tmp_path / "m.qpk", bits=8)
    before = pool_threads()
    # kept as ``raised``, the traceback holds load's frames, as a caller's handler would
    with pytest.raises(Interrupted) as raised:  # noqa: F841
        qpack.load(tmp_path / "m.qpk", threads=threads, progress=interrupt_at(2))
    assert pool_threads() <= before


def test_a_pack_stopped_midway_stops_its_workers_and_leaves_no_file(tmp_path):
    gen = torch.Generator().manual_seed(7)
    state = {f"w{i}": torch.randn(64, 64, generator=gen) for i in range(8)}
    before = pool_threads()
    with pytest.raises(Interrupted) as raised:  # noqa: F841 (the traceback kept, as above)
        qpack.pack(state, tmp_path / "m.qpk", bits=8, threads=2, progress=interrupt_at(2))
    assert pool_threads() <= before
    assert list(tmp_path.iterdir()) == []


def test_ordered_map_runs_ahead_by_at_most_its_limit():
    taken = []

    def items():
        for i in range(40):
            taken.append(i)
            yield i

    for i, result in enumerate(ordered_map(lambda x: x * x, items(), 2, ahead=lambda x: 10, ahead_limit=35)):
        assert result == i * i
        # submitted and not yet consumed: enough to reach the limit, and one more at most
        assert len(taken) - i <= 5
    assert taken == list(range(40))


def test_map_all_starts_the_costliest_first_and_returns_in_order():
    started = []
    lock = threading.Lock()
    both_busy = threading.Barrier(2, timeout=30)  # the first two items wait for each other

    def square(x: int) -> int:
        with lock:
            started.append(x)
            first_two = len(started) <= 2
        if first_two:
            both_busy.wait()
        return x * x

    items = [3, 50, 7, 20, 1, 9]
    assert map_all(square, items, 2, cost=lambda x: x) == [x * x for x in items]
    # two workers take the two costliest before anything else starts
    assert set(started[:2]) == {50, 20} and sorted(started) == sorted(items)
    assert map_all(square, items, 1) == [x * x for x in items]


def test_map_all_raises_what_a_worker_raised():
    def fail_on_four(x: int) -> int:
        if x == 4:
            raise ValueError("four")
        return x

    with pytest.raises(ValueError, match="four"):
        map_all(fail_on_four, list(range(8)), 2)
