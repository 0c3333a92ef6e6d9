"""Memory bounds (spec R23) and allocation failures: small files that declare huge tensors.

The bombs are the ones issue 13 found: a few KB of zstd frame (run-length blocks, each 4
bytes for 128 KiB of zeros) that declare 2^30 or 2^31 elements. They are refused when
opened, before any payload is read, unless the caller allows more (``max_bytes``); with
consent, ``verify`` still checks them in bounded memory, and a failed allocation is an
OutOfMemoryError (exit 5) naming the tensor and the bytes.
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from test_reader_rules import assemble, sample_bytes, split  # noqa: F401 - a fixture

import qpack
from qpack import FormatError, OutOfMemoryError, QpkError, QpkReader
from qpack.format import DECODED_BYTES_PER_FILE_BYTE, DECODED_FLOOR_BYTES, default_max_bytes
from qpack.reader import _CHECK_WHOLE_BYTES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ZSTD_BLOCK = 1 << 17


def zstd_frame(pieces: list[bytes | tuple[int, int]]) -> bytes:
    """One zstd frame (RFC 8878) built by hand: ``bytes`` as raw blocks, ``(value, count)`` as
    run-length blocks; the header declares the content size (single segment, no checksum)."""
    total = sum(len(p) if isinstance(p, bytes) else p[1] for p in pieces)
    out = bytearray(struct.pack("<IB", 0xFD2FB528, 0xE0)) + struct.pack("<Q", total)
    for i, piece in enumerate(pieces):
        last = int(i == len(pieces) - 1)
        size, kind, body = (len(piece), 0, piece) if isinstance(piece, bytes) else (piece[1], 1, bytes([piece[0]]))
        out += ((size << 3) | (kind << 1) | last).to_bytes(3, "little") + body
    return bytes(out)


def runs(value: int, count: int) -> list[tuple[int, int]]:
    """Run-length blocks of ``count`` bytes of ``value``."""
    return [(value, ZSTD_BLOCK)] * (count // ZSTD_BLOCK) + ([(value, count % ZSTD_BLOCK)] if count % ZSTD_BLOCK else [])


def zeros_frame(count: int) -> bytes:
    """A frame of ``count`` zero bytes, 4 bytes per 128 KiB."""
    return zstd_frame(runs(0, count))


def bomb(numel: int, dtype: str = "float16", encoding: str = "uniform", frame: bytes | None = None,
         codebook_size: int = 1) -> bytes:
    """A valid file of one 1-bit tensor of ``numel`` elements, its indices all 0 in a zstd frame."""
    raw_length = (numel + 7) // 8
    frame = zeros_frame(raw_length) if frame is None else frame
    params = ({"min": np.float32([-1]).tobytes(), "max": np.float32([1]).tobytes()} if encoding == "uniform"
              else {"codebook": np.float32([0.5] * codebook_size).tobytes(), "codebook_size": codebook_size})
    entry = {"name": "bomb", "dtype": dtype, "shape": [numel], "encoding": encoding, "bits": 1, "width": 1,
             "granularity": "tensor", "group_size": 0, "params": params, "offset": 0, "length": len(frame),
             "raw_length": raw_length, "compression": "zstd", "crc32": zlib.crc32(frame), "stats": {}}
    return assemble({"tensors": [entry], "metadata": {}}, frame)


BOMBS = {  # the three of issue 13
    "2^30-float16": (1 << 30, "float16"),
    "2^30-float32": (1 << 30, "float32"),
    "2^31-float32": (1 << 31, "float32"),
}


@pytest.fixture(scope="module")
def bombs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("bombs")
    paths = {}
    for label, (numel, dtype) in BOMBS.items():
        paths[label] = folder / f"{label}.qpk"
        paths[label].write_bytes(bomb(numel, dtype))
    return paths


def test_bombs_are_small_valid_files(bombs):
    sizes = {label: path.stat().st_size for label, path in bombs.items()}
    assert sizes["2^30-float16"] < 8192 and sizes["2^31-float32"] < 20_000, sizes
    for path in bombs.values():
        with QpkReader(path, max_bytes=None) as reader:  # every rule at open holds (R1-R17)
            assert reader.entry("bomb").numel >= 1 << 30


@pytest.mark.parametrize("label", sorted(BOMBS))
def test_bombs_are_refused_before_anything_is_read(bombs, tmp_path, label):
    numel, dtype = BOMBS[label]
    declared = numel * (2 if dtype == "float16" else 4)
    calls = {
        "QpkReader": lambda p: QpkReader(p),
        "load": lambda p: qpack.load(p),
        "verify": lambda p: qpack.verify(p),
        "unpack": lambda p: qpack.unpack(p, tmp_path / "out.pt", force=True),
    }
    for what, call in calls.items():
        tracemalloc.start()
        started = time.process_time()
        try:
            with pytest.raises(OutOfMemoryError) as caught:
                call(bombs[label])
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        assert time.process_time() - started < 5, what  # generous: refused from the header alone
        assert peak < 2_000_000, (what, peak)
        text = str(caught.value)
        assert text.startswith("out of memory") and "'bomb'" in text and f"{declared:,}" in text, text
        assert caught.value.rule == "R23" and isinstance(caught.value, (QpkError, MemoryError))
        assert not (tmp_path / "out.pt").exists()


def test_cli_refuses_bombs_with_exit_5_and_info_still_works(bombs, tmp_path, capsys):
    from qpack.cli import main

    path = str(bombs["2^30-float16"])
    for command in (["verify", path], ["unpack", path, "-o", str(tmp_path / "x.pt")]):
        assert main(command) == 5, command
        err = capsys.readouterr().err
        assert "out of memory" in err and "'bomb'" in err and "2,147,483,648" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.pt").exists()
    assert main(["info", path]) == 0
    assert "bomb" in capsys.readouterr().out


def test_default_bound_and_caller_bounds(tmp_path, sample_bytes):
    path = tmp_path / "s.qpk"
    path.write_bytes(sample_bytes)
    size = len(sample_bytes)
    assert default_max_bytes(size) == DECODED_FLOOR_BYTES == 16 << 20
    assert default_max_bytes(1 << 20) == DECODED_BYTES_PER_FILE_BYTE << 20
    with QpkReader(path, max_bytes=None) as reader:
        total = sum(e.numel * qpack.dtypes.itemsize(e.dtype) for e in reader.entries.values())
    assert len(qpack.load(path, max_bytes=total)) == len(qpack.load(path))  # the bound is inclusive
    for call in (lambda: qpack.load(path, max_bytes=total - 1), lambda: qpack.verify(path, max_bytes=total - 1)):
        with pytest.raises(OutOfMemoryError) as caught:
            call()
        assert f"{total:,}" in str(caught.value) and f"{total - 1:,}" in str(caught.value)
    with pytest.raises(qpack.InputError):
        QpkReader(path, max_bytes=-1)


def test_every_vector_is_within_the_default_bound():
    for path in sorted((Path(__file__).parents[1] / "specs" / "vectors").glob("*.qpk")):
        assert qpack.verify(path) >= 1


def test_a_failed_allocation_names_the_tensor_and_the_bytes(tmp_path, sample_bytes, monkeypatch):
    path = tmp_path / "s.qpk"
    path.write_bytes(sample_bytes)

    def refuse(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                           "memory: you tried to allocate 4294967296 bytes. Error code 12 (Cannot allocate memory)")

    monkeypatch.setattr(qpack.reader, "decode_payload", refuse)
    for call in (qpack.load, qpack.verify):
        with pytest.raises(OutOfMemoryError) as caught:
            call(path)
        assert "'raw.f32'" in str(caught.value) and "48 bytes" in str(caught.value)
        assert caught.value.rule is None
    monkeypatch.setattr(qpack.reader, "decode_payload", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="a bug"):  # other errors are not dressed up as memory
        qpack.load(path)


def _limited(*commands: list[str], limit_mb: int = 1800) -> list[tuple[int, str, str]]:
    """(exit status, stdout, stderr) of each CLI command, run in one process whose address
    space is capped, so that an allocation of gigabytes fails for real."""
    code = ("import contextlib, io, json, resource, sys; resource.setrlimit(resource.RLIMIT_AS, ({0}, {0}))\n"
            "from qpack.cli import main\nresults = []\n"
            "for argv in json.loads(sys.argv[1]):\n"
            "    out, err = io.StringIO(), io.StringIO()\n"
            "    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):\n"
            "        status = main(argv)\n"
            "    results.append((status, out.getvalue(), err.getvalue()))\n"
            "print(json.dumps(results))").format(limit_mb << 20)
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(commands)], capture_output=True, text=True,
                          timeout=300, env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stderr
    return [tuple(r) for r in json.loads(proc.stdout)]


def test_real_allocation_failure_is_exit_5_and_verify_streams(bombs, tmp_path):
    path = str(bombs["2^31-float32"])  # 8 GiB of float32 from 12 KB
    unpacked, verified = _limited(["unpack", path, "-o", str(tmp_path / "x.pt"), "--max-bytes", "unlimited"],
                                  ["verify", path, "--max-bytes", "unlimited"])
    status, _, err = unpacked
    assert status == 5, err
    assert "out of memory" in err and "'bomb'" in err and "8,589,934,592" in err
    assert "Traceback" not in err and not (tmp_path / "x.pt").exists()
    # verify checks the same file piece by piece within the same cap
    status, out, err = verified
    assert status == 0 and "OK (1 tensors" in out, err


# -- verify in pieces finds what decoding finds -------------------------------------------------

BIG = (1 << 24) + (1 << 17)  # 64.5 MiB of float32: checked in pieces


def _outcomes(tmp_path: Path, data: bytes) -> tuple[str | None, str | None]:
    """(rule from verify in pieces, rule from decoding whole); None when accepted."""
    path = tmp_path / "big.qpk"
    path.write_bytes(data)
    rules = []
    for streamed in (True, False):
        try:
            with QpkReader(path, max_bytes=None) as reader:
                if streamed:
                    qpack.verify(path, max_bytes=None)
                else:
                    reader.tensor("bomb")
            rules.append(None)
        except FormatError as exc:
            rules.append(exc.rule)
    return rules[0], rules[1]


def test_verify_in_pieces_agrees_with_decoding(tmp_path):
    assert BIG * 4 > _CHECK_WHOLE_BYTES
    packed = BIG // 8
    one_index = zstd_frame(runs(0, 10 * ZSTD_BLOCK) + [b"\x10"] + runs(0, packed - 10 * ZSTD_BLOCK - 1))
    cases = {
        "valid": (bomb(BIG, "float32", "kmeans"), None),
        "index-past-codebook": (bomb(BIG, "float32", "kmeans", one_index), "R20"),
        "two-entry-codebook": (bomb(BIG, "float32", "kmeans", one_index, codebook_size=2), None),
        "bytes-after-frame": (bomb(BIG, "float32", "kmeans", zeros_frame(packed) + b"\x00"), "R19"),
        "frame-too-short": (bomb(BIG, "float32", "kmeans", zeros_frame(packed - 1)), "R19"),
    }
    # a frame that holds one byte more than it declares
    longer = bytearray(zeros_frame(packed + 1))
    longer[5:13] = struct.pack("<Q", packed)
    cases["frame-longer-than-declared"] = (bomb(BIG, "float32", "kmeans", bytes(longer)), "R19")
    # a bad checksum is found before the payload is looked at
    data = bytearray(cases["index-past-codebook"][0])
    data[-1] ^= 0x01
    cases["checksum"] = (bytes(data), "R18")
    for label, (data, expected) in cases.items():
        assert _outcomes(tmp_path, data) == (expected, expected), label


def test_verify_in_pieces_checks_unused_bits_and_bools(tmp_path):
    numel = BIG + 3  # 3 bits used in the last byte
    packed = (numel + 7) // 8
    assert _outcomes(tmp_path, bomb(numel, "float32", "uniform", zstd_frame(runs(0, packed - 1) + [b"\x07"]))) \
        == (None, None)
    assert _outcomes(tmp_path, bomb(numel, "float32", "uniform", zstd_frame(runs(0, packed - 1) + [b"\x08"]))) \
        == ("R20", "R20")
    # raw bool bytes
    count = (64 << 20) + 8
    for last, expected in ((b"\x01", None), (b"\x02", "R20")):
        frame = zstd_frame(runs(1, count - 1) + [last])
        entry = {"name": "bomb", "dtype": "bool", "shape": [count], "encoding": "raw", "bits": 0, "width": 0,
                 "granularity": "tensor", "group_size": 0, "params": {}, "offset": 0, "length": len(frame),
                 "raw_length": count, "compression": "zstd", "crc32": zlib.crc32(frame), "stats": {}}
        assert _outcomes(tmp_path, assemble({"tensors": [entry], "metadata": {}}, frame)) == (expected, expected)


def test_verify_in_pieces_of_an_uncompressed_payload(tmp_path):
    count = (64 << 20) + 8
    payload = bytearray(count)
    payload[count // 2] = 1
    entry = {"name": "bomb", "dtype": "bool", "shape": [count], "encoding": "raw", "bits": 0, "width": 0,
             "granularity": "tensor", "group_size": 0, "params": {}, "offset": 0, "length": count,
             "raw_length": count, "compression": "none", "crc32": zlib.crc32(payload), "stats": {}}
    doc = {"tensors": [entry], "metadata": {}}
    assert _outcomes(tmp_path, assemble(doc, bytes(payload))) == (None, None)
    payload[7] = 3
    entry["crc32"] = zlib.crc32(payload)
    assert _outcomes(tmp_path, assemble(doc, bytes(payload))) == ("R20", "R20")
    entry["crc32"] ^= 1
    assert _outcomes(tmp_path, assemble(doc, bytes(payload))) == ("R18", "R18")


def test_pack_notes_a_file_beyond_the_default_bound(tmp_path):
    zeros = torch.zeros(5_000_000)  # 20 MB of float32 in a file of a few hundred bytes
    report = qpack.pack({"z": zeros}, tmp_path / "z.qpk")
    assert report.file_bytes < 4096
    assert any("R23" in note and "max_bytes=None" in note for note in report.notes), report.notes
    with pytest.raises(OutOfMemoryError):
        qpack.load(tmp_path / "z.qpk")
    assert torch.equal(qpack.load(tmp_path / "z.qpk", max_bytes=None)["z"], zeros)
    small = qpack.pack({"z": torch.zeros(1000)}, tmp_path / "s.qpk")
    assert not any("R23" in note for note in small.notes)
