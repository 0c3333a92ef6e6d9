"""Safetensors and sharded checkpoints in and out, diff, bench, progress and JSON output."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import pytest
import torch
from conftest import run_qpack as run

import qpack

safetensors_torch = pytest.importorskip("safetensors.torch", reason="safetensors is a dev dependency")


def assert_same_state(a, b):
    assert sorted(a) == sorted(b)  # safetensors files keep no order
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


def test_safetensors_file_packs_like_the_state_dict(tmp_path, small_net):
    state = small_net.state_dict()
    safetensors_torch.save_file(state, tmp_path / "m.safetensors")
    qpack.pack(state, tmp_path / "core.qpk", bits=4)
    report = qpack.pack(tmp_path / "m.safetensors", tmp_path / "st.qpk", bits=4)
    assert report.metadata["qpack.source"] == "m.safetensors"
    assert_same_state(qpack.load(tmp_path / "core.qpk"), qpack.load(tmp_path / "st.qpk"))


@pytest.mark.parametrize("kind", ["safetensors", "bin"])
def test_two_shard_checkpoint_packs_like_the_state_dict(tmp_path, small_net, kind):
    state = small_net.state_dict()
    names = list(state)
    halves = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for number, part in enumerate(halves, 1):
        shard = f"model-0000{number}-of-00002.{kind}"
        piece = {n: state[n] for n in part}
        if kind == "safetensors":
            safetensors_torch.save_file(piece, tmp_path / shard)
        else:
            torch.save(piece, tmp_path / shard)
        weight_map.update({n: shard for n in part})
    index = "model.safetensors.index.json" if kind == "safetensors" else "pytorch_model.bin.index.json"
    (tmp_path / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    qpack.pack(state, tmp_path / "core.qpk", bits=3, method="kmeans")
    for source in [tmp_path / index, tmp_path]:  # the index file, or the folder holding it
        qpack.pack(source, tmp_path / "sharded.qpk", bits=3, method="kmeans", force=True)
        assert_same_state(qpack.load(tmp_path / "core.qpk"), qpack.load(tmp_path / "sharded.qpk"))


def test_missing_shard_is_a_clear_error(tmp_path):
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"w": "gone.safetensors"}}))
    with pytest.raises(qpack.InputError, match="missing"):
        qpack.pack(tmp_path, tmp_path / "x.qpk")
    assert not (tmp_path / "x.qpk").exists()


def test_lightning_checkpoint_takes_its_state_dict(tmp_path, small_net):
    ckpt = {"epoch": 3, "global_step": 300, "pytorch-lightning_version": "2.4.0",
            "state_dict": {f"model.{k}": v for k, v in small_net.state_dict().items()},
            "optimizer_states": [{"state": {}, "param_groups": [{"lr": 0.1}]}], "lr_schedulers": []}
    torch.save(ckpt, tmp_path / "last.ckpt")
    report = qpack.pack(tmp_path / "last.ckpt", tmp_path / "l.qpk")
    assert any("optimizer_states" in note for note in report.notes)
    assert list(qpack.load(tmp_path / "l.qpk")) == list(ckpt["state_dict"])


def test_unpack_to_safetensors(tmp_path, small_net):
    qpack.pack(small_net.state_dict(), tmp_path / "m.qpk", metadata={"who": "test"})
    run("unpack", "m.qpk", "-o", "out.safetensors", cwd=tmp_path)
    loaded = safetensors_torch.load_file(tmp_path / "out.safetensors")
    assert_same_state(qpack.load(tmp_path / "m.qpk"), {k: loaded[k] for k in qpack.load(tmp_path / "m.qpk")})
    run("unpack", "m.qpk", "--format", "safetensors", cwd=tmp_path)  # default name follows the format
    assert (tmp_path / "m.safetensors").exists()
    from safetensors import safe_open

    with safe_open(tmp_path / "m.safetensors", "pt") as handle:
        assert handle.metadata()["who"] == "test"


def test_diff_json_and_table_agree(tmp_path, small_net):
    torch.save(small_net.state_dict(), tmp_path / "m.pt")
    qpack.pack(tmp_path / "m.pt", tmp_path / "m.qpk", bits=4)
    doc = json.loads(run("diff", "m.pt", "m.qpk", "--json", cwd=tmp_path).stdout)
    rows = {r["name"]: r for r in doc["tensors"]}
    assert rows["bn.running_var"]["equal"] and not rows["fc.weight"]["equal"]
    state, back = small_net.state_dict(), qpack.load(tmp_path / "m.qpk")
    expected = float((back["fc.weight"] - state["fc.weight"]).abs().max())
    assert rows["fc.weight"]["max_abs"] == pytest.approx(expected, rel=1e-6)
    table = run("diff", "m.pt", "m.qpk", cwd=tmp_path).stdout
    line = next(l for l in table.splitlines() if l.startswith("fc.weight"))
    assert f"{rows['fc.weight']['snr_db']:.1f}" in line


def test_bench_sweeps_settings(tmp_path, small_net):
    torch.save(small_net.state_dict(), tmp_path / "m.pt")
    doc = json.loads(run("bench", "m.pt", "--bits", "2,8", "--json", cwd=tmp_path).stdout)
    rows = {(r["method"], r["bits"], r["granularity"]): r for r in doc["rows"]}
    assert set(rows) == {("uniform", 2, "tensor"), ("uniform", 8, "tensor"), ("uniform", 2, "channel"),
                         ("uniform", 8, "channel"), ("kmeans", 2, "tensor"), ("kmeans", 8, "tensor")}
    assert rows[("uniform", 8, "tensor")]["snr_db"] > rows[("uniform", 2, "tensor")]["snr_db"] + 20
    assert rows[("uniform", 2, "tensor")]["bits_per_weight"] < rows[("uniform", 8, "tensor")]["bits_per_weight"]


def test_pack_json_matches_info(tmp_path, small_net):
    torch.save(small_net.state_dict(), tmp_path / "m.pt")
    packed = json.loads(run("pack", "m.pt", "--json", cwd=tmp_path).stdout)
    described = json.loads(run("info", "m.qpk", "--json", cwd=tmp_path).stdout)
    assert packed["file_bytes"] == described["file_bytes"]
    for a, b in zip(packed["tensors"], described["tensors"]):
        assert (a["name"], a["encoding"], a["stored_bytes"], a["unique_after"]) == \
               (b["name"], b["encoding"], b["stored_bytes"], b["unique_after"])


def _run_on_terminal(args, cwd):
    """Run the CLI with stderr (and stdout) on a pseudo-terminal; return what it drew."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a real size
    proc = subprocess.Popen([sys.executable, "-m", "qpack", *args], cwd=cwd, stdout=follower,
                            stderr=follower, stdin=subprocess.DEVNULL)
    os.close(follower)
    chunks = []
    while True:
        try:
            data = os.read(leader, 65536)
        except OSError:
            break
        if not data:
            break
        chunks.append(data)
    proc.wait(timeout=120)
    os.close(leader)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_progress_on_a_terminal_only(tmp_path):
    state = {f"layer{i}.weight": torch.randn(32, 32) for i in range(40)}
    torch.save(state, tmp_path / "many.pt")
    code, drawn = _run_on_terminal(["pack", "many.pt"], tmp_path)
    assert code == 0 and "packing" in drawn and "/40" in drawn
    piped = run("pack", "many.pt", "-o", "again.qpk", cwd=tmp_path)
    assert "packing" not in piped.stderr + piped.stdout
    code, drawn = _run_on_terminal(["unpack", "many.qpk", "-o", "back.pt"], tmp_path)
    assert code == 0 and "decoding" in drawn
    code, drawn = _run_on_terminal(["verify", "many.qpk"], tmp_path)
    assert code == 0 and "verifying" in drawn and "OK" in drawn
    code, drawn = _run_on_terminal(["pack", "many.pt", "-o", "quiet.qpk", "--quiet"], tmp_path)
    assert code == 0 and drawn == ""
