"""One test per reader rule (specs/qpk-format.md section 5), plus files that broke other parsers.

Each test crafts a file that breaks one rule, writing the header with msgpack directly and
re-computing the header checksum (except for R5), and checks the error class and
``exc.rule``. The crafting helpers here are also used by test_fuzz.py. The sample file is
version 1 (a plain header with every key, easy to edit); the rules that version 3 adds or
changes (compressed header, compact entries, float16 parameters, byte planes) have their
own sample and tests at the end.
"""

from __future__ import annotations

import math
import struct
import time
import tracemalloc
import zlib
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import torch
import zstandard

import qpack
from qpack import (
    ChecksumError,
    FormatError,
    QpkError,
    QpkReader,
    UnsupportedVersionError,
)
from qpack.bitpack import pack_bits
from qpack.format import MAGIC, PREAMBLE_SIZE, TensorEntry, align, expected_raw_length
from qpack.writer import QpkWriter

# -- a small valid file with every kind of entry ---------------------------------------------


def _f32(values: Any) -> bytes:
    return np.asarray(values, dtype="<f4").tobytes()


def _entry(name: str, tensor: torch.Tensor, encoding: str = "raw", bits: int = 0,
           granularity: str = "tensor", params: dict | None = None, width: int = 0,
           group_size: int = 0) -> TensorEntry:
    from qpack.dtypes import name_of_dtype

    dtype = name_of_dtype(tensor.dtype)
    shape = tuple(tensor.shape)
    width = width or bits
    return TensorEntry(name, dtype, shape, encoding, bits, granularity, params or {},
                       raw_length=expected_raw_length(dtype, shape, encoding, width),
                       width=width, group_size=group_size)


def sample_tensors() -> list[tuple[TensorEntry, bytes, torch.Tensor]]:
    """(entry, stored payload, expected decoded tensor) for each encoding, small and fixed."""
    gen = torch.Generator().manual_seed(5)
    out = []
    # raw: float32, bool, int64 0-d, empty
    w = torch.randn(3, 4, generator=gen)
    out.append((_entry("raw.f32", w), w.numpy().tobytes(), w))
    flags = torch.tensor([True, False, True, True, False])
    out.append((_entry("raw.bool", flags), flags.numpy().tobytes(), flags))
    scalar = torch.tensor(-7, dtype=torch.int64)
    out.append((_entry("raw.scalar", scalar), scalar.numpy().tobytes(), scalar))
    empty = torch.empty(0, 3)
    out.append((_entry("raw.empty", empty), b"", empty))
    # raw, zstd-compressed
    zeros = torch.zeros(64, 8)
    entry = _entry("raw.zstd", zeros)
    stored = zstandard.ZstdCompressor(level=3).compress(zeros.numpy().tobytes())
    entry.compression = "zstd"
    out.append((entry, stored, zeros))
    # uniform, per tensor, 3 bits (a partly used last byte)
    idx = torch.randint(0, 8, (5, 7), generator=gen)
    lo, hi = -1.0, 2.5
    step = np.float32(np.float32(hi - lo) / np.float32(7))
    values = (np.float32(lo) + (step * idx.numpy().astype(np.float32))).astype(np.float32)
    entry = _entry("uniform.b3", torch.zeros(5, 7), "uniform", 3,
                   params={"min": _f32([lo]), "max": _f32([hi])})
    out.append((entry, pack_bits(idx, 3).numpy().tobytes(), torch.from_numpy(values)))
    # uniform, per channel, float16, 5 bits
    idx = torch.randint(0, 32, (3, 6), generator=gen)
    lows, highs = np.float32([-1, 0, 0.5]), np.float32([1, 0, 4])
    steps = (highs - lows) / np.float32(31)
    values = (lows[:, None] + (steps[:, None] * idx.numpy().astype(np.float32))).astype(np.float32)
    entry = _entry("uniform.channel", torch.zeros(3, 6, dtype=torch.float16), "uniform", 5, "channel",
                   {"min": _f32(lows), "max": _f32(highs)})
    out.append((entry, pack_bits(idx, 5).numpy().tobytes(), torch.from_numpy(values).half()))
    # uniform, 8 bits, zstd (a constant run compresses)
    idx = torch.full((40, 10), 3)
    entry = _entry("uniform.zstd", torch.zeros(40, 10), "uniform", 8,
                   params={"min": _f32([0.0]), "max": _f32([255.0])})
    entry.compression = "zstd"
    stored = zstandard.ZstdCompressor(level=3).compress(pack_bits(idx, 8).numpy().tobytes())
    out.append((entry, stored, torch.full((40, 10), 3.0)))
    # kmeans, 2 bits, a 3-entry codebook
    book = np.float32([-0.5, 0.25, 4.0])
    idx = torch.randint(0, 3, (4, 5), generator=gen)
    entry = _entry("kmeans.b2", torch.zeros(4, 5), "kmeans", 2,
                   params={"codebook": _f32(book), "codebook_size": 3})
    out.append((entry, pack_bits(idx, 2).numpy().tobytes(), torch.from_numpy(book[idx.numpy()])))
    # kmeans, per channel, 4 bits, bfloat16
    books = np.float32([[0, 1, 2, 3], [-4, -3, -2, -1]])
    idx = torch.randint(0, 4, (2, 9), generator=gen)
    entry = _entry("kmeans.channel", torch.zeros(2, 9, dtype=torch.bfloat16), "kmeans", 4, "channel",
                   {"codebook": _f32(books), "codebook_size": 4})
    values = np.stack([books[c][idx[c].numpy()] for c in range(2)])
    out.append((entry, pack_bits(idx, 4).numpy().tobytes(), torch.from_numpy(values).bfloat16()))
    # uniform, 3 bits stored in 4-bit containers (width > bits)
    idx = torch.randint(0, 8, (6, 5), generator=gen)
    step = np.float32(np.float32(1.0) / np.float32(7))
    entry = _entry("uniform.wide", torch.zeros(6, 5), "uniform", 3, width=4,
                   params={"min": _f32([0.0]), "max": _f32([1.0])})
    values = (step * idx.numpy().astype(np.float32)).astype(np.float32)
    out.append((entry, pack_bits(idx, 4).numpy().tobytes(), torch.from_numpy(values)))
    # kmeans in groups of 16 elements: 40 elements, so 3 groups, the last one short
    books = np.float32([[0, 1], [10, 11], [-5, -6]])
    idx = torch.randint(0, 2, (40,), generator=gen)
    entry = _entry("kmeans.group", torch.zeros(5, 8), "kmeans", 1, "group",
                   {"codebook": _f32(books), "codebook_size": 2}, group_size=16)
    values = books[np.arange(40) // 16, idx.numpy()].reshape(5, 8)
    out.append((entry, pack_bits(idx, 1).numpy().tobytes(), torch.from_numpy(values)))
    return out


def write_sample(path: Path, version: int = 1) -> dict[str, torch.Tensor]:
    """Write the sample file (version 1 unless asked; version 3 or later adds ``sample3_tensors``);
    returns the tensors it decodes to."""
    writer = QpkWriter(path, overwrite=True, metadata={"qpack.version": "test", "note": "sample"}, version=version)
    expected = {}
    for entry, stored, tensor in sample_tensors() + (sample3_tensors() if version >= 3 else []):
        writer.add(entry, stored)
        expected[entry.name] = tensor
    writer.finish()
    return expected


@pytest.fixture(scope="module")
def sample_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("sample") / "sample.qpk"
    write_sample(path)
    return path.read_bytes()


# -- taking a file apart and putting it back together ------------------------------------------


def split(data: bytes) -> tuple[dict, list[bytes]]:
    """(header document, stored payloads) of a valid file."""
    _, _, header_length, _, _ = struct.unpack("<8sIIII", data[:PREAMBLE_SIZE])
    doc = msgpack.unpackb(data[PREAMBLE_SIZE:PREAMBLE_SIZE + header_length], raw=False)
    start = align(PREAMBLE_SIZE + header_length)
    payloads = [data[start + t["offset"]: start + t["offset"] + t["length"]] for t in doc["tensors"]]
    return doc, payloads


def lay_out(doc: dict, payloads: list[bytes]) -> bytes:
    """Fill in offset, length and crc32 of every entry from ``payloads``; the data section."""
    data = bytearray()
    for entry, payload in zip(doc["tensors"], payloads):
        data += bytes(align(len(data)) - len(data))
        entry["offset"], entry["length"], entry["crc32"] = len(data), len(payload), zlib.crc32(payload)
        data += payload
    return bytes(data)


def assemble(header: bytes | dict, data: bytes, *, version: int = 1, reserved: int = 0,
             crc: int | None = None, header_length: int | None = None) -> bytes:
    """Preamble + header + zero padding + data section, with a correct checksum unless given."""
    if isinstance(header, dict):
        header = msgpack.packb(header, use_bin_type=True)
    preamble = struct.pack("<8sIIII", MAGIC, version,
                           len(header) if header_length is None else header_length,
                           zlib.crc32(header) if crc is None else crc, reserved)
    head = preamble + header
    return head + bytes(align(len(head)) - len(head)) + data


def rewrite(path: Path, out: Path, version: int) -> bytes:
    """The file at ``path`` written again as ``version`` (same entries, payloads and metadata),
    e.g. a file packed as version 3 as the version-2 file an older qpack wrote."""
    with QpkReader(path) as reader:
        entries = list(reader.entries.values())
        with open(path, "rb") as handle:
            data = handle.read()
        payloads = [data[reader.data_start + e.offset: reader.data_start + e.offset + e.length] for e in entries]
        writer = QpkWriter(out, overwrite=True, metadata=reader.metadata, version=version)
    for entry, payload in zip(entries, payloads):
        writer.add(entry, payload)
    writer.finish()
    return out.read_bytes()


def rebuild(doc: dict, payloads: list[bytes]) -> bytes:
    """A file from a (possibly edited) document and payloads, laid out as the spec says."""
    data = lay_out(doc, payloads)
    return assemble(doc, data)


def open_and_read_all(path: Path) -> dict[str, torch.Tensor]:
    with QpkReader(path) as reader:
        return {name: reader.tensor(name) for name in reader}


def rejects(tmp_path: Path, data: bytes, rule: str, error: type = FormatError,
            on_read: bool = False) -> FormatError:
    """Check that ``data`` is rejected with ``error`` naming ``rule``, at open or on read."""
    path = tmp_path / "crafted.qpk"
    path.write_bytes(data)
    if on_read:
        reader = QpkReader(path)  # the layout is fine: the payload is checked when read
        with pytest.raises(error) as caught:
            for name in reader:
                reader.tensor(name)
        reader.close()
    else:
        with pytest.raises(error) as caught:
            QpkReader(path)
    assert caught.value.rule == rule, caught.value
    assert f"[{rule}]" in str(caught.value)
    return caught.value


def edited(sample: bytes, edit: Any, index: int | None = 0) -> bytes:
    """The sample with its header changed by ``edit(entry)`` (``edit(doc)`` with index None).

    The data section stays as it was; offsets, lengths and checksums are not re-derived.
    """
    doc, payloads = split(sample)
    data = lay_out(doc, payloads)
    edit(doc if index is None else doc["tensors"][index])
    return assemble(doc, data)


def json_copy(doc: dict) -> dict:
    return msgpack.unpackb(msgpack.packb(doc, use_bin_type=True), raw=False)


def index_of(doc: dict, name: str) -> int:
    return [t["name"] for t in doc["tensors"]].index(name)


# -- the sample itself ---------------------------------------------------------------------------


def test_sample_round_trips_and_tools_agree(tmp_path):
    expected = write_sample(tmp_path / "s.qpk")
    encodings = {t["encoding"] for t in split((tmp_path / "s.qpk").read_bytes())[0]["tensors"]}
    assert encodings == {"raw", "uniform", "kmeans"}
    loaded = open_and_read_all(tmp_path / "s.qpk")
    assert list(loaded) == list(expected)
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    data = (tmp_path / "s.qpk").read_bytes()
    assert rebuild(*split(data)) == data  # the helpers reproduce the writer's bytes
    assert qpack.verify(tmp_path / "s.qpk") == len(expected)


# -- R1..R5: the preamble and the header checksum ----------------------------------------------


def test_r1_short_file_and_bad_magic(tmp_path, sample_bytes):
    rejects(tmp_path, sample_bytes[:23], "R1")
    rejects(tmp_path, b"", "R1")
    rejects(tmp_path, b"PK\x03\x04" + sample_bytes[4:], "R1")
    bad = bytearray(sample_bytes)
    bad[6] ^= 0x04  # '\x1a' -> '\x1e'
    exc = rejects(tmp_path, bytes(bad), "R1")
    assert "not a .qpk file" in str(exc)


def test_r2_unsupported_version_is_named(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    for version in (0, 6, 0xFFFFFFFF):
        exc = rejects(tmp_path, assemble(doc, lay_out(doc, payloads), version=version), "R2",
                      UnsupportedVersionError)
        assert f"version {version}" in str(exc) and "1, 2, 3, 4, 5" in str(exc)


def test_r3_reserved_field_must_be_zero(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    rejects(tmp_path, assemble(doc, lay_out(doc, payloads), reserved=1), "R3")


def test_r4_header_length(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    data = lay_out(doc, payloads)
    rejects(tmp_path, assemble(doc, data, header_length=0), "R4")
    rejects(tmp_path, assemble(doc, data, header_length=256 * 1024 * 1024 + 1), "R4")
    rejects(tmp_path, assemble(doc, data, header_length=len(sample_bytes)), "R4")  # past EOF
    rejects(tmp_path, assemble(doc, b"", header_length=0xFFFFFFFF), "R4")


def test_r5_header_checksum(tmp_path, sample_bytes):
    bad = bytearray(sample_bytes)
    bad[PREAMBLE_SIZE + 10] ^= 0x01
    rejects(tmp_path, bytes(bad), "R5", ChecksumError)
    bad = bytearray(sample_bytes)
    bad[16] ^= 0x80  # the stored checksum itself
    rejects(tmp_path, bytes(bad), "R5", ChecksumError)


# -- R6..R8: msgpack with limits and the shape of the document ------------------------------------


@pytest.mark.parametrize("header", [
    pytest.param(b"\x92\x80\x90", id="array-not-map"),
    pytest.param(b"\x81\xa7tensors\x90", id="one-key"),
    pytest.param(b"\x83\xa7tensors\x90\xa8metadata\x80\xa5extra\xc0", id="extra-key"),
    pytest.param(b"\x82\xa7tensors\x90\xa7tensors\x90", id="repeated-key"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata\x80\xc0", id="trailing-object"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata", id="truncated"),
    pytest.param(b"\xc1", id="never-used-byte"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata\x81\xa1k\xd4\x01\x00", id="ext-type"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata\x81\xa1k\xc7\x00\x05", id="empty-ext"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata\x81\xa1k\xdb\xff\xff\xff\xff", id="str-2^32"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata\x81\xa1k\xc6\xff\xff\xff\xff", id="bin-2^32"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata\x81\xa1k\xdd\xff\xff\xff\xff", id="array-2^32"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata\x81\xa1k\xdf\xff\xff\xff\xff", id="map-2^32"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata\x81\xa1k\xa2\xff\xfe", id="bad-utf8-value-is-R7"),
    pytest.param(b"\x82\x01\x90\xa8metadata\x80", id="int-key"),
    pytest.param(b"\x82\xa7tensors\x90\xa8metadata\x82\xa1k\xa1v\xa1k\xa1w", id="metadata-repeats-key"),
])
def test_r6_header_is_one_map_decoded_with_limits(tmp_path, sample_bytes, header):
    rule = "R7" if header.endswith(b"\xa2\xff\xfe") else "R6"
    rejects(tmp_path, assemble(header, b""), rule)


def test_r6_repeated_key_inside_an_entry(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    data = lay_out(doc, payloads)
    header = msgpack.packb(doc, use_bin_type=True)
    first = msgpack.packb(doc["tensors"][0], use_bin_type=True)
    count = first[0] - 0x80
    assert 0 < count < 16  # a fixmap: its count is in the first byte
    repeated = b"\xde" + (count + 1).to_bytes(2, "big") + first[1:] + msgpack.packb("bits") + msgpack.packb(0)
    rejects(tmp_path, assemble(header.replace(first, repeated, 1), data), "R6")


def test_r6_deep_nesting_fails_fast(tmp_path, sample_bytes):
    for opener in (b"\x91", b"\x81\xa1k"):
        header = b"\x82\xa7tensors\x90\xa8metadata\x81\xa1k" + opener * 100_000 + b"\xc0"
        started = time.perf_counter()
        rejects(tmp_path, assemble(header, b""), "R6")
        assert time.perf_counter() - started < 1.0


def test_r7_metadata_map_of_strings(tmp_path, sample_bytes):
    def set_meta(value):
        return lambda doc: doc.__setitem__("metadata", value)
    for bad in ([], {"k": 1}, {"k": b"bytes"}, {"k": None}, {"k" * 257: "v"}, {"é" * 129: "v"},
                {str(i): "" for i in range(4097)}):
        rejects(tmp_path, edited(sample_bytes, set_meta(bad), None), "R7")
    # a value over 65,536 bytes is already past msgpack's string limit (R6)
    rejects(tmp_path, edited(sample_bytes, set_meta({"k": "v" * 65537}), None), "R6")
    ok = edited(sample_bytes, set_meta({"k" * 256: "v" * 65536, "é": ""}), None)
    (tmp_path / "ok.qpk").write_bytes(ok)
    assert len(QpkReader(tmp_path / "ok.qpk").metadata["k" * 256]) == 65536


def test_r8_tensor_entries_have_exactly_the_keys_and_types(tmp_path, sample_bytes):
    rejects(tmp_path, edited(sample_bytes, lambda d: d.__setitem__("tensors", {}), None), "R8")
    rejects(tmp_path, edited(sample_bytes, lambda d: d["tensors"].__setitem__(0, [1]), None), "R8")
    rejects(tmp_path, edited(sample_bytes, lambda e: e.pop("stats")), "R8")
    rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("extra", 1)), "R8")
    for key, value in [("bits", "0"), ("bits", -1), ("bits", True), ("bits", 0.0), ("offset", -64),
                       ("length", None), ("raw_length", -1),
                       ("crc32", 1 << 32), ("crc32", -1), ("dtype", b"float32"), ("encoding", 1),
                       ("compression", ["none"]), ("granularity", None)]:
        rejects(tmp_path, edited(sample_bytes, lambda e, k=key, v=value: e.__setitem__(k, v)), "R8")


def test_r9_names_valid_unique_bounded(tmp_path, sample_bytes):
    rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("name", "")), "R9")
    rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("name", "n" * 1025)), "R9")
    rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("name", 7)), "R9")
    rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("name", "raw.bool")), "R9")
    # 1024 bytes of UTF-8 is fine, 1025 is not, whatever the characters
    ok = edited(sample_bytes, lambda e: e.__setitem__("name", "é" * 512))
    (tmp_path / "ok.qpk").write_bytes(ok)
    QpkReader(tmp_path / "ok.qpk").close()
    rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("name", "é" * 512 + "x")), "R9")
    # invalid UTF-8 in a msgpack str
    doc, payloads = split(sample_bytes)
    header = msgpack.packb(doc, use_bin_type=True).replace(b"\xa7raw.f32", b"\xa7raw.\xff32", 1)
    exc = rejects(tmp_path, assemble(header, lay_out(doc, payloads)), "R9")
    assert "UTF-8" in str(exc)


def test_r10_dtype_in_the_table(tmp_path, sample_bytes):
    for dtype in ("complex64", "float128", "torch.float32", "qint8", ""):
        exc = rejects(tmp_path, edited(sample_bytes, lambda e, d=dtype: e.__setitem__("dtype", d)), "R10")
        assert repr(dtype) in str(exc)


@pytest.mark.parametrize("shape", [
    [1] * 33, [-1, 3], [3, -4], [2 ** 48 + 1], [2 ** 63], [2 ** 64 - 1], [1.5], ["3"], [True],
    [2 ** 32, 2 ** 32],  # wraps to 0 in 64-bit arithmetic
    [2 ** 32 + 1, 2 ** 32],  # wraps to 2^32
    [2 ** 24, 2 ** 24, 2 ** 24],
    [3, [4]], {"a": 1}, "3x4",
])
def test_r11_shape_bounded_without_overflow(tmp_path, sample_bytes, shape):
    rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("shape", shape)), "R11")


def test_r12_encoding_bits_granularity(tmp_path, sample_bytes):
    doc, _ = split(sample_bytes)
    uniform, group = index_of(doc, "uniform.b3"), index_of(doc, "kmeans.group")
    cases = [
        (0, lambda e: e.__setitem__("encoding", "gptq")),
        (0, lambda e: e.__setitem__("granularity", "group")),
        (0, lambda e: e.__setitem__("bits", 8)),  # raw with bits
        (0, lambda e: e.__setitem__("granularity", "channel")),  # raw per channel
        (uniform, lambda e: e.__setitem__("bits", 0)),
        (uniform, lambda e: e.__setitem__("bits", 17)),
        (uniform, lambda e: e.__setitem__("bits", 2 ** 64 - 1)),
        (uniform, lambda e: e.__setitem__("dtype", "int32")),
        (uniform, lambda e: e.__setitem__("shape", [0, 7])),
        (uniform, lambda e: (e.__setitem__("shape", []), e.__setitem__("granularity", "channel"))),
        (0, lambda e: e.__setitem__("width", 8)),  # raw with a container width
        (0, lambda e: e.__setitem__("group_size", 16)),  # raw in groups
        (uniform, lambda e: e.__setitem__("width", 2)),  # narrower than bits
        (uniform, lambda e: e.__setitem__("width", 17)),
        (uniform, lambda e: e.__setitem__("group_size", 16)),  # group_size without "group"
        (group, lambda e: e.__setitem__("group_size", 8)),
        (group, lambda e: e.__setitem__("group_size", 65537)),
        (group, lambda e: e.__setitem__("group_size", 0)),
    ]
    for index, edit in cases:
        rejects(tmp_path, edited(sample_bytes, edit, index), "R12")


def test_r13_params(tmp_path, sample_bytes):
    doc, _ = split(sample_bytes)
    uniform, channel = index_of(doc, "uniform.b3"), index_of(doc, "uniform.channel")
    kmeans = index_of(doc, "kmeans.b2")

    def params(index, **changes):
        def edit(entry):
            entry["params"].update(changes)
            for key, value in list(entry["params"].items()):
                if value is None:
                    del entry["params"][key]
        return index, edit

    nan, inf = float("nan"), float("inf")
    cases = [
        (0, lambda e: e.__setitem__("params", {"min": _f32([0])})),  # raw takes no params
        (uniform, lambda e: e.__setitem__("params", [])),
        params(uniform, max=None),
        params(uniform, extra=1),
        params(uniform, min=_f32([0, 0])),
        params(uniform, min=_f32([0])[:3]),
        params(uniform, min=[0.0]),
        params(uniform, min=_f32([nan])),
        params(uniform, max=_f32([inf])),
        params(uniform, min=_f32([3.0]), max=_f32([2.0])),
        params(uniform, min=_f32([-3e38]), max=_f32([3e38])),  # max - min overflows float32
        params(channel, min=_f32([0, 0])),  # 3 channels need 3 values
        params(index_of(doc, "kmeans.group"), codebook=_f32([0, 1, 2, 3])),  # 3 groups need 3 rows
        params(kmeans, codebook_size=5),  # 2 bits: at most 4
        params(kmeans, codebook_size=0),
        params(kmeans, codebook_size=-1),
        params(kmeans, codebook_size=3.0),
        params(kmeans, codebook=_f32([0, 1])),
        params(kmeans, codebook=_f32([0, nan, 1])),
    ]
    for index, edit in cases:
        rejects(tmp_path, edited(sample_bytes, edit, index), "R13")


def test_r13_codebook_longer_than_2_to_the_bits(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    entry = doc["tensors"][index_of(doc, "kmeans.b2")]
    entry["params"] = {"codebook": _f32(range(5)), "codebook_size": 5}
    rejects(tmp_path, rebuild(doc, payloads), "R13")


def test_r14_raw_length_follows_shape_dtype_bits(tmp_path, sample_bytes):
    doc, _ = split(sample_bytes)
    for name in ("raw.f32", "uniform.b3", "kmeans.channel", "raw.empty"):
        index = index_of(doc, name)
        rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("raw_length", e["raw_length"] + 1), index), "R14")
    # a shape that agrees with the payload size but not with the dtype
    rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("dtype", "float16")), "R14")


def test_r15_compression(tmp_path, sample_bytes):
    doc, _ = split(sample_bytes)
    zstd = index_of(doc, "raw.zstd")
    cases = [
        (0, lambda e: e.__setitem__("compression", "gzip")),
        (0, lambda e: e.__setitem__("length", e["length"] - 1)),  # "none": length = raw_length
        (zstd, lambda e: e.__setitem__("length", e["raw_length"])),  # zstd must save space
        (zstd, lambda e: e.__setitem__("length", 0)),
    ]
    for index, edit in cases:
        rejects(tmp_path, edited(sample_bytes, edit, index), "R15")


def test_r15_no_zstd_frame_expands_that_much(tmp_path, sample_bytes):
    # a 1 GiB uint8 tensor claimed by a 10-byte zstd payload: refused before anything is read
    doc, payloads = split(sample_bytes)
    index = index_of(doc, "raw.zstd")
    entry = doc["tensors"][index]
    entry.update(dtype="uint8", shape=[1 << 30], raw_length=1 << 30)
    payloads[index] = payloads[index][:10]
    rejects(tmp_path, rebuild(doc, payloads), "R15")


def test_r16_offsets_tile_the_data_section(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    data = lay_out(doc, payloads)
    good = assemble(doc, data)
    rejects(tmp_path, good + b"\x00", "R16")  # trailing byte
    rejects(tmp_path, good + b"\x00" * 64, "R16")
    rejects(tmp_path, good[:-1], "R16")  # truncated
    for index, delta in [(1, 64), (1, -64), (2, 1), (0, 64)]:
        shifted = json_copy(doc)
        shifted["tensors"][index]["offset"] += delta
        if shifted["tensors"][index]["offset"] >= 0:
            rejects(tmp_path, assemble(shifted, data), "R16")
    overlapping = json_copy(doc)
    overlapping["tensors"][1]["offset"] = overlapping["tensors"][0]["offset"]
    rejects(tmp_path, assemble(overlapping, data), "R16")
    out_of_file = json_copy(doc)
    out_of_file["tensors"][-1]["offset"] = 2 ** 62
    rejects(tmp_path, assemble(out_of_file, data), "R16")
    # a header that describes no tensors must be followed by nothing
    rejects(tmp_path, assemble({"tensors": [], "metadata": {}}, b"\x00" * 64), "R16")


def test_r17_padding_is_zero(tmp_path, sample_bytes):
    doc, _ = split(sample_bytes)
    header = msgpack.packb(doc, use_bin_type=True)
    head_end = PREAMBLE_SIZE + len(header)
    assert align(head_end) > head_end, "the sample must have header padding"
    bad = bytearray(sample_bytes)
    bad[head_end] = 1
    rejects(tmp_path, bytes(bad), "R17")
    data_start = align(head_end)
    first = doc["tensors"][0]
    gap = data_start + first["offset"] + first["length"]
    assert doc["tensors"][1]["offset"] > first["offset"] + first["length"]
    bad = bytearray(sample_bytes)
    bad[gap] = 0x80
    rejects(tmp_path, bytes(bad), "R17")


# -- R18..R20: checked on each payload when it is read ---------------------------------------------


def test_r18_payload_checksum(tmp_path, sample_bytes):
    doc, _ = split(sample_bytes)
    start = align(PREAMBLE_SIZE + len(msgpack.packb(doc, use_bin_type=True)))
    for entry in doc["tensors"]:
        if entry["length"]:
            bad = bytearray(sample_bytes)
            bad[start + entry["offset"] + entry["length"] // 2] ^= 0x10
            rejects(tmp_path, bytes(bad), "R18", ChecksumError, on_read=True)
    rejects(tmp_path, edited(sample_bytes, lambda e: e.__setitem__("crc32", 1), index_of(doc, "raw.empty")),
            "R18", ChecksumError, on_read=True)


def test_r19_zstd_frame_bounded_by_raw_length(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    index = index_of(doc, "raw.zstd")
    raw_length = doc["tensors"][index]["raw_length"]
    cctx = zstandard.ZstdCompressor(level=3)
    frames = {
        "declares-more": cctx.compress(bytes(raw_length + 64)),
        "declares-less": cctx.compress(bytes(raw_length - 4)),
        "no-content-size": zstandard.ZstdCompressor(write_content_size=False).compress(bytes(raw_length)),
        "second-frame": cctx.compress(bytes(raw_length)) + cctx.compress(b""),
        "trailing-bytes": cctx.compress(bytes(raw_length)) + b"\x00\x00",
        "truncated": cctx.compress(bytes(raw_length))[:-2],
        "not-zstd": b"\x00" * 40,
    }
    for name, frame in frames.items():
        assert 0 < len(frame) < raw_length, name
        changed = list(payloads)
        changed[index] = bytes(frame)
        rejects(tmp_path, rebuild(json_copy(doc), changed), "R19", on_read=True)


def test_r20_decoded_payloads_are_valid(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    # uniform.b3: 35 indices of 3 bits = 105 bits, so the last byte uses 1 bit
    index = index_of(doc, "uniform.b3")
    changed = list(payloads)
    changed[index] = payloads[index][:-1] + bytes([payloads[index][-1] | 0x80])
    rejects(tmp_path, rebuild(json_copy(doc), changed), "R20", on_read=True)
    # kmeans.b2: a codebook of 3, so index 3 points past it
    index = index_of(doc, "kmeans.b2")
    changed = list(payloads)
    changed[index] = b"\x03" + payloads[index][1:]
    exc = rejects(tmp_path, rebuild(json_copy(doc), changed), "R20", on_read=True)
    assert "codebook" in str(exc)
    # uniform.wide: 3-bit indices in 4-bit containers, so 8 does not fit 3 bits
    index = index_of(doc, "uniform.wide")
    changed = list(payloads)
    changed[index] = bytes([payloads[index][0] | 0x08]) + payloads[index][1:]
    rejects(tmp_path, rebuild(json_copy(doc), changed), "R20", on_read=True)
    # bool bytes are 0 or 1
    index = index_of(doc, "raw.bool")
    changed = list(payloads)
    changed[index] = b"\x02" + payloads[index][1:]
    rejects(tmp_path, rebuild(json_copy(doc), changed), "R20", on_read=True)


def test_r21_stats(tmp_path, sample_bytes):
    for stats in ([], {str(i): i for i in range(17)}, {"k" * 65: 1}, {"k": "1"}, {"k": None},
                  {"k": True}, {"k": [1]}):
        rejects(tmp_path, edited(sample_bytes, lambda e, s=stats: e.__setitem__("stats", s)), "R21")
    doc = split(sample_bytes)[0]
    ok = edited(sample_bytes, lambda e: e.__setitem__("stats", {"rel_rms": 0.5, "n": 2 ** 64 - 1}))
    (tmp_path / "ok.qpk").write_bytes(ok)
    assert QpkReader(tmp_path / "ok.qpk").entry(doc["tensors"][0]["name"]).stats["n"] == 2 ** 64 - 1


# -- files that broke other parsers: rejected fast, with bounded memory -----------------------------


def _hostile_files(sample: bytes) -> dict[str, bytes]:
    doc, payloads = split(sample)
    data = lay_out(doc, payloads)
    meta = b"\x82\xa7tensors\x90\xa8metadata\x81\xa1k"
    files = {
        "tensors-array-2^32-1": assemble(b"\x82\xa8metadata\x80\xa7tensors\xdd\xff\xff\xff\xff" + b"\xc0" * 64, b""),
        "nested-arrays-2^32-1": assemble(meta + b"\xdd\xff\xff\xff\xff" * 10_000, b""),
        "nested-maps-2^32-1": assemble(meta + b"\xdf\xff\xff\xff\xff" * 10_000, b""),
        "str-2^32-1": assemble(meta + b"\xdb\xff\xff\xff\xff" + b"x" * 100, b""),
        "nested-maps-100000": assemble(meta + b"\x81\xa1k" * 100_000 + b"\xc0", b""),
        "nested-arrays-100000": assemble(meta + b"\x91" * 100_000 + b"\xc0", b""),
        "header-length-past-eof": assemble(doc, data, header_length=len(sample) * 2),
        "trailing-bytes": assemble(doc, data) + b"\x00" * 1000,
    }

    def variant(label: str, index: int, **changes: Any) -> None:
        copy = json_copy(doc)
        copy["tensors"][index].update(changes)
        files[label] = assemble(copy, data)

    variant("dim-2^63", 0, shape=[2 ** 63])
    variant("dims-product-wraps-to-0", 0, shape=[2 ** 32, 2 ** 32])
    variant("dims-product-wraps-small", 0, dtype="uint8", shape=[2 ** 40 + 1, 2 ** 24],
            raw_length=2 ** 24)  # 2^64 + 2^24 elements: 2^24 after a 64-bit wrap
    variant("length-2^64-1", 0, length=2 ** 64 - 1)
    variant("offset-out-of-file", 1, offset=2 ** 40)
    variant("offsets-overlap", 1, offset=0)
    variant("wrong-type-shape", 0, shape="12")
    variant("wrong-type-bits", 0, bits=b"\x00")
    kmeans = index_of(doc, "kmeans.b2")
    variant("codebook-longer-than-2^b", kmeans,
            params={"codebook": _f32(range(5)), "codebook_size": 5})
    uniform = index_of(doc, "uniform.b3")
    for bits in (0, 17, -1):
        variant(f"bits-{bits}", uniform, bits=bits)
    return files


def test_hostile_files_are_rejected_fast_with_bounded_memory(tmp_path, sample_bytes):
    for label, data in _hostile_files(sample_bytes).items():
        path = tmp_path / f"{label}.qpk"
        path.write_bytes(data)
        tracemalloc.start()
        started = time.perf_counter()
        try:
            with pytest.raises(FormatError):
                open_and_read_all(path)
        finally:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
        elapsed = time.perf_counter() - started
        assert elapsed < 1.0, (label, elapsed)
        assert peak < 8 * len(data) + 4_000_000, (label, peak)


def test_errors_are_qpk_errors_and_value_errors(tmp_path, sample_bytes):
    path = tmp_path / "bad.qpk"
    path.write_bytes(sample_bytes[:-1])
    with pytest.raises(ValueError):
        QpkReader(path)
    with pytest.raises(QpkError):
        qpack.load(path)


def test_smaller_limits_reject_larger_files(tmp_path, sample_bytes):
    from qpack.format import Limits

    path = tmp_path / "s.qpk"
    path.write_bytes(sample_bytes)
    with pytest.raises(FormatError) as caught:
        QpkReader(path, limits=Limits(max_tensors=3))
    assert caught.value.rule == "R8"
    with pytest.raises(FormatError) as caught:
        QpkReader(path, limits=Limits(max_header_bytes=64))
    assert caught.value.rule == "R4"


def test_maximum_values_are_accepted(tmp_path):
    """Edges that are allowed: 32 dimensions, 2^48 elements in an empty shape, 16 bits."""
    shape = [1] * 31 + [0]
    entries = [TensorEntry("t", "float64", tuple(shape), "raw", 0, "tensor", {}),
               TensorEntry("z", "uint8", (0, 2 ** 48), "raw", 0, "tensor", {})]
    doc = {"tensors": [e.to_header() for e in entries], "metadata": {}}
    (tmp_path / "edge.qpk").write_bytes(assemble(doc, b""))
    loaded = open_and_read_all(tmp_path / "edge.qpk")
    assert loaded["t"].shape == tuple(shape) and loaded["z"].shape == (0, 2 ** 48)
    assert math.prod(loaded["z"].shape) == 0


# -- version 3: compressed header, compact entries, float16 parameters, byte planes --------------


def _f16(values: Any) -> bytes:
    return np.asarray(values, dtype="<f2").tobytes()


def sample3_tensors() -> list[tuple[TensorEntry, bytes, torch.Tensor]]:
    """What only version 3 can hold, on top of ``sample_tensors``."""
    gen = torch.Generator().manual_seed(9)
    out = []
    # uniform, per channel, float16 min/max: the formula runs on their float32 values
    idx = torch.randint(0, 16, (2, 7), generator=gen)
    lows, highs = np.float16([-1.0, 0.5]), np.float16([2.0, 0.7998])
    lo32, hi32 = lows.astype(np.float32), highs.astype(np.float32)
    steps = ((hi32 - lo32).astype(np.float32) / np.float32(15)).astype(np.float32)
    values = (lo32[:, None] + (steps[:, None] * idx.numpy().astype(np.float32)).astype(np.float32)).astype(np.float32)
    entry = _entry("uniform.f16", torch.zeros(2, 7), "uniform", 4, "channel", {"min": _f16(lows), "max": _f16(highs)})
    entry.param_dtype = "float16"
    out.append((entry, pack_bits(idx, 4).numpy().tobytes(), torch.from_numpy(values)))
    # kmeans in groups of 16, float16 codebooks
    books = np.float16([[0.1, 0.2], [-3.0, 65504.0]])
    idx = torch.randint(0, 2, (20,), generator=gen)
    entry = _entry("kmeans.f16", torch.zeros(4, 5), "kmeans", 1, "group",
                   {"codebook": _f16(books), "codebook_size": 2}, group_size=16)
    entry.param_dtype = "float16"
    values = books.astype(np.float32)[np.arange(20) // 16, idx.numpy()].reshape(4, 5)
    out.append((entry, pack_bits(idx, 1).numpy().tobytes(), torch.from_numpy(values)))
    # uniform in groups of 16, two-level parameters: 8-bit codes of min and max under a base
    codes_lo, codes_hi = np.uint8([0, 10, 255]), np.uint8([3, 0, 200])
    base = np.float32([-1.0, 0.001, 0.25, 0.004])
    lo32 = (base[0] + (base[1] * codes_lo.astype(np.float32)).astype(np.float32)).astype(np.float32)
    hi32 = (base[2] + (base[3] * codes_hi.astype(np.float32)).astype(np.float32)).astype(np.float32)
    steps = ((hi32 - lo32).astype(np.float32) / np.float32(3)).astype(np.float32)
    idx = torch.randint(0, 4, (40,), generator=gen)
    rows = np.arange(40) // 16
    values = (lo32[rows] + (steps[rows] * idx.numpy().astype(np.float32)).astype(np.float32)).astype(np.float32)
    entry = _entry("uniform.u8", torch.zeros(8, 5), "uniform", 2, "group",
                   {"min": codes_lo.tobytes(), "max": codes_hi.tobytes(), "base": _f32(base)}, group_size=16)
    entry.param_dtype = "uint8"
    out.append((entry, pack_bits(idx, 2).numpy().tobytes(), torch.from_numpy(values.reshape(8, 5))))
    # raw float32 stored as zstd of its byte planes
    stats = 1 + torch.arange(64, dtype=torch.float32) / 1024
    entry = _entry("raw.planes", stats)
    entry.compression = "zstd_planes"
    stored = zstandard.ZstdCompressor(level=3).compress(qpack.codecs.raw.split_planes(stats.numpy().tobytes(), 4))
    out.append((entry, stored, stats))
    return out


def write_sample3(path: Path) -> dict[str, torch.Tensor]:
    return write_sample(path, version=3)


@pytest.fixture(scope="module")
def sample3_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("sample3") / "sample3.qpk"
    return write_sample3(path) and path.read_bytes()


def _placed(length: int, end: int, version: int) -> int:
    """Spec 1.3: where a payload starts after one ending at ``end`` (version 5: short ones unpadded)."""
    return align(end) if version < 5 or length >= 65536 else end


def _data_start(header_end: int, lengths: list[int], version: int) -> int:
    """Spec 1: D, aligned unless a version-5 file holds no long payload."""
    return align(header_end) if version < 5 or any(n >= 65536 for n in lengths) else header_end


def split3(data: bytes) -> tuple[dict, list[bytes]]:
    """(compact header document, stored payloads) of a valid version-3, -4 or -5 file."""
    _, version, header_length, _, raw_length = struct.unpack("<8sIIII", data[:PREAMBLE_SIZE])
    assert version in (3, 4, 5)
    stored = data[PREAMBLE_SIZE:PREAMBLE_SIZE + header_length]
    header = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_length) if raw_length else stored
    doc = msgpack.unpackb(header, raw=False)
    lengths = [entry["length"] for entry in doc["tensors"]]
    start, end, payloads = _data_start(PREAMBLE_SIZE + header_length, lengths, version), 0, []
    for length in lengths:
        offset = _placed(length, end, version)
        payloads.append(data[start + offset: start + offset + length])
        end = offset + length
    return doc, payloads


def assemble3(doc: dict, payloads: list[bytes], *, compress: bool = True, raw_length: int | None = None,
              stored: bytes | None = None, version: int = 3, keep_checksums: bool = False) -> bytes:
    """A version-3 (or -4, -5) file: lengths and checksums filled in (checksums left as they
    are with ``keep_checksums``), the header zstd-compressed unless ``compress`` is False;
    ``raw_length`` and ``stored`` replace the preamble's U and the stored header bytes."""
    data = bytearray()
    for entry, payload in zip(doc["tensors"], payloads):
        data += bytes(_placed(len(payload), len(data), version) - len(data))
        entry["length"] = len(payload)
        if not keep_checksums:
            entry["crc32"] = zlib.crc32(payload)
        data += payload
    header = msgpack.packb(doc, use_bin_type=True)
    if stored is None:
        stored = zstandard.ZstdCompressor(level=19).compress(header) if compress else header
    field = (len(header) if compress else 0) if raw_length is None else raw_length
    head = struct.pack("<8sIIII", MAGIC, version, len(stored), zlib.crc32(stored), field) + stored
    start = _data_start(len(head), [len(payload) for payload in payloads], version)
    return head + bytes(start - len(head)) + bytes(data)


def test_v3_sample_round_trips_compact_and_compressed(tmp_path, sample3_bytes):
    expected = write_sample3(tmp_path / "s.qpk")
    data = (tmp_path / "s.qpk").read_bytes()
    assert data == sample3_bytes and struct.unpack("<I", data[8:12])[0] == 3
    assert struct.unpack("<I", data[20:24])[0] > struct.unpack("<I", data[12:16])[0]  # compressed: U > H
    loaded = open_and_read_all(tmp_path / "s.qpk")
    for name, tensor in expected.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor), name
    doc, payloads = split3(data)
    assert assemble3(doc, payloads) == data  # the helpers reproduce the writer's bytes
    for entry in doc["tensors"]:
        assert not {"offset", "raw_length"} & set(entry)
    raw = doc["tensors"][index_of(doc, "raw.f32")]
    assert list(raw) == ["name", "dtype", "shape", "length", "crc32"]  # every default left out
    assert doc["tensors"][index_of(doc, "uniform.f16")]["param_dtype"] == "float16"
    assert qpack.verify(tmp_path / "s.qpk") == len(expected)


def test_v3_header_stored_plain_is_read(tmp_path, sample3_bytes):
    doc, payloads = split3(sample3_bytes)
    (tmp_path / "plain.qpk").write_bytes(assemble3(doc, payloads, compress=False))
    for name, tensor in open_and_read_all(tmp_path / "plain.qpk").items():
        assert torch.equal(tensor, open_and_read_all(tmp_path / "plain.qpk")[name])
    assert set(open_and_read_all(tmp_path / "plain.qpk")) == {e["name"] for e in doc["tensors"]}


def test_r3_v3_header_raw_length_is_bounded_before_decompressing(tmp_path, sample3_bytes):
    doc, payloads = split3(sample3_bytes)
    header = zstandard.ZstdCompressor(level=19).compress(msgpack.packb(doc, use_bin_type=True))
    rejects(tmp_path, assemble3(json_copy(doc), payloads, raw_length=len(header)), "R3")  # not more than H
    rejects(tmp_path, assemble3(json_copy(doc), payloads, raw_length=len(header) * 32768 + 1), "R3")
    path = tmp_path / "limit.qpk"
    path.write_bytes(sample3_bytes)
    with pytest.raises(FormatError) as caught:
        QpkReader(path, limits=qpack.format.Limits(max_header_bytes=len(header) + 1))
    assert caught.value.rule == "R3"
    # the same field in a version-1 file is reserved
    rejects(tmp_path, assemble3(json_copy(doc), payloads, version=1), "R3")


def test_r22_v3_header_must_be_one_zstd_frame_of_u_bytes(tmp_path, sample3_bytes):
    doc, payloads = split3(sample3_bytes)
    plain = msgpack.packb(lay_out_lengths(json_copy(doc), payloads), use_bin_type=True)
    frame = zstandard.ZstdCompressor(level=19).compress(plain)
    exc = rejects(tmp_path, assemble3(json_copy(doc), payloads, raw_length=len(plain), stored=plain[:-4]), "R22")
    assert "not a zstd frame" in str(exc)
    rejects(tmp_path, assemble3(json_copy(doc), payloads, raw_length=len(plain) + 1, stored=frame), "R22")
    rejects(tmp_path, assemble3(json_copy(doc), payloads, raw_length=len(plain), stored=frame + b"\0"), "R22")
    unsized = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(plain)
    rejects(tmp_path, assemble3(json_copy(doc), payloads, raw_length=len(plain), stored=unsized), "R22")
    # (a damaged frame is caught by R5 first: the checksum covers the stored bytes)


def lay_out_lengths(doc: dict, payloads: list[bytes]) -> dict:
    """``doc`` with each entry's length and crc32 from ``payloads`` (version 3)."""
    for entry, payload in zip(doc["tensors"], payloads):
        entry["length"], entry["crc32"] = len(payload), zlib.crc32(payload)
    return doc


@pytest.mark.parametrize("name,key,value", [
    ("raw.f32", "compression", "none"), ("raw.f32", "stats", {}), ("raw.f32", "params", {}),
    ("raw.f32", "encoding", "raw"), ("raw.f32", "bits", 0), ("uniform.b3", "width", 3),
    ("uniform.b3", "granularity", "tensor"), ("uniform.b3", "group_size", 0),
    ("uniform.b3", "param_dtype", "float32"),
    ("raw.f32", "offset", 0), ("raw.f32", "raw_length", 48), ("raw.f32", "colour", "blue"),
])
def test_r8_v3_entries_leave_out_defaults_and_derived_keys(tmp_path, sample3_bytes, name, key, value):
    doc, payloads = split3(sample3_bytes)
    doc["tensors"][index_of(doc, name)][key] = value
    exc = rejects(tmp_path, assemble3(doc, payloads), "R8")
    assert repr(key) in str(exc) or "keys" in str(exc)


@pytest.mark.parametrize("key", ["name", "dtype", "shape", "length", "crc32"])
def test_r8_v3_entries_keep_the_always_stored_keys(tmp_path, sample3_bytes, key):
    doc, payloads = split3(sample3_bytes)
    data = assemble3(doc, payloads)  # fills in lengths and checksums first
    doc, payloads = split3(data)
    del doc["tensors"][0][key]
    header = zstandard.ZstdCompressor(level=19).compress(plain := msgpack.packb(doc, use_bin_type=True))
    rejects(tmp_path, assemble3(doc, payloads, raw_length=len(plain), stored=header)
            if key not in ("length", "crc32") else _without_refill(doc, payloads, plain, header), "R8")


def _without_refill(doc: dict, payloads: list[bytes], plain: bytes, header: bytes) -> bytes:
    """A file whose header is exactly ``header`` (assemble3 would put length and crc32 back)."""
    data = bytearray()
    for payload in payloads:
        data += bytes(align(len(data)) - len(data)) + payload
    head = struct.pack("<8sIIII", MAGIC, 3, len(header), zlib.crc32(header), len(plain)) + header
    return head + bytes(align(len(head)) - len(head)) + bytes(data)


def test_r8_param_dtype_is_a_version_3_key(tmp_path, sample_bytes):
    rejects(tmp_path, edited(sample_bytes, lambda e: e.update(param_dtype="float32"),
                             index_of(split(sample_bytes)[0], "uniform.b3")), "R8")


def test_r13_param_dtype_and_float16_parameters(tmp_path, sample3_bytes):
    doc, payloads = split3(sample3_bytes)
    at = index_of(doc, "uniform.f16")
    for edit in (lambda e: e.update(param_dtype="bfloat16"),
                 lambda e: e["params"].update(min=_f32([-1.0, 0.5])),  # 4 bytes per value, not 2
                 lambda e: e["params"].update(max=_f16([np.inf, 1.0])),
                 lambda e: e["params"].update(min=_f16([3.0, 0.5]))):  # min above max
        changed = json_copy(doc)
        edit(changed["tensors"][at])
        rejects(tmp_path, assemble3(changed, payloads), "R13")
    changed = json_copy(doc)
    changed["tensors"][index_of(doc, "raw.f32")]["param_dtype"] = "float16"  # raw has no parameters
    rejects(tmp_path, assemble3(changed, payloads), "R13")
    changed = json_copy(doc)
    changed["tensors"][index_of(doc, "kmeans.f16")]["params"]["codebook"] = _f16([0.1, 0.2, -3.0, np.nan])
    rejects(tmp_path, assemble3(changed, payloads), "R13")


def test_r13_uint8_parameters(tmp_path, sample3_bytes):
    doc, payloads = split3(sample3_bytes)
    at = index_of(doc, "uniform.u8")
    for edit in (lambda e: e["params"].update(min=bytes(4)),  # 3 rows: 3 codes
                 lambda e: e["params"].update(base=_f32([-1.0, -0.001, 0.25, 0.004])),  # a negative step
                 lambda e: e["params"].update(base=_f32([-1.0, 0.001, np.nan, 0.004])),
                 lambda e: e["params"].update(base=_f32([3e38, 1e37, 3e38, 1e37])),  # decodes past float32
                 lambda e: e["params"].update(base=_f32([1.0, 0.001, 0.25, 0.004])),  # a min above its max
                 lambda e: e["params"].pop("base")):
        changed = json_copy(doc)
        edit(changed["tensors"][at])
        rejects(tmp_path, assemble3(changed, payloads), "R13")
    changed = json_copy(doc)
    changed["tensors"][index_of(doc, "kmeans.f16")]["param_dtype"] = "uint8"  # uniform only
    rejects(tmp_path, assemble3(changed, payloads), "R13")


def test_r15_zstd_planes_only_for_raw_multibyte_tensors_in_version_3(tmp_path, sample3_bytes, sample_bytes):
    doc, payloads = split3(sample3_bytes)
    for name in ("uniform.zstd", "raw.bool"):  # quantized; 1-byte elements
        changed = json_copy(doc)
        entry = changed["tensors"][index_of(doc, name)]
        if name == "raw.bool":
            payloads = list(payloads)
            payloads[index_of(doc, name)] = zstandard.ZstdCompressor().compress(bytes(5))[:4]  # shorter than raw
        entry["compression"] = "zstd_planes"
        rejects(tmp_path, assemble3(changed, payloads), "R15")
    doc, payloads = split3(sample3_bytes)
    grown = json_copy(doc)
    at = index_of(doc, "raw.planes")
    payloads = list(payloads)
    payloads[at] = payloads[at] + bytes(256 - len(payloads[at]))  # not shorter than the 256 raw bytes
    rejects(tmp_path, assemble3(grown, payloads), "R15")
    # a version-1 file knows no byte planes
    rejects(tmp_path, edited(sample_bytes, lambda e: e.update(compression="zstd_planes"),
                             index_of(split(sample_bytes)[0], "raw.zstd")), "R15")


def test_r19_zstd_planes_payload_is_checked_as_zstd(tmp_path, sample3_bytes):
    doc, payloads = split3(sample3_bytes)
    at = index_of(doc, "raw.planes")
    payloads = list(payloads)
    payloads[at] = zstandard.ZstdCompressor().compress(bytes(200))  # a frame of the wrong size
    rejects(tmp_path, assemble3(doc, payloads), "R19", on_read=True)


def test_writer_refuses_version_3_entries_in_an_older_version(tmp_path):
    entry, stored, _ = sample3_tensors()[0]  # float16 parameters
    writer = QpkWriter(tmp_path / "old.qpk", version=1)
    writer.add(entry, stored)
    with pytest.raises(qpack.InputError, match="need version 3"):
        writer.finish()
    assert not (tmp_path / "old.qpk").exists()


def test_fixed_bytes_is_what_the_file_costs_beyond_its_payloads(tmp_path):
    from qpack.format import fixed_bytes

    for version in (3, 5):
        write_sample(tmp_path / "s.qpk", version=version)
        with QpkReader(tmp_path / "s.qpk") as reader:
            entries, metadata = list(reader.entries.values()), reader.metadata
        payloads = sum(e.length for e in entries)
        assert fixed_bytes(entries, metadata, version) == (tmp_path / "s.qpk").stat().st_size - payloads
    # version 5 packs these short payloads without padding; version 1 also stores full entries
    assert fixed_bytes(entries, metadata, version=1) > fixed_bytes(entries, metadata, 3) > fixed_bytes(entries, metadata)
