"""What format version 3 gives a packed file: float16 parameters where they do not hurt,
byte-planed lossless tensors, and a header that costs small models little (spec 1.2, 2.2,
2.4, 3)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import qpack
from qpack import QpkReader
from qpack.codecs import uniform
from qpack.format import fixed_bytes


def entries_of(path: Path) -> dict:
    with QpkReader(path) as reader:
        return dict(reader.entries)


def steps_and_errors(path: Path, weights: torch.Tensor, name: str = "w") -> tuple[np.ndarray, np.ndarray]:
    """Per group: the grid step (from the stored parameters) and the largest error."""
    entry = entries_of(path)[name]
    lo = torch.from_numpy(qpack.format.param_values(entry, "min"))
    hi = torch.from_numpy(qpack.format.param_values(entry, "max"))
    step = uniform.step_of(lo, hi, entry.bits).numpy()
    rebuilt = qpack.load(path)[name]
    error = (rebuilt.double() - weights.double()).abs().reshape(-1)
    size = entry.group_size
    padded = np.concatenate([error.numpy(), np.zeros(-error.numel() % size)])
    return step, padded.reshape(-1, size).max(1)


def test_groups_get_float16_parameters_by_default_and_stay_within_half_a_step(tmp_path):
    gen = torch.Generator().manual_seed(3)
    # groups at very different scales, up to float16's largest value
    w = torch.randn(40, 48, generator=gen) * torch.logspace(-4, 4, 40)[:, None].clamp(max=6e4 / 5)
    qpack.pack({"w": w}, tmp_path / "g.qpk", bits=4, granularity="group:32", rounding="nearest")
    entry = entries_of(tmp_path / "g.qpk")["w"]
    assert entry.param_dtype == "float16" and len(entry.params["min"]) == 2 * entry.channels
    step, worst = steps_and_errors(tmp_path / "g.qpk", w)
    assert np.all(worst <= step / 2 * (1 + 1e-5) + 1e-30)
    # the same grid in float32 parameters: hardly better, twice the parameter bytes
    qpack.pack({"w": w}, tmp_path / "f.qpk", bits=4, granularity="group:32", param_dtype="float32")
    wide = entries_of(tmp_path / "f.qpk")["w"]
    assert wide.param_dtype == "float32" and len(wide.params["min"]) == 4 * wide.channels
    assert entry.stats["snr_db"] >= wide.stats["snr_db"] - 0.05
    assert (tmp_path / "g.qpk").stat().st_size < (tmp_path / "f.qpk").stat().st_size - 3 * entry.channels


def test_uint8_parameters_cost_a_quarter_and_still_cover_every_group(tmp_path):
    gen = torch.Generator().manual_seed(8)
    w = torch.randn(64, 96, generator=gen) * torch.linspace(0.01, 1, 64)[:, None]
    # nearest rounding: the half-step bound below tests that the coded grids cover each group
    qpack.pack({"w": w}, tmp_path / "u.qpk", bits=4, granularity="group:32", param_dtype="uint8",
               rounding="nearest")
    qpack.pack({"w": w}, tmp_path / "h.qpk", bits=4, granularity="group:32", param_dtype="float16",
               rounding="nearest")
    coded, half = entries_of(tmp_path / "u.qpk")["w"], entries_of(tmp_path / "h.qpk")["w"]
    assert coded.param_dtype == "uint8" and len(coded.params["min"]) == coded.channels
    step, worst = steps_and_errors(tmp_path / "u.qpk", w)
    assert np.all(worst <= step / 2 * (1 + 1e-5))
    assert coded.stats["snr_db"] >= half.stats["snr_db"] - 0.3
    assert (tmp_path / "u.qpk").stat().st_size < (tmp_path / "h.qpk").stat().st_size - coded.channels
    # k-means codebooks have no two-level form: they get float16
    qpack.pack({"w": w}, tmp_path / "k.qpk", bits=2, method="kmeans", granularity="group:64", param_dtype="uint8")
    assert entries_of(tmp_path / "k.qpk")["w"].param_dtype == "float16"


def test_float16_parameters_where_they_cannot_serve_stay_float32(tmp_path):
    gen = torch.Generator().manual_seed(4)
    state = {"huge": torch.randn(8, 32, generator=gen) * 1e5,  # beyond float16's range
             "tiny": torch.randn(8, 32, generator=gen) * 1e-7,  # float16 subnormals: too coarse
             "plain": torch.randn(8, 32, generator=gen)}
    for options in ({}, {"param_dtype": "float16"}):
        qpack.pack(state, tmp_path / "m.qpk", bits=4, granularity="group:32", force=True, **options)
        kinds = {name: e.param_dtype for name, e in entries_of(tmp_path / "m.qpk").items()}
        assert kinds["huge"] == kinds["tiny"] == "float32" and kinds["plain"] == "float16"
    # auto: float32 for per-tensor and per-channel parameters; exact zero keeps float32 too
    qpack.pack(state, tmp_path / "t.qpk", bits=4, granularity="channel")
    assert {e.param_dtype for e in entries_of(tmp_path / "t.qpk").values()} == {"float32"}
    qpack.pack(state, tmp_path / "z.qpk", bits=4, granularity="group:32", exact_zero=True)
    assert {e.param_dtype for e in entries_of(tmp_path / "z.qpk").values()} == {"float32"}
    # and asked for, per-channel parameters are float16
    qpack.pack({"plain": state["plain"]}, tmp_path / "c.qpk", bits=4, granularity="channel", param_dtype="float16")
    assert entries_of(tmp_path / "c.qpk")["plain"].param_dtype == "float16"
    with pytest.raises(qpack.InputError, match="param dtype"):
        qpack.pack(state, tmp_path / "bad.qpk", param_dtype="bfloat16")


def test_kmeans_codebooks_in_float16_decode_to_their_centroids(tmp_path):
    gen = torch.Generator().manual_seed(5)
    w = torch.randn(16, 40, generator=gen) * 0.05
    qpack.pack({"w": w}, tmp_path / "k.qpk", bits=3, method="kmeans", granularity="group:64")
    entry = entries_of(tmp_path / "k.qpk")["w"]
    assert entry.param_dtype == "float16"
    book = np.frombuffer(entry.params["codebook"], "<f2").astype(np.float32)
    rebuilt = qpack.load(tmp_path / "k.qpk")["w"].reshape(-1).numpy()
    assert np.isin(rebuilt, book).all()
    assert entry.stats["snr_db"] > 14  # 3 bits: about 15 dB on Gaussian weights


def test_lossless_floats_use_byte_planes_when_smaller(tmp_path):
    gen = torch.Generator().manual_seed(6)
    state = {"bn.running_var": 1 + 0.05 * torch.rand(512, generator=gen),
             "bn.running_mean": 0.01 * torch.randn(512, generator=gen),
             "ids": torch.arange(512, dtype=torch.int64),
             "noise": torch.randint(0, 256, (2048,), dtype=torch.uint8)}
    report = qpack.pack(state, tmp_path / "r.qpk")
    entries = entries_of(tmp_path / "r.qpk")
    assert entries["bn.running_var"].compression == "zstd_planes"
    assert entries["noise"].compression == "none"  # 1-byte elements have no planes; noise does not compress
    for name, tensor in qpack.load(tmp_path / "r.qpk").items():
        assert torch.equal(tensor, state[name]), name
    plain = {r.name: r.stored_bytes for r in report.tensors}
    assert plain["bn.running_var"] < 0.8 * 512 * 4


class SmallBN(nn.Module):
    """Three conv + BatchNorm blocks and a classifier: 23 tensors, about 23 k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 16, 3), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)
        self.c3, self.b3 = nn.Conv2d(32, 48, 3), nn.BatchNorm2d(48)
        self.fc = nn.Linear(432, 10)


def test_small_models_pay_little_for_the_header(tmp_path):
    torch.manual_seed(0)
    state = SmallBN().state_dict()
    assert len(state) == 23 and 20_000 < sum(t.numel() for t in state.values()) < 30_000
    qpack.pack(state, tmp_path / "m.qpk")  # -b 8, per-tensor parameters: the header is mostly container
    with QpkReader(tmp_path / "m.qpk") as reader:
        head = reader.data_start
        entries, metadata = list(reader.entries.values()), reader.metadata
    # the target: about 40 bytes per tensor plus a few hundred per file
    assert head <= 40 * len(state) + 400, head
    assert fixed_bytes(entries, metadata) == (tmp_path / "m.qpk").stat().st_size - sum(e.length for e in entries)
    # written as version 1, the same entries cost several times as much
    assert fixed_bytes(entries, metadata, version=1) > 3 * head


def test_param_dtype_on_the_command_line(tmp_path):
    gen = torch.Generator().manual_seed(7)
    torch.save({"w": torch.randn(64, 64, generator=gen)}, tmp_path / "model.pt")
    env_path = str(Path(__file__).resolve().parents[1])
    for choice, expected in (("float32", "float32"), ("auto", "float16")):
        proc = subprocess.run([sys.executable, "-m", "qpack", "pack", "model.pt", "-b", "4", "-g", "group:32",
                               "--param-dtype", choice, "-o", f"{choice}.qpk", "--json", "-q"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False,
                              env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"})
        assert proc.returncode == 0, proc.stderr
        info = qpack.info(tmp_path / f"{choice}.qpk").to_dict()
        assert info["tensors"][0]["param_dtype"] == expected
        assert json.loads(info["metadata"]["qpack.options"])["param_dtype"] == choice
