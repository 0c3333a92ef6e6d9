"""Writes are atomic: a killed `qpack pack` or a full disk never leaves a partial .qpk file.

The writer spools payloads into an anonymous file, then writes a hidden temporary file beside
the target, fsyncs it and renames (or, without --force, hard-links) it into place. These
tests kill a real `qpack pack` at random moments and simulate ENOSPC inside the writer.
"""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import qpack
from qpack import OutputExistsError

QPACK = [sys.executable, "-m", "qpack"]


def leftovers(folder: Path, keep: set[str]) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


@pytest.fixture(scope="module")
def big_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 100 MB of float32 weights: packing takes a few seconds, long enough to kill."""
    folder = tmp_path_factory.mktemp("big")
    gen = torch.Generator().manual_seed(0)
    state = {f"layer{i}.weight": torch.randn(2048, 2048, generator=gen) for i in range(6)}
    state["layer0.bias"] = torch.randn(2048, generator=gen)
    torch.save(state, folder / "big.pt")
    return folder / "big.pt"


def _wait_for_temp_file(folder: Path, proc: subprocess.Popen, limit: float) -> bool:
    """Wait until the writer's hidden temporary file appears (its final write has begun)."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline and proc.poll() is None:
        if any(p.name.endswith(".tmp") for p in folder.iterdir()):
            return True
        time.sleep(0.002)
    return False


def test_sigkill_never_leaves_a_partial_file(tmp_path, big_checkpoint):
    target = tmp_path / "big.qpk"
    command = [*QPACK, "pack", str(big_checkpoint), "-o", str(target), "-q"]
    started = time.monotonic()
    subprocess.run(command, check=True, timeout=300)
    full_run = time.monotonic() - started
    reference = target.read_bytes()  # the writer is deterministic: a complete file is exactly this
    assert qpack.verify(target) == 7
    target.unlink()

    old = tmp_path / "old.qpk"
    qpack.pack({"w": torch.ones(3)}, old)
    old_bytes = old.read_bytes()

    rng = random.Random(1234)
    outcomes = []
    trials = 6
    for trial in range(trials):
        force = trial % 2 == 1
        if force:
            target.write_bytes(old_bytes)
        elif target.exists():
            target.unlink()
        proc = subprocess.Popen(command + (["--force"] if force else []),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if trial < 2:  # at any moment of the run
            time.sleep(rng.uniform(0.1, 0.9) * full_run)
        else:  # while the final file is being written, fsynced and renamed
            _wait_for_temp_file(tmp_path, proc, 2 * full_run)
            time.sleep(rng.uniform(0.0, 0.04))
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if target.exists():
            data = target.read_bytes()
            if force and data == old_bytes:
                outcomes.append("old")
            else:
                assert data == reference, f"trial {trial}: the target is neither complete nor the old file"
                outcomes.append("new")
        else:
            assert not force, f"trial {trial}: --force removed the old file"
            outcomes.append("absent")
        # at worst a hidden temporary file is left beside the target, never anything else
        for name in leftovers(tmp_path, {"big.qpk", "old.qpk"}):
            assert name.startswith(".big.qpk.") and name.endswith(".tmp"), name
            (tmp_path / name).unlink()
    assert len(outcomes) == trials
    print(f"full run {full_run:.1f} s; after each kill: {outcomes}")


def test_existing_target_needs_force(tmp_path):
    source = tmp_path / "m.pt"
    torch.save({"w": torch.randn(16, 16)}, source)
    target = tmp_path / "m.qpk"
    target.write_bytes(b"precious")
    proc = subprocess.run([*QPACK, "pack", str(source), "-o", str(target)], capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 3 and "--force" in proc.stderr
    assert target.read_bytes() == b"precious"
    with pytest.raises(OutputExistsError):
        qpack.pack({"w": torch.randn(16, 16)}, target)
    assert target.read_bytes() == b"precious"
    qpack.pack({"w": torch.randn(16, 16)}, target, force=True)
    assert qpack.verify(target) == 1


# -- a full disk ------------------------------------------------------------------------------------


class FullDisk:
    """os.write and os.copy_file_range that fail with ENOSPC once ``budget`` bytes are written."""

    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.real_write = os.write

    def write(self, fd: int, data: bytes) -> int:
        size = len(memoryview(data))
        if size > self.budget:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.budget -= size
        return self.real_write(fd, data)

    def copy_file_range(self, *args: object, **kwargs: object) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def _state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(2)
    return {f"w{i}": torch.randn(64, 64, generator=gen) for i in range(4)}


@pytest.mark.parametrize("budget", [0, 100, 5000, 10**9])
def test_enospc_is_a_clean_error_and_leaves_nothing(tmp_path, monkeypatch, budget):
    target = tmp_path / "m.qpk"
    disk = FullDisk(budget)
    monkeypatch.setattr(os, "write", disk.write)
    monkeypatch.setattr(os, "copy_file_range", disk.copy_file_range, raising=False)
    with pytest.raises(OSError) as caught:
        qpack.pack(_state(), target)
    monkeypatch.undo()
    assert caught.value.errno == errno.ENOSPC
    assert caught.value.filename == str(target)
    assert leftovers(tmp_path, set()) == []


def test_enospc_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "m.qpk"
    qpack.pack({"w": torch.ones(3)}, target)
    old = target.read_bytes()
    disk = FullDisk(3000)
    monkeypatch.setattr(os, "write", disk.write)
    monkeypatch.setattr(os, "copy_file_range", disk.copy_file_range, raising=False)
    with pytest.raises(OSError):
        qpack.pack(_state(), target, force=True)
    monkeypatch.undo()
    assert target.read_bytes() == old
    assert leftovers(tmp_path, {"m.qpk"}) == []


def test_copy_falls_back_when_copy_file_range_is_unsupported(tmp_path, monkeypatch):
    def unsupported(*args: object, **kwargs: object) -> int:
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV))

    monkeypatch.setattr(os, "copy_file_range", unsupported, raising=False)
    qpack.pack(_state(), tmp_path / "a.qpk")
    monkeypatch.undo()
    qpack.pack(_state(), tmp_path / "b.qpk")
    assert (tmp_path / "a.qpk").read_bytes() == (tmp_path / "b.qpk").read_bytes()


FULL_DISK_CLI = """
import errno, os, sys
def full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
os.write = full
os.copy_file_range = full
from qpack.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_cli_full_disk_is_one_line_exit_5(tmp_path):
    source = tmp_path / "m.pt"
    torch.save(_state(), source)
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_CLI, "pack", str(source), "-o", str(tmp_path / "m.qpk")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 5, proc.stderr
    assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "No space left on device" in proc.stderr and "m.qpk" in proc.stderr
    assert leftovers(tmp_path, {"m.pt"}) == []


def test_atomic_output_names_the_target_on_enospc(tmp_path):
    from qpack.writer import atomic_output

    target = tmp_path / "state.pt"
    with pytest.raises(OSError) as caught, atomic_output(target, overwrite=False):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert caught.value.errno == errno.ENOSPC and caught.value.filename == str(target)
    assert leftovers(tmp_path, set()) == []
    with atomic_output(target, overwrite=False) as handle:
        handle.write(b"done")
    assert target.read_bytes() == b"done" and leftovers(tmp_path, {"state.pt"}) == []
