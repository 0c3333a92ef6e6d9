"""Mutation fuzzing of small valid files: only QpkError may come out, and nothing hangs.

Opening a file and reading every tensor may either succeed or raise a QpkError subclass;
any other exception is a bug. Files written by this version with one byte changed must be
rejected (the spec's checksums and strict padding cover every byte), or, where a change
could be harmless, load exactly the same tensors. tests/benchmarks/fuzz_long.py runs the same
mutations for longer.
"""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import msgpack
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_reader_rules import assemble, lay_out, split, write_sample, write_sample3

from qpack import QpkError, QpkReader
from qpack.format import PREAMBLE_SIZE

FUZZ_SETTINGS = settings(max_examples=300, deadline=2000, derandomize=True,
                         suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def load_all(path: Path) -> dict[str, torch.Tensor]:
    with QpkReader(path) as reader:
        return {name: reader.tensor(name) for name in reader}


def put(path: Path, data: bytes) -> None:
    """Make ``path`` hold ``data``, rewriting in place: truncating open() costs milliseconds on ext4."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, data, 0)
        os.ftruncate(fd, len(data))
    finally:
        os.close(fd)


def outcome(path: Path, data: bytes) -> dict[str, torch.Tensor] | QpkError:
    """What reading ``data`` gives: the tensors, or the QpkError. Anything else propagates."""
    put(path, data)
    try:
        return load_all(path)
    except QpkError as exc:
        return exc


def same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return list(a) == list(b) and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and a[k].view(-1).view(torch.uint8).numpy().tobytes() == b[k].view(-1).view(torch.uint8).numpy().tobytes()
        for k in a)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


@pytest.fixture(scope="module")
def sample(workdir: Path) -> bytes:
    write_sample(workdir / "sample.qpk")
    return (workdir / "sample.qpk").read_bytes()


@pytest.fixture(scope="module")
def sample_tensors(workdir: Path, sample: bytes) -> dict[str, torch.Tensor]:
    result = outcome(workdir / "reference.qpk", sample)
    assert isinstance(result, dict)
    return result


# -- exhaustive: every byte, every prefix ----------------------------------------------------


def test_every_single_byte_change_is_rejected(workdir, sample, sample_tensors):
    """Each offset, three new values (one bit, all bits, a value from the file's own bytes)."""
    path = workdir / "one-byte.qpk"
    rng = random.Random(7)
    survivors = []
    for offset in range(len(sample)):
        old = sample[offset]
        for new in {old ^ 0x01, old ^ 0xFF, rng.choice(sample)} - {old}:
            changed = bytearray(sample)
            changed[offset] = new
            result = outcome(path, bytes(changed))
            if not isinstance(result, QpkError):
                assert same_tensors(result, sample_tensors), f"byte {offset} = {new:#x} changed a tensor"
                survivors.append((offset, new))
    # the spec (R5, R17, R18 and the exact layout) says every change is caught
    assert survivors == []


def test_every_single_byte_change_of_a_version_3_file_is_rejected(workdir):
    """The same on a version-3 file: compressed header, compact entries, float16, byte planes."""
    write_sample3(workdir / "sample3.qpk")
    sample3 = (workdir / "sample3.qpk").read_bytes()
    path = workdir / "one-byte3.qpk"
    for offset in range(len(sample3)):
        changed = bytearray(sample3)
        changed[offset] ^= 0x01
        assert isinstance(outcome(path, bytes(changed)), QpkError), offset
    for size in range(0, len(sample3), 7):
        assert isinstance(outcome(path, sample3[:size]), QpkError), size


def test_every_truncation_is_rejected(workdir, sample):
    path = workdir / "truncated.qpk"
    for size in range(len(sample)):
        result = outcome(path, sample[:size])
        assert isinstance(result, QpkError), size


@given(extra=st.binary(min_size=1, max_size=200))
@FUZZ_SETTINGS
def test_extension_is_rejected(workdir, sample, extra):
    result = outcome(workdir / "extended.qpk", sample + extra)
    assert isinstance(result, QpkError) and result.rule == "R16"


# -- random mutations ----------------------------------------------------------------------------


@given(flips=st.lists(st.integers(min_value=0), min_size=1, max_size=8))
@FUZZ_SETTINGS
def test_bit_flips(workdir, sample, flips):
    data = bytearray(sample)
    for flip in flips:
        bit = flip % (len(data) * 8)
        data[bit // 8] ^= 1 << (bit % 8)
    outcome(workdir / "flipped.qpk", bytes(data))


@given(data=st.binary(max_size=600), keep_magic=st.booleans())
@FUZZ_SETTINGS
def test_random_bytes(workdir, sample, data, keep_magic):
    prefix = sample[:PREAMBLE_SIZE] if keep_magic else b""
    outcome(workdir / "random.qpk", prefix + data)


@given(start=st.integers(min_value=0), size=st.integers(min_value=1, max_value=64), data=st.data())
@FUZZ_SETTINGS
def test_random_splices(workdir, sample, start, size, data):
    """Overwrite, insert or delete a run of bytes somewhere."""
    start %= len(sample)
    mode = data.draw(st.sampled_from(["overwrite", "insert", "delete"]))
    chunk = data.draw(st.binary(min_size=size, max_size=size))
    if mode == "overwrite":
        mutated = sample[:start] + chunk + sample[start + size:]
    elif mode == "insert":
        mutated = sample[:start] + chunk + sample[start:]
    else:
        mutated = sample[:start] + sample[start + size:]
    outcome(workdir / "spliced.qpk", mutated)


# -- random header values, with a correct checksum (so the checks after R5 are exercised) ------------

MSGPACK_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(min_value=-(2 ** 63), max_value=2 ** 64 - 1)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=20) | st.binary(max_size=40),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4),
    max_leaves=12,
)
INTERESTING_INTS = st.sampled_from([0, 1, 2, 3, 7, 8, 15, 16, 17, 63, 64, 65, 255, 256, 2 ** 16, 2 ** 31,
                                    2 ** 32 - 1, 2 ** 32, 2 ** 48, 2 ** 48 + 1, 2 ** 63, 2 ** 64 - 1, -1,
                                    -(2 ** 63)])
FIELD_VALUES = MSGPACK_VALUES | INTERESTING_INTS | st.sampled_from(
    ["raw", "uniform", "kmeans", "tensor", "channel", "none", "zstd", "float32", "bool", "bfloat16",
     "int64", "uint16", [], [0], [2 ** 32, 2 ** 32], [1] * 33, {}, {"codebook_size": 3}])


@given(data=st.data())
@FUZZ_SETTINGS
def test_random_header_values(workdir, sample, data):
    doc, payloads = split(sample)
    stored = lay_out(doc, payloads)
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        entry = data.draw(st.sampled_from(doc["tensors"]))
        key = data.draw(st.sampled_from(sorted(entry) + ["params.min", "params.codebook_size", "metadata"]))
        value = data.draw(FIELD_VALUES)
        if key == "metadata":
            doc["metadata"] = value if data.draw(st.booleans()) else {"k": value}
        elif key.startswith("params."):
            if isinstance(entry["params"], dict):
                entry["params"][key.split(".", 1)[1]] = value
        else:
            entry[key] = value
    # either keep the stored layout or re-derive offsets, lengths and checksums from it
    body = lay_out(doc, payloads) if data.draw(st.booleans()) else stored
    outcome(workdir / "fields.qpk", assemble(doc, body))


@given(header=st.binary(min_size=1, max_size=300))
@FUZZ_SETTINGS
def test_random_header_bytes_with_a_valid_checksum(workdir, header):
    outcome(workdir / "header.qpk", assemble(header, b""))


@given(doc=st.dictionaries(st.sampled_from(["tensors", "metadata", "x"]), MSGPACK_VALUES, max_size=3))
@FUZZ_SETTINGS
def test_random_documents(workdir, doc):
    outcome(workdir / "document.qpk", assemble(msgpack.packb(doc, use_bin_type=True), b""))


# -- payload bytes with the checksum fixed up, so decoding sees them ------------------------------------


@given(data=st.data())
@FUZZ_SETTINGS
def test_payload_mutations_reach_the_decoders(workdir, sample, data):
    doc, payloads = split(sample)
    index = data.draw(st.sampled_from([i for i, p in enumerate(payloads) if p]))
    payload = bytearray(payloads[index])
    for _ in range(data.draw(st.integers(min_value=1, max_value=4))):
        payload[data.draw(st.integers(0, len(payload) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        payload = payload[: data.draw(st.integers(1, len(payload)))]
        doc["tensors"][index]["length"] = len(payload)
    payloads[index] = bytes(payload)
    body = lay_out(doc, payloads)  # offsets, lengths and checksums now match the mutated payload
    outcome(workdir / "payload.qpk", assemble(doc, body))


def test_preamble_fields_with_valid_checksum(workdir, sample):
    """Every preamble field through interesting values, the checksum kept right."""
    doc, payloads = split(sample)
    header = msgpack.packb(doc, use_bin_type=True)
    body = lay_out(doc, payloads)
    values = [0, 1, 2, 63, 64, 65, len(header) - 1, len(header) + 1, 2 ** 16, 2 ** 28, 2 ** 28 + 1,
              2 ** 31, 2 ** 32 - 1]
    path = workdir / "preamble.qpk"
    for field in range(1, 5):
        for value in values:
            fields = [sample[:8], 1, len(header), zlib.crc32(header), 0]
            fields[field] = value
            data = struct.pack("<8sIIII", *fields) + sample[PREAMBLE_SIZE:]
            result = outcome(path, data)
            if (field, value) not in {(1, 1), (2, len(header)), (4, 0)}:
                assert isinstance(result, QpkError), (field, value)
    assert isinstance(outcome(path, assemble(header, body)), dict)
