"""Checkpoints shaped like the ones people have: old formats, saved on a GPU, nested in training
state, prefixed by DataParallel, with tied weights and views, or a whole pickled module."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch

import qpack
from qpack import InputError


def bit_exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.contiguous().reshape(-1).view(torch.uint8).equal(b.contiguous().reshape(-1).view(torch.uint8)))


def pack_raw(source: Path, out: Path, **options) -> tuple[qpack.PackReport, dict[str, torch.Tensor]]:
    """Pack everything lossless, so the round trip must be bit-exact."""
    report = qpack.pack(source, out, exclude=["*"], **options)
    return report, qpack.load(out)


@pytest.fixture
def state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"conv.weight": torch.randn(8, 3, 3, 3, generator=gen), "conv.bias": torch.randn(8, generator=gen),
            "bn.running_mean": torch.randn(8, generator=gen), "bn.num_batches_tracked": torch.tensor(12),
            "fc.weight": torch.randn(10, 32, generator=gen).half(), "mask": torch.rand(5, generator=gen) > 0.5}


def test_legacy_pre_1_6_format(tmp_path, state):
    torch.save(state, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(tmp_path / "legacy.pt")
    _, back = pack_raw(tmp_path / "legacy.pt", tmp_path / "legacy.qpk")
    assert list(back) == list(state)
    assert all(bit_exact(back[k], v) for k, v in state.items())


def _as_if_saved_on_gpu(src: Path, dst: Path) -> None:
    """Rewrite the storage locations in data.pkl from 'cpu' to 'cuda:0', then rewrite the zip."""
    with zipfile.ZipFile(src) as archive:
        entries = [(info, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as out:
        for info, data in entries:
            if info.filename.endswith("data.pkl"):
                count = data.count(b"X\x03\x00\x00\x00cpu")
                assert count > 0, "the pickle does not name the 'cpu' location as expected"
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            # a longer archive name moves every storage off its 64-byte alignment
            out.writestr("archive_saved_on_a_gpu" + info.filename[info.filename.index("/"):], data)


def test_checkpoint_saved_on_a_gpu_loads_on_the_cpu(tmp_path, state):
    torch.save(state, tmp_path / "cpu.pt")
    _as_if_saved_on_gpu(tmp_path / "cpu.pt", tmp_path / "gpu.pt")
    if not torch.cuda.is_available():  # the file really names a CUDA device
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(tmp_path / "gpu.pt", weights_only=True)
    _, back = pack_raw(tmp_path / "gpu.pt", tmp_path / "gpu.qpk")
    assert all(back[k].device.type == "cpu" and bit_exact(back[k], v) for k, v in state.items())


def test_mmap_failure_falls_back_to_a_plain_load(tmp_path, state, monkeypatch):
    torch.save(state, tmp_path / "m.pt")
    real_load = torch.load
    calls = []

    def no_mmap(*args, **kwargs):
        calls.append(kwargs.get("mmap"))
        if kwargs.get("mmap"):
            raise RuntimeError("storage is not aligned for memory-mapping")
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", no_mmap)
    _, back = pack_raw(tmp_path / "m.pt", tmp_path / "m.qpk")
    assert calls == [True, False]
    assert all(bit_exact(back[k], v) for k, v in state.items())


@pytest.mark.parametrize("key", ["state_dict", "model", "model_state_dict"])
def test_training_checkpoint_takes_the_model_and_notes_the_rest(tmp_path, state, key):
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 4)).sum().backward()
    optimizer.step()
    checkpoint = {"epoch": 7, "global_step": 1400, key: state, "optimizer": optimizer.state_dict(),
                  "best_accuracy": 0.93}
    torch.save(checkpoint, tmp_path / "train.pt")
    report, back = pack_raw(tmp_path / "train.pt", tmp_path / "train.qpk")
    assert list(back) == list(state)  # no optimizer moments, no counters
    notes = " ".join(report.notes)
    assert repr(key) in notes and "optimizer" in notes and "epoch" in notes


def test_lightning_like_checkpoint(tmp_path, state):
    prefixed = {f"model.{k}": v for k, v in state.items()}
    checkpoint = {"epoch": 3, "global_step": 999, "pytorch-lightning_version": "2.4.0",
                  "state_dict": prefixed, "loops": {"fit_loop": {"epoch_progress": {"current": 3}}},
                  "callbacks": {}, "optimizer_states": [{"state": {0: {"exp_avg": torch.zeros(3)}},
                                                         "param_groups": [{"lr": 0.1, "params": [0]}]}],
                  "lr_schedulers": [], "hyper_parameters": {"hidden": 32, "lr": 0.1, "name": "net"}}
    torch.save(checkpoint, tmp_path / "last.ckpt")
    report, back = pack_raw(tmp_path / "last.ckpt", tmp_path / "last.qpk")
    assert list(back) == list(prefixed)
    assert all(bit_exact(back[k], v) for k, v in prefixed.items())
    notes = " ".join(report.notes)
    assert "'state_dict'" in notes and "optimizer_states" in notes and "hyper_parameters" in notes


def test_dataparallel_prefix_is_kept(tmp_path, state):
    wrapped = {f"module.{k}": v for k, v in state.items()}
    torch.save(wrapped, tmp_path / "dp.pt")
    _, back = pack_raw(tmp_path / "dp.pt", tmp_path / "dp.qpk")
    assert list(back) == list(wrapped)


def test_tied_weights_are_stored_under_both_names(tmp_path):
    embedding = torch.nn.Embedding(50, 16)
    head = torch.nn.Linear(16, 50, bias=False)
    head.weight = embedding.weight  # tied, as in language models
    state = {"embed.weight": embedding.weight.detach(), "head.weight": head.weight.detach()}
    assert state["embed.weight"].data_ptr() == state["head.weight"].data_ptr()
    torch.save(state, tmp_path / "tied.pt")
    report = qpack.pack(tmp_path / "tied.pt", tmp_path / "tied.qpk", bits=8)
    back = qpack.load(tmp_path / "tied.qpk")
    assert torch.equal(back["embed.weight"], back["head.weight"])
    assert [row.encoding for row in report.tensors] == ["uniform", "uniform"]
    assert (back["head.weight"] - embedding.weight.detach()).abs().max() < 0.05


def test_views_transposes_and_slices(tmp_path):
    gen = torch.Generator().manual_seed(1)
    base = torch.randn(64, 48, generator=gen)
    state = {"transposed": base.t(), "sliced": base[3:40:2, 5:30], "column": base[:, 7],
             "expanded": torch.randn(1, 48, generator=gen).expand(16, 48),
             "channels_last": torch.randn(4, 3, 8, 8, generator=gen).to(memory_format=torch.channels_last),
             "narrow_half": base.half()[::3]}
    assert not any(t.is_contiguous() for k, t in state.items() if k != "narrow_half")
    torch.save(state, tmp_path / "views.pt")
    _, back = pack_raw(tmp_path / "views.pt", tmp_path / "views.qpk")
    for name, tensor in state.items():
        assert bit_exact(back[name], tensor), name
    quantized = qpack.pack(state, tmp_path / "q.qpk", bits=8, min_numel=1)
    back = qpack.load(tmp_path / "q.qpk")
    encodings = {row.name: row.encoding for row in quantized.tensors if row.shape and len(row.shape) >= 2}
    # 48 distinct values, each 16 times: stored exactly as a codebook of them
    assert encodings.pop("expanded") == "kmeans" and bit_exact(back["expanded"], state["expanded"])
    assert set(encodings.values()) == {"uniform"}
    for name, tensor in state.items():
        assert back[name].shape == tensor.shape
        assert (back[name].float() - tensor.float()).abs().max() < 0.05, name


def test_whole_module_needs_trust_pickle(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Flatten(),
                                torch.nn.Linear(4 * 6 * 6, 10))
    torch.save(model, tmp_path / "model.pt")
    with pytest.raises(InputError, match="--trust-pickle"):
        qpack.pack(tmp_path / "model.pt", tmp_path / "model.qpk")
    assert not (tmp_path / "model.qpk").exists()
    _, back = pack_raw(tmp_path / "model.pt", tmp_path / "model.qpk", trust_pickle=True)
    expected = model.state_dict()
    assert list(back) == list(expected)
    assert all(bit_exact(back[k], v) for k, v in expected.items())


def test_module_nested_in_a_checkpoint_needs_trust_pickle_too(tmp_path):
    model = torch.nn.Linear(8, 8)
    torch.save({"model": model, "epoch": 2}, tmp_path / "ckpt.pt")
    with pytest.raises(InputError, match="--trust-pickle"):
        qpack.pack(tmp_path / "ckpt.pt", tmp_path / "ckpt.qpk")
    report, back = pack_raw(tmp_path / "ckpt.pt", tmp_path / "ckpt.qpk", trust_pickle=True)
    assert set(back) == {"weight", "bias"} and "epoch" in " ".join(report.notes)


def test_scalars_beyond_the_metadata_limits_are_left_out_with_a_note(tmp_path):
    from qpack.checkpoint import MAX_DEPTH, MAX_SCALARS

    state: dict = {"w": torch.ones(8, 8), "long": "x" * 70_000, "config": {"lr": 0.1}}
    state.update({f"s{i}": i for i in range(MAX_SCALARS + 5)})
    nested = state
    for _ in range(MAX_DEPTH + 10):  # deeper than any real checkpoint, and than the recursion limit
        nested["n"] = {}
        nested = nested["n"]
    nested["hidden"] = torch.ones(2)
    report = qpack.pack(state, tmp_path / "s.qpk")
    notes = " ".join(report.notes)
    assert "long (str too long for metadata)" in notes and "more than" in notes
    meta = qpack.info(tmp_path / "s.qpk").metadata
    assert meta["state.config.lr"] == "0.1" and "state.long" not in meta
    assert sum(key.startswith("state.") for key in meta) == MAX_SCALARS
    assert list(qpack.load(tmp_path / "s.qpk")) == ["w"]


def test_names_that_collide_once_flattened_are_refused(tmp_path):
    with pytest.raises(InputError, match="'a.b'"):
        qpack.pack({"a.b": torch.ones(2), "a": {"b": torch.zeros(2)}}, tmp_path / "c.qpk")
    assert not (tmp_path / "c.qpk").exists()


def test_optimizer_state_beside_top_level_weights_is_left_out(tmp_path):
    # some scripts save {**model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}
    model = torch.nn.Linear(16, 8)
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 16)).sum().backward()
    opt.step()
    torch.save({**model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3}, tmp_path / "c.pt")
    report = qpack.pack(tmp_path / "c.pt", tmp_path / "c.qpk")
    assert [r.name for r in report.tensors] == ["weight", "bias"]
    assert any("optimizer" in note for note in report.notes)
