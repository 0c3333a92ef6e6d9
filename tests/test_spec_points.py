"""The points a second reader had to guess at (issue 13, item 5), each answered in
specs/qpk-format.md, checked here where they are behaviour; and ``info`` on any stats R21
allows (item 1).
"""

from __future__ import annotations

import json
import struct
import unicodedata
import zlib

import msgpack
import numpy as np
import pytest
import torch
import zstandard
from test_reader_rules import _f32, assemble, edited, index_of, json_copy, lay_out, rebuild, rejects, sample_bytes, split  # noqa: F401

import qpack
from qpack import FormatError, QpkReader, rans

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def one_tensor(entry: dict, payload: bytes, version: int = 1) -> bytes:
    entry = {"name": "t", "dtype": "float32", "shape": [1], "encoding": "raw", "bits": 0, "width": 0,
             "granularity": "tensor", "group_size": 0, "params": {}, "offset": 0, "length": len(payload),
             "raw_length": len(payload), "compression": "none", "crc32": zlib.crc32(payload), "stats": {},
             **entry}
    return assemble({"tensors": [entry], "metadata": {}}, payload, version=version)


def uniform(lo: float, hi: float, indices: list[int], bits: int, dtype: str = "float32") -> bytes:
    from qpack.bitpack import pack_bits

    payload = pack_bits(torch.tensor(indices), bits).numpy().tobytes()
    return one_tensor({"dtype": dtype, "shape": [len(indices)], "encoding": "uniform", "bits": bits, "width": bits,
                       "params": {"min": _f32([lo]), "max": _f32([hi])},
                       "raw_length": len(payload)}, payload)


def load_one(tmp_path, data: bytes) -> torch.Tensor:
    path = tmp_path / "t.qpk"
    path.write_bytes(data)
    return qpack.load(path)["t"]


def bits_of(tensor: torch.Tensor) -> list[int]:
    return tensor.view({2: torch.int16, 4: torch.int32}[tensor.element_size()]).tolist()


# -- item 1: info never fails on a file verify accepts -------------------------------------------------


@pytest.mark.parametrize("stats", [
    {"unique_before": float("nan"), "unique_after": float("inf")},
    {"unique_before": float("-inf"), "unique_after": 1e300, "rel_rms": float("nan"), "snr_db": float("inf")},
    {"unique_before": -5, "unique_after": 2 ** 64 - 1, "rel_rms": 2 ** 63, "snr_db": -(2 ** 63)},
    {"unique_before": 3.5, "unique_after": 7.0, "rel_rms": 1e300, "snr_db": -1e300},
])
def test_info_shows_any_stats_verify_accepts(tmp_path, sample_bytes, stats, capsys):
    from qpack.cli import main

    doc, payloads = split(sample_bytes)
    doc["tensors"][index_of(doc, "uniform.b3")]["stats"] = stats
    path = tmp_path / "s.qpk"
    path.write_bytes(rebuild(doc, payloads))
    assert qpack.verify(path) == len(doc["tensors"])
    row = {t.name: t for t in qpack.info(path).tensors}["uniform.b3"]
    for key in ("unique_before", "unique_after"):
        value = getattr(row, key)
        assert value is None or (isinstance(value, int) and 0 <= value <= 2 ** 48), (key, value)
    assert row.unique_after == (7 if stats["unique_after"] == 7.0 else None)
    for key in ("rel_rms", "snr_db"):
        value = getattr(row, key)
        assert value is None or np.isfinite(value)
    assert main(["info", str(path)]) == 0
    table = capsys.readouterr().out
    assert "uniform.b3" in table and max(len(line) for line in table.splitlines()) < 400
    assert main(["info", "--json", str(path)]) == 0
    doc = json.loads(capsys.readouterr().out, parse_constant=lambda c: pytest.fail(f"JSON holds {c}"))
    assert {t["name"] for t in doc["tensors"]} >= {"uniform.b3"}


# -- 3.2: zeros, signs and conversions -----------------------------------------------------------------


def test_negative_zero_constant_row_decodes_to_positive_zero(tmp_path):
    # fl32(min + fl32(0 * q)) with min = -0.0 is -0 + +0 = +0 (IEEE round to nearest)
    assert bits_of(load_one(tmp_path, uniform(-0.0, -0.0, [0, 1, 3, 0], 2))) == [0, 0, 0, 0]
    # min = +0.0 with max = -0.0: equal as numbers, so min <= max holds; a constant row of +0
    assert bits_of(load_one(tmp_path, uniform(0.0, -0.0, [0, 3, 1], 2))) == [0, 0, 0]
    # uniform never yields -0.0: level 0 of a row with min = -0 and a step is +0 too
    assert bits_of(load_one(tmp_path, uniform(-0.0, 1.0, [0], 1))) == [0]


def test_kmeans_keeps_negative_zero_and_accepts_unsorted_repeated_centroids(tmp_path):
    from qpack.bitpack import pack_bits

    book = [0.5, -0.0, 0.5, -3.0]  # neither sorted nor distinct: any finite values are valid
    indices = [3, 1, 0, 2, 1]
    payload = pack_bits(torch.tensor(indices), 2).numpy().tobytes()
    data = one_tensor({"shape": [5], "encoding": "kmeans", "bits": 2, "width": 2, "raw_length": len(payload),
                       "params": {"codebook": _f32(book), "codebook_size": 4}}, payload)
    got = load_one(tmp_path, data)
    assert bits_of(got) == bits_of(torch.tensor([book[i] for i in indices]))
    assert bits_of(got)[1] == bits_of(torch.tensor([-0.0]))[0]


def _bfloat16_reference(values: np.ndarray) -> np.ndarray:
    """binary32 -> bfloat16 bits, round to nearest, ties to even, overflow to infinity."""
    bits = values.astype("<f4").view("<u4").astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_conversion_rounds_to_nearest_even_overflows_to_inf_keeps_subnormals(tmp_path, dtype):
    # the binary32 levels of [0, hi] at 8 bits, then converted: compared with an IEEE reference
    for hi in (70000.0, 65519.0, 65520.0, 3.4e38, 1e-5, 3e-7, 1e-39):
        indices = list(range(256))
        step = np.float32(np.float32(hi) / np.float32(255))
        with np.errstate(over="ignore"):  # 3.4e38: the top level rounds past binary32's limit
            levels = (np.float32(0) + step * np.arange(256, dtype=np.float32)).astype(np.float32)
        got = load_one(tmp_path, uniform(0.0, hi, indices, 8, dtype))
        if dtype == "float16":
            with np.errstate(over="ignore"):
                want = levels.astype(np.float16).view(np.uint16)
        else:
            want = _bfloat16_reference(levels)
        assert (got.view(torch.int16).numpy().view(np.uint16) == want).all(), hi
    if dtype == "float16":  # what the checks above cover: an overflow and a subnormal
        with np.errstate(over="ignore"):
            assert np.isinf(np.float32(70000).astype(np.float16)) and np.float16(np.float32(3e-7)) != 0


def test_binary32_overflow_of_a_level_is_infinity(tmp_path):
    # max at the binary32 limit: fl32(step * L) rounds past it, so the top level is +inf
    hi = float(np.finfo(np.float32).max)
    step = np.float32(np.float32(hi) / np.float32(3))
    with np.errstate(over="ignore"):
        top = np.float32(step * np.float32(3))
    got = load_one(tmp_path, uniform(0.0, hi, [0, 3], 2))
    assert got[1].item() == float(top) and (np.isinf(top) or top == np.float32(hi))


# -- R12, R6, msgpack forms and booleans --------------------------------------------------------------


def test_r12_only_the_four_float_dtypes_are_quantized(tmp_path, sample_bytes):
    doc, _ = split(sample_bytes)
    index = index_of(doc, "kmeans.b2")
    for dtype in ("float8_e4m3fn", "float8_e5m2", "int8", "bool", "uint16"):
        def edit(entry, d=dtype):
            entry["dtype"] = d
        data = _edited(sample_bytes, index, edit)
        rejects(tmp_path, data, "R12")


def _edited(sample: bytes, index: int, edit) -> bytes:
    return edited(sample, edit, index)


def test_r6_nesting_beyond_the_schema_is_rejected(tmp_path, sample_bytes):
    # the schema nests 4 deep (header, tensors, entry, params/shape/stats); deeper values are
    # wrong for their field (here R21), and past the decoder's limit R6 names it
    for depth, rule in ((1, "R21"), (1000, "R21"), (5000, "R6")):
        doc, payloads = split(sample_bytes)
        doc["tensors"][0]["stats"] = {"k": "PLACEHOLDER"}
        header = msgpack.packb(doc, use_bin_type=True)
        nested = b"\x91" * depth + b"\x01"
        header = header.replace(msgpack.packb("PLACEHOLDER"), nested, 1)
        rejects(tmp_path, assemble(header, lay_out(doc, payloads)), rule)


def _wide(value):
    """The same msgpack value in its widest forms: ints as 64-bit, strings as str32, floats as
    float32 where exact, maps with their keys reversed."""
    if isinstance(value, bool) or value is None:
        return msgpack.packb(value)
    if isinstance(value, int):
        return (b"\xcf" + struct.pack(">Q", value)) if value >= 0 else (b"\xd3" + struct.pack(">q", value))
    if isinstance(value, float):
        return b"\xca" + struct.pack(">f", value) if float(np.float32(value)) == value else msgpack.packb(value)
    if isinstance(value, str):
        raw = value.encode()
        return b"\xdb" + struct.pack(">I", len(raw)) + raw
    if isinstance(value, bytes):
        return b"\xc6" + struct.pack(">I", len(value)) + value
    if isinstance(value, list):
        return b"\xdd" + struct.pack(">I", len(value)) + b"".join(map(_wide, value))
    items = list(value.items())[::-1]
    return b"\xdf" + struct.pack(">I", len(items)) + b"".join(_wide(k) + _wide(v) for k, v in items)


def test_readers_accept_non_canonical_msgpack(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    doc["tensors"][index_of(doc, "uniform.b3")]["stats"] = {"rel_rms": 0.5, "snr_db": 6.0}
    data = lay_out(doc, payloads)
    canonical = qpack.load(_put(tmp_path, "a.qpk", assemble(doc, data)))
    wide = _wide(doc)
    assert wide != msgpack.packb(doc, use_bin_type=True)
    with QpkReader(_put(tmp_path, "b.qpk", assemble(wide, data))) as reader:
        assert reader.entry("uniform.b3").stats == {"rel_rms": 0.5, "snr_db": 6.0}
        assert list(reader) == list(canonical)  # order is the array's, not the keys'
        for name, tensor in canonical.items():
            assert torch.equal(reader.tensor(name), tensor), name


def _put(tmp_path, name: str, data: bytes):
    (tmp_path / name).write_bytes(data)
    return tmp_path / name


def test_booleans_are_never_integers(tmp_path, sample_bytes):
    doc, _ = split(sample_bytes)
    kmeans = index_of(doc, "kmeans.b2")
    cases = [(0, "bits", False, "R8"), (0, "crc32", True, "R8"), (0, "offset", False, "R8"),
             (0, "shape", [True, 4], "R11"), (0, "stats", {"n": False}, "R21")]
    for index, key, value, rule in cases:
        rejects(tmp_path, _edited(sample_bytes, index, lambda e, k=key, v=value: e.__setitem__(k, v)), rule)
    rejects(tmp_path, _edited(sample_bytes, kmeans, lambda e: e["params"].__setitem__("codebook_size", True)), "R13")


def test_r21_is_checked_at_open(tmp_path, sample_bytes):
    doc, _ = split(sample_bytes)
    last = len(doc["tensors"]) - 1
    path = _put(tmp_path, "s.qpk", _edited(sample_bytes, last, lambda e: e.__setitem__("stats", {"k": None})))
    with pytest.raises(FormatError) as caught:
        QpkReader(path)  # no payload read
    assert caught.value.rule == "R21"


def test_which_rule_is_named_when_several_break(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    # within an entry, fields in the spec's order: dtype (R10) before stats (R21)
    def both(entry):
        entry["dtype"], entry["stats"] = "complex64", []
    rejects(tmp_path, _edited(sample_bytes, 0, both), "R10")
    # entries in file order: the first entry's R21 before the second's R10
    copy = json_copy(doc)
    copy["tensors"][0]["stats"] = []
    copy["tensors"][1]["dtype"] = "complex64"
    rejects(tmp_path, assemble(copy, lay_out(copy, payloads)), "R21")
    # the header (R6-R15, R21) before the layout (R16, R17), and R23 after both
    copy = json_copy(doc)
    copy["tensors"][0]["stats"] = []
    rejects(tmp_path, assemble(copy, lay_out(copy, payloads)) + b"\x00", "R21")
    # the preamble first: a bad version beats a bad header checksum
    bad = bytearray(assemble(doc, lay_out(doc, payloads), version=9))
    bad[30] ^= 1
    rejects(tmp_path, bytes(bad), "R2", qpack.UnsupportedVersionError)


# -- metadata keys and names --------------------------------------------------------------------


def test_empty_metadata_key_is_valid(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    doc["metadata"] = {"": "empty key", "k": ""}
    with QpkReader(_put(tmp_path, "m.qpk", assemble(doc, lay_out(doc, payloads)))) as reader:
        assert reader.metadata == {"": "empty key", "k": ""}


def test_names_are_unique_as_bytes_without_normalisation(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    composed, decomposed = "caf\u00e9", unicodedata.normalize("NFD", "caf\u00e9")
    assert composed != decomposed and unicodedata.normalize("NFC", decomposed) == composed
    doc["tensors"][0]["name"], doc["tensors"][1]["name"] = composed, decomposed
    with QpkReader(_put(tmp_path, "n.qpk", assemble(doc, lay_out(doc, payloads)))) as reader:
        assert list(reader)[:2] == [composed, decomposed]
    doc["tensors"][1]["name"] = composed
    rejects(tmp_path, assemble(doc, lay_out(doc, payloads)), "R9")


# -- zstd frames ----------------------------------------------------------------------------------


def _with_zstd_payload(sample: bytes, frame: bytes) -> bytes:
    doc, payloads = split(sample)
    index = index_of(doc, "raw.zstd")
    payloads[index] = frame
    return rebuild(doc, payloads)


def test_zstd_skippable_frames_checksums_and_dictionaries(tmp_path, sample_bytes):
    doc, payloads = split(sample_bytes)
    raw_length = doc["tensors"][index_of(doc, "raw.zstd")]["raw_length"]
    content = bytes(raw_length)
    plain = zstandard.ZstdCompressor(level=3).compress(content)
    checked = zstandard.ZstdCompressor(level=3, write_checksum=True).compress(content)
    skippable = struct.pack("<II", 0x184D2A50, 4) + b"qpk!"
    # a content checksum may be present, and is then verified
    assert torch.equal(qpack.load(_put(tmp_path, "c.qpk", _with_zstd_payload(sample_bytes, checked)))["raw.zstd"],
                       torch.zeros(64, 8))
    broken = bytearray(checked)
    broken[-1] ^= 1
    rejects(tmp_path, _with_zstd_payload(sample_bytes, bytes(broken)), "R19", on_read=True)
    # skippable frames are not zstd frames here, before or after the one frame
    for frame in (skippable + plain, plain + skippable, skippable):
        rejects(tmp_path, _with_zstd_payload(sample_bytes, frame), "R19", on_read=True)
    # a frame that names a dictionary cannot be decoded (no dictionary is ever given)
    assert plain[4] & 0x03 == 0  # no Dictionary_ID field
    named = plain[:4] + bytes([plain[4] | 0x01]) + plain[5:6] + b"\x2a" + plain[6:] \
        if not plain[4] & 0x20 else plain[:4] + bytes([plain[4] | 0x01]) + b"\x2a" + plain[5:]
    assert zstandard.get_frame_parameters(named).dict_id == 0x2a
    rejects(tmp_path, _with_zstd_payload(sample_bytes, named), "R19", on_read=True)


# -- rANS tables ----------------------------------------------------------------------------------


def test_rans_zero_frequencies_and_an_alphabet_larger_than_needed():
    indices = np.array([0, 3, 3, 0, 3, 1, 3, 3] * 40)  # symbol 2 never occurs: f[2] = 0 below A
    payload = rans.encode(indices)
    lanes, alphabet = struct.unpack_from("<II", payload)
    freq = np.frombuffer(payload, "<u2", count=alphabet, offset=8)
    assert alphabet == 4 and freq[2] == 0  # the writer's A is minimal, with a zero inside
    assert rans.decode(payload, indices.size, 2).tolist() == indices.tolist()
    # the same table with trailing zero frequencies (A = 2^bits = 8 for 3-bit indices) is valid
    wider = payload[:4] + struct.pack("<I", 8) + freq.tobytes() + bytes(8) + payload[8 + 2 * alphabet:]
    assert rans.decode(wider, indices.size, 3).tolist() == indices.tolist()
    # but not wider than 2^bits
    with pytest.raises(rans.RansError):
        rans.decode(wider, indices.size, 2)


# -- --exact-zero widens the range ---------------------------------------------------------------


def test_exact_zero_widens_the_range_by_less_than_a_step_and_keeps_half_a_step(tmp_path):
    gen = torch.Generator().manual_seed(4)
    w = torch.rand(40, 30, generator=gen) * 3 + 0.25  # all positive: 0 lies outside [lo, hi]
    w[0, :5] = torch.tensor([0.31, 0.5, 0.9, 1.7, 3.2])
    qpack.pack({"w": w}, tmp_path / "z.qpk", bits=3, exact_zero=True, rounding="nearest")  # the grid's half step
    with QpkReader(tmp_path / "z.qpk") as reader:
        entry = reader.entry("w")
        lo = np.frombuffer(entry.params["min"], "<f4")[0]
        hi = np.frombuffer(entry.params["max"], "<f4")[0]
        got = reader.tensor("w")
    step = np.float32(np.float32(hi - lo) / np.float32(7))
    levels = (lo + step * np.arange(8, dtype=np.float32)).astype(np.float32)
    assert 0.0 in levels.tolist()  # the widened grid holds an exact 0
    assert lo <= 0 < float(w.min()) and float(w.max()) <= hi  # widened to reach 0, still covering
    assert hi - float(w.max()) < step  # the top widened by less than a step
    assert float((got - w).abs().max()) <= step / 2 * (1 + 1e-6)  # within half a step of the new grid
