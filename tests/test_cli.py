"""The command line end to end, in subprocesses, as a user runs it."""

import json

import torch
from conftest import run_qpack as run

import qpack


def test_pack_info_unpack_load(tmp_path, small_net):
    torch.save(small_net.state_dict(), tmp_path / "model.pt")
    out = run("pack", "model.pt", "-b", "8", cwd=tmp_path).stdout
    assert "uniform 8-bit" in out and "kept lossless" in out and "BatchNorm statistics" in out
    assert (tmp_path / "model.qpk").exists()

    table = run("info", "model.qpk", cwd=tmp_path).stdout
    assert "fc.weight" in table and "uniform" in table and "total:" in table

    doc = json.loads(run("info", "model.qpk", "--json", cwd=tmp_path).stdout)
    rows = {t["name"]: t for t in doc["tensors"]}
    for key in ["name", "shape", "dtype", "encoding", "bits", "granularity", "params"]:
        assert key in rows["fc.weight"]
    assert rows["fc.weight"]["encoding"] == "uniform" and rows["fc.weight"]["bits"] == 8
    assert set(rows["fc.weight"]["params"]) == {"min", "max"}
    assert rows["bn.running_var"]["encoding"] == "raw"
    assert doc["file_bytes"] == (tmp_path / "model.qpk").stat().st_size

    run("unpack", "model.qpk", "-o", "restored.pt", cwd=tmp_path)
    restored = torch.load(tmp_path / "restored.pt", weights_only=True)
    fresh = type(small_net)().eval()
    fresh.load_state_dict(restored)
    x = torch.randn(3, 1, 8, 8)
    via_api = type(small_net)().eval()
    qpack.load_into(via_api, tmp_path / "model.qpk")
    assert torch.equal(fresh(x), via_api(x))
    assert torch.allclose(fresh(x), small_net(x), atol=0.05)


def test_kmeans_and_options(tmp_path, small_net):
    torch.save(small_net.state_dict(), tmp_path / "model.pt")
    run("pack", "model.pt", "-b", "3", "-m", "kmeans", "-o", "k.qpk", "--bias-bits", "3",
        "--bits", "conv.*=5", "--exclude", "fc.bias", "--meta", "run=7", cwd=tmp_path)
    doc = json.loads(run("info", "k.qpk", "--json", cwd=tmp_path).stdout)
    rows = {t["name"]: t for t in doc["tensors"]}
    assert rows["fc.weight"]["encoding"] == "kmeans" and rows["fc.weight"]["bits"] == 3
    assert len(rows["fc.weight"]["params"]["codebook"]) <= 8
    assert rows["conv.weight"]["bits"] == 5 and rows["conv.bias"]["bits"] == 5
    assert rows["bn.weight"]["bits"] == 3
    assert rows["fc.bias"]["encoding"] == "raw"
    assert doc["metadata"]["run"] == "7"


def test_unpack_refuses_to_overwrite(tmp_path, small_net):
    torch.save(small_net.state_dict(), tmp_path / "model.pt")
    original = (tmp_path / "model.pt").read_bytes()
    run("pack", "model.pt", cwd=tmp_path)
    proc = run("unpack", "model.qpk", cwd=tmp_path, check=False)  # default output is model.pt
    assert proc.returncode == 3
    assert "exists" in proc.stderr and "--force" in proc.stderr and "Traceback" not in proc.stderr
    assert (tmp_path / "model.pt").read_bytes() == original
    run("unpack", "model.qpk", "--force", cwd=tmp_path)
    assert (tmp_path / "model.pt").read_bytes() != original


def test_verify_and_corruption(tmp_path, small_net):
    torch.save(small_net.state_dict(), tmp_path / "model.pt")
    run("pack", "model.pt", cwd=tmp_path)
    assert "OK" in run("verify", "model.qpk", cwd=tmp_path).stdout
    data = bytearray((tmp_path / "model.qpk").read_bytes())
    data[-5] ^= 0xFF
    (tmp_path / "bad.qpk").write_bytes(bytes(data))
    proc = run("verify", "bad.qpk", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "checksum" in proc.stdout
    proc = run("info", "model.pt", cwd=tmp_path, check=False)
    assert proc.returncode == 4 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    (tmp_path / "short.qpk").write_bytes(bytes(data[:100]))
    proc = run("unpack", "short.qpk", "-o", "x.pt", cwd=tmp_path, check=False)
    assert proc.returncode == 4 and not (tmp_path / "x.pt").exists()


def test_bad_bits_is_one_line(tmp_path, small_net):
    torch.save(small_net.state_dict(), tmp_path / "model.pt")
    for bits in ["0", "17", "x"]:
        proc = run("pack", "model.pt", "-b", bits, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
        assert not (tmp_path / "model.qpk").exists()
