"""--exact-zero: every grid or codebook holds an exact 0 without pruning."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qpack
from conftest import run_qpack


def l1_like(rows: int, cols: int, seed: int) -> torch.Tensor:
    """Mostly near-zero weights, a fifth of them exactly 0, a few large ones: what an L1
    penalty leaves."""
    gen = torch.Generator().manual_seed(seed)
    values = torch.randn(rows, cols, generator=gen) * 1e-3
    big = torch.rand(rows, cols, generator=gen) < 0.05
    values[big] = torch.randn(int(big.sum()), generator=gen) * 0.3
    values[torch.rand(rows, cols, generator=gen) < 0.2] = 0.0
    return values


@pytest.mark.parametrize("method, bits, granularity", [
    ("uniform", 2, "tensor"), ("uniform", 3, "channel"), ("uniform", 5, "group:64"), ("uniform", 8, "tensor"),
    ("kmeans", 2, "tensor"), ("kmeans", 4, "channel"),
])
def test_zeros_stay_zero_and_the_error_drops(tmp_path, monkeypatch, method, bits, granularity):
    from qpack.codecs import uniform

    weights = {"fc.weight": l1_like(96, 160, seed=bits)}
    zeros = weights["fc.weight"] == 0
    # one grid per tensor even where a row is weaker than the rest (channel_spread); nearest
    # rounding, so that the half-step bound below tests the grid itself
    options = {"bits": bits, "method": method, "granularity": granularity, "channel_spread": None,
               "rounding": "nearest"}
    exact = qpack.pack(weights, tmp_path / "exact.qpk", exact_zero=True, **options)
    if method == "uniform":
        # most of these weights lie within half a step of 0: the default grid holds an exact 0
        # by itself (uniform.ZERO_HEAVY), as --exact-zero does
        auto = qpack.pack(weights, tmp_path / "auto.qpk", **options)
        assert "a grid with an exact 0" in auto.tensors[0].reason
        assert torch.all(qpack.load(tmp_path / "auto.qpk")["fc.weight"][zeros] == 0)
        assert auto.tensors[0].rel_rms == exact.tensors[0].rel_rms
        monkeypatch.setattr(uniform, "ZERO_HEAVY", 2.0)  # a plain min/max grid, for comparison
    plain = qpack.pack(weights, tmp_path / "plain.qpk", **options)
    loaded = qpack.load(tmp_path / "exact.qpk")["fc.weight"]
    assert torch.all(loaded[zeros] == 0)
    if method == "kmeans":
        # k-means usually has a centroid near 0 anyway: pinning one at 0 costs a little
        assert exact.tensors[0].rel_rms < 1.25 * plain.tensors[0].rel_rms
        return
    # min/max grids rarely have a level near 0, so the near-zero bulk gains the most
    assert exact.tensors[0].rel_rms < 0.5 * plain.tensors[0].rel_rms
    with qpack.QpkReader(tmp_path / "exact.qpk") as reader:
        entry = reader.entry("fc.weight")
        lo = np.frombuffer(entry.params["min"], "<f4").astype(np.float64)
        hi = np.frombuffer(entry.params["max"], "<f4").astype(np.float64)
    # every weight is still within half a step of its level (a row's range may stop at 0
    # when its other side is shorter than half a step)
    step = (hi - lo) / ((1 << bits) - 1)
    error = (loaded - weights["fc.weight"]).abs().reshape(lo.size, -1).amax(1).double().numpy()
    assert np.all(error <= step / 2 * (1 + 1e-5) + 1e-12)


def test_dense_weights_lose_little(tmp_path):
    # on Gaussian weights the widened range costs less than a step at 8 bits
    gen = torch.Generator().manual_seed(0)
    weights = {"w": torch.randn(128, 128, generator=gen)}
    plain = qpack.pack(weights, tmp_path / "plain.qpk", bits=8)
    exact = qpack.pack(weights, tmp_path / "exact.qpk", bits=8, exact_zero=True)
    assert exact.tensors[0].snr_db > plain.tensors[0].snr_db - 0.1
    assert torch.any(qpack.load(tmp_path / "exact.qpk")["w"] == 0) or not torch.any(weights["w"] == 0)


def test_cli_flag_is_recorded(tmp_path):
    torch.save({"fc.weight": l1_like(32, 64, seed=1)}, tmp_path / "m.pt")
    run_qpack("pack", "m.pt", "-b", "3", "--exact-zero", "-q", cwd=tmp_path)
    info = json.loads(run_qpack("info", "m.qpk", "--json", cwd=tmp_path).stdout)
    assert json.loads(info["metadata"]["qpack.options"])["exact_zero"] is True
    loaded = qpack.load(tmp_path / "m.qpk")["fc.weight"]
    assert torch.all(loaded[torch.load(tmp_path / "m.pt")["fc.weight"] == 0] == 0)


def test_live_rows_of_a_mostly_dead_layer_get_their_own_zero_level(tmp_path):
    # an L1-trained layer: most rows dead (all weights shaking around 0, on grids of their own
    # tiny range), a few live (large weights over a near-zero bulk). Counted over the whole
    # tensor the dead rows outvote the live ones; judged per row, each live row's bulk is 0
    gen = torch.Generator().manual_seed(21)
    w = torch.randn(300, 784, generator=gen) * 1e-4
    live = torch.arange(300) % 5 == 0
    big = (torch.rand(300, 784, generator=gen) < 0.01) & live[:, None]
    w[big] = torch.randn(int(big.sum()), generator=gen) * 0.3
    report = qpack.pack({"fc.weight": w}, tmp_path / "m.qpk", bits=4, granularity="channel", channel_spread=None)
    assert "a grid with an exact 0 on 60 of 300 rows" in report.tensors[0].reason
    restored = qpack.load(tmp_path / "m.qpk")["fc.weight"]
    rel = ((restored - w).norm(dim=1) / w.norm(dim=1))
    assert float(rel[live].max()) < 0.2  # a grid with 0 between two levels: the bulk's error swamps the row
    assert bool(((restored[live] == 0) | big[live]).float().mean() > 0.9)
