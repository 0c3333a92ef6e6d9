"""Shared fixtures: small state dicts shaped like real ones, and the MNIST folder."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
MNIST_DIR = REPO.parent / "shared" / "data" / "mnist"


def run_qpack(*args: object, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Run the ``qpack`` command line in a subprocess, as a user would; assert success by default."""
    proc = subprocess.run([sys.executable, "-m", "qpack", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


class SmallNet(torch.nn.Module):
    """Conv + BatchNorm + Linear: every kind of tensor the default policy treats differently."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.conv(x)))
        x = torch.nn.functional.adaptive_avg_pool2d(x, 4)
        return self.fc(x.flatten(1))


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread: small work, and it stays fast when other jobs share the CPUs."""
    from qpack.parallel import torch_threads

    with torch_threads(1):
        yield


@pytest.fixture
def small_net() -> SmallNet:
    torch.manual_seed(0)
    net = SmallNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
        net.bn.num_batches_tracked.fill_(7)
    return net.eval()


@pytest.fixture
def mnist_dir() -> Path:
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST test set not found at {MNIST_DIR} (../shared is absent)")
    return MNIST_DIR
