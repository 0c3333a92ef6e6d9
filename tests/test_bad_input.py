"""Bad input through the real command line: one line on stderr, a documented exit code, no
traceback, no output file left behind (``--debug`` shows the traceback)."""

from __future__ import annotations

import json
import math
import os
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import pytest
import torch

import qpack
from qpack.cli import EXIT_CODES
from qpack.format import MAGIC


def qpack_cli(*args: object, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "qpack", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300, check=False)


def fails_cleanly(proc: subprocess.CompletedProcess, code: int, *words: str) -> str:
    assert code in EXIT_CODES
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("qpack"), proc.stderr
    for word in words:
        assert word in proc.stderr, (word, proc.stderr)
    return proc.stderr


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of bad (and a few good) inputs, made once."""
    folder = tmp_path_factory.mktemp("inputs")
    gen = torch.Generator().manual_seed(0)
    good = {"fc.weight": torch.randn(16, 16, generator=gen), "fc.bias": torch.randn(16, generator=gen)}
    torch.save(good, folder / "good.pt")
    qpack.pack(good, folder / "good.qpk")
    (folder / "empty.pt").write_bytes(b"")
    (folder / "empty.qpk").write_bytes(b"")
    (folder / "noise.pt").write_bytes(b"\x00" + os.urandom(4095))  # never a zip or pickle signature
    (folder / "README.md").write_text("# a project\n\nNot a checkpoint.\n")
    (folder / "opcodes.bin").write_bytes(b"c\x00\x01garbage")  # a pickle GLOBAL opcode, then junk
    (folder / "a_folder").mkdir()
    torch.save(torch.nn.Sequential(torch.nn.Linear(8, 8)), folder / "module.pt")
    torch.save({"w": torch.empty(16, 16, device="meta")}, folder / "meta.pt")
    torch.save({"w": torch.randn(16, 16, generator=gen).to_sparse()}, folder / "sparse.pt")
    torch.save({"w": torch.randn(16, 16, dtype=torch.complex64, generator=gen)}, folder / "complex.pt")
    with warnings.catch_warnings():  # torch deprecates its own quantized tensors
        warnings.simplefilter("ignore")
        quantized = torch.quantize_per_tensor(torch.randn(16, 16, generator=gen), 0.1, 0, torch.qint8)
    torch.save({"w": quantized}, folder / "quantized.pt")
    data = (folder / "good.qpk").read_bytes()
    (folder / "truncated.qpk").write_bytes(data[: len(data) // 2])
    (folder / "v9.qpk").write_bytes(data[:8] + struct.pack("<I", 9) + data[12:])
    return folder


def run_in(inputs: Path, tmp_path: Path, *args: object) -> subprocess.CompletedProcess:
    """Run in an empty folder; the inputs are given by absolute path."""
    return qpack_cli(*[inputs / a if isinstance(a, str) and (inputs / a).exists() else a for a in args],
                     cwd=tmp_path)


@pytest.mark.parametrize("args, code, words", [
    (("pack", "missing.pt", "-o", "out.qpk"), 2, ["missing.pt", "no such file"]),
    (("pack", "a_folder", "-o", "out.qpk"), 2, ["a_folder"]),
    (("pack", "empty.pt", "-o", "out.qpk"), 2, ["empty"]),
    (("pack", "noise.pt", "-o", "out.qpk"), 2, ["noise.pt", "not a PyTorch checkpoint"]),
    (("pack", "README.md", "-o", "out.qpk"), 2, ["not a PyTorch checkpoint", "it is text"]),
    (("pack", "opcodes.bin", "-o", "out.qpk"), 2, ["not a PyTorch checkpoint", "bytes 63 00 01"]),
    (("pack", "good.qpk", "-o", "out.qpk"), 2, ["already a .qpk file"]),
    (("pack", "module.pt", "-o", "out.qpk"), 2, ["--trust-pickle"]),
    (("pack", "meta.pt", "-o", "out.qpk"), 2, ["meta"]),
    (("pack", "sparse.pt", "-o", "out.qpk"), 2, ["sparse"]),
    (("pack", "complex.pt", "-o", "out.qpk"), 2, ["complex"]),
    (("pack", "quantized.pt", "-o", "out.qpk"), 2, ["quantized"]),
    (("pack", "good.pt", "-o", "out.qpk", "-b", "0"), 2, ["1 to 16", "0"]),
    (("pack", "good.pt", "-o", "out.qpk", "-b", "17"), 2, ["1 to 16", "17"]),
    (("pack", "good.pt", "-o", "out.qpk", "-b", "fc.*=-1"), 2, ["-1"]),
    (("pack", "good.pt", "-o", "out.qpk", "-m", "gptq"), 2, ["gptq"]),
    (("pack", "good.pt", "-o", "out.qpk", "--max-error", "0.1", "--target-bpw", "4"), 2, ["not allowed with"]),
    (("pack", "good.pt", "-o", "out.qpk", "--max-error", "nan"), 2, ["positive finite", "nan"]),
    (("pack", "good.pt", "-o", "out.qpk", "--max-error", "1e-9"), 2, ["cannot be met", "gives an error of"]),
    (("pack", "good.pt", "-o", "no/such/folder/out.qpk"), 2, ["does not exist"]),
    (("pack", "good.pt", "-o", "a_folder"), 2, ["folder"]),
    (("unpack", "good.pt", "-o", "out.pt"), 4, ["not a .qpk file", "qpack pack"]),
    (("unpack", "missing.qpk", "-o", "out.pt"), 2, ["no such file"]),
    (("unpack", "a_folder", "-o", "out.pt"), 2, ["folder"]),
    (("unpack", "empty.qpk", "-o", "out.pt"), 4, ["0 bytes"]),
    (("unpack", "truncated.qpk", "-o", "out.pt"), 4, ["R4"]),
    (("info", "good.pt"), 4, ["not a .qpk file"]),
    (("info", "empty.qpk"), 4, ["R1"]),
    (("info", "v9.qpk"), 4, ["version 9"]),
    (("info", "missing.qpk"), 2, ["no such file"]),
    (("verify", "missing.qpk"), 2, ["no such file"]),
    (("frobnicate",), 2, ["frobnicate"]),
], ids=lambda v: " ".join(map(str, v)) if isinstance(v, tuple) else None)
def test_bad_input_is_one_line_and_leaves_nothing(inputs, tmp_path, args, code, words):
    proc = run_in(inputs, tmp_path, *args)
    fails_cleanly(proc, code, *words)
    assert list(tmp_path.iterdir()) == []  # no output, no temporary file


def test_verify_reports_the_first_problem_with_exit_1(inputs, tmp_path):
    proc = run_in(inputs, tmp_path, "verify", "truncated.qpk")
    assert proc.returncode == 1 and "FAILED" in proc.stdout and "[R4]" in proc.stdout, proc.stdout
    assert "Traceback" not in proc.stderr
    for name, rule in [("good.pt", "R1"), ("v9.qpk", "R2")]:
        proc = run_in(inputs, tmp_path, "verify", name, "--json")
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["ok"] is False and doc["rule"] == rule
    proc = run_in(inputs, tmp_path, "verify", "good.qpk")
    assert proc.returncode == 0 and "OK" in proc.stdout


def test_debug_shows_the_traceback(inputs, tmp_path):
    proc = run_in(inputs, tmp_path, "--debug", "info", "good.pt")
    assert proc.returncode == 4 and "Traceback" in proc.stderr and "FormatError" in proc.stderr


def test_unreadable_file(inputs, tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root, which reads a chmod 000 file anyway "
                    "(test_unreadable_file_in_process covers the error path)")
    locked = tmp_path / "locked.pt"
    locked.write_bytes((inputs / "good.pt").read_bytes())
    locked.chmod(0)
    try:
        fails_cleanly(qpack_cli("pack", locked, "-o", tmp_path / "out.qpk", cwd=tmp_path), 2, "permission")
        fails_cleanly(qpack_cli("info", locked, cwd=tmp_path), 2, "permission")
    finally:
        locked.chmod(0o644)
    assert not (tmp_path / "out.qpk").exists()


def test_unreadable_file_in_process(inputs, tmp_path, monkeypatch, capsys):
    """What root cannot see: opening fails with EACCES. Exit 2, one line, nothing written."""
    import builtins

    from qpack import cli

    real_open, real_os_open = builtins.open, os.open

    def denied(path, *args, **kwargs):
        if "locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    def os_denied(path, *args, **kwargs):
        if "locked" in str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_os_open(path, *args, **kwargs)

    for name in ("locked.pt", "locked.qpk"):
        (tmp_path / name).write_bytes((inputs / name.replace("locked", "good")).read_bytes())
    monkeypatch.setattr(builtins, "open", denied)
    monkeypatch.setattr(os, "open", os_denied)
    codes = [cli.main(["pack", str(tmp_path / "locked.pt"), "-o", str(tmp_path / "out.qpk")]),
             cli.main(["info", str(tmp_path / "locked.qpk")])]
    monkeypatch.undo()
    err = capsys.readouterr().err
    assert codes in ([2, 2], [5, 2], [2, 5], [5, 5]), codes
    assert err.count("\n") == 2 and "ermission denied" in err and "Traceback" not in err
    assert not (tmp_path / "out.qpk").exists()


def test_full_disk_is_exit_5(tmp_path):
    from test_atomic_write import FULL_DISK_CLI

    torch.save({"w": torch.randn(32, 32)}, tmp_path / "m.pt")
    proc = subprocess.run([sys.executable, "-c", FULL_DISK_CLI, "pack", "m.pt"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120, check=False)
    fails_cleanly(proc, 5, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.pt"]


# -- inputs that are not errors ----------------------------------------------------------------


def test_non_tensor_values_are_kept_as_plain_data(tmp_path):
    state = {"fc.weight": torch.randn(16, 16), "epoch": 7, "lr": 0.5, "arch": "mlp", "flag": True,
             "history": [1, 2, 3], "nothing": None, "nan": float("nan")}
    torch.save(state, tmp_path / "m.pt")
    proc = qpack_cli("pack", "m.pt", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    notes = " ".join(report["notes"])
    assert "kept epoch, lr, arch, flag, history, nothing, nan as plain data" in notes and "left out" not in notes
    meta = qpack.info(tmp_path / "m.qpk").metadata
    assert "qpack.structure" in meta and not any(key.startswith("state.") for key in meta)
    assert list(qpack.load(tmp_path / "m.qpk")) == ["fc.weight"]
    proc = qpack_cli("unpack", "m.qpk", "-o", "back.pt", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    back = torch.load(tmp_path / "back.pt", weights_only=True)
    assert list(back) == list(state) and math.isnan(back.pop("nan"))
    assert {k: v for k, v in back.items() if k != "fc.weight"} == {
        k: v for k, v in state.items() if k not in ("fc.weight", "nan")}


def test_nan_and_inf_are_stored_raw_and_reported(tmp_path):
    gen = torch.Generator().manual_seed(4)
    w = torch.randn(32, 32, generator=gen)
    w[0, 0], w[1, 1], w[2, 2] = float("nan"), float("inf"), float("-inf")
    w.view(torch.int32)[3, 3] = 0x7FC00123  # a NaN with a payload
    half = torch.randn(16, 16, generator=gen).half()
    half[5, 5] = float("nan")
    torch.save({"w": w, "half": half, "fine": torch.randn(32, 32, generator=gen)}, tmp_path / "m.pt")
    proc = qpack_cli("pack", "m.pt", "-b", "4", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "NaN or Inf" in proc.stdout
    report = json.loads(qpack_cli("pack", "m.pt", "-o", "j.qpk", "--json", cwd=tmp_path).stdout)
    rows = {row["name"]: row for row in report["tensors"]}
    assert rows["w"]["encoding"] == "raw" and "NaN or Inf" in rows["w"]["reason"]
    assert rows["half"]["encoding"] == "raw" and rows["fine"]["encoding"] == "uniform"
    back = qpack.load(tmp_path / "m.qpk")
    assert back["w"].view(torch.int32).equal(w.view(torch.int32))  # bit-exact, NaN payloads too
    assert back["half"].view(torch.int16).equal(half.view(torch.int16))


def test_trust_pickle_accepts_a_whole_module(inputs, tmp_path):
    proc = run_in(inputs, tmp_path, "pack", "module.pt", "-o", "m.qpk", "--trust-pickle", "--min-numel", "1")
    assert proc.returncode == 0, proc.stderr
    assert set(qpack.load(tmp_path / "m.qpk")) == {"0.weight", "0.bias"}


def test_a_qpk_with_the_wrong_suffix_is_still_recognised(inputs, tmp_path):
    (tmp_path / "renamed.pt").write_bytes((inputs / "good.qpk").read_bytes())
    fails_cleanly(qpack_cli("pack", "renamed.pt", "-o", "x.qpk", cwd=tmp_path), 2, "already a .qpk file")
    assert not (tmp_path / "x.qpk").exists()


def test_header_crafted_by_hand_unknown_version_names_it(tmp_path):
    header = b"\x82\xa7tensors\x90\xa8metadata\x80"
    preamble = struct.pack("<8sIIII", MAGIC, 6, len(header), zlib.crc32(header), 0)
    (tmp_path / "v6.qpk").write_bytes(preamble + header + bytes(64 - len(preamble + header) % 64))
    fails_cleanly(qpack_cli("info", "v6.qpk", cwd=tmp_path), 4, "version 6", "upgrade")
