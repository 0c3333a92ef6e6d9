"""The costliest files under 64 KB that the spec's rules allow (R15, R19, R23), built by hand.

Used by tests/test_work_bounds.py (the files are valid and at the bounds; one step past a
bound is refused) and tests/benchmarks/bench_worst_case.py (the CPU they cost to open,
verify and load). Each builder returns the file's bytes; ``SIZE`` is the file-size budget.

- ``many_steps``: as many rANS entries as fit, each a 14-byte payload of one lane that
  decodes 8,192 indices in 8,192 steps (the per-payload step bound of R19).
- ``many_lanes``: rANS payloads whose lanes decode 8,192 indices each, up to R23's bound on
  decoded bytes (float16, so the most indices per decoded byte).
- ``zstd_expansion``: 1-bit indices in zstd run-length blocks (4 bytes per 128 KiB, near
  R15's 32,768x), up to R23's bound.
"""

from __future__ import annotations

import struct
import zlib

import numpy as np
from test_reader_rules import assemble

from qpack.format import default_max_bytes
from qpack.rans import MAX_STEPS, STATE_LOW

__all__ = ["SIZE", "BUILDERS", "rans_payload", "entry", "build", "many_steps", "many_lanes", "zstd_expansion",
           "rans_steps"]

#: every file built here is smaller than this
SIZE = 64 * 1024


def rans_payload(lanes: int) -> bytes:
    """A valid rANS payload of one symbol (f = [2^15]): every state stays at 2^16 and no word
    is read, so each lane decodes index 0 for as many steps as the header asks."""
    return struct.pack("<II", lanes, 1) + struct.pack("<H", 1 << 15) + struct.pack(f"<{lanes}I", *[STATE_LOW] * lanes)


def entry(name: str, numel: int, payload: bytes, compression: str, dtype: str = "float16") -> dict:
    """A 1-bit kmeans entry (one centroid, the smallest params) of ``numel`` elements."""
    return {"name": name, "dtype": dtype, "shape": [numel], "encoding": "kmeans", "bits": 1, "width": 1,
            "granularity": "tensor", "group_size": 0,
            "params": {"codebook": np.float32([0.5]).tobytes(), "codebook_size": 1},
            "offset": 0, "length": len(payload), "raw_length": (numel + 7) // 8, "compression": compression,
            "crc32": zlib.crc32(payload), "stats": {}}


def build(entries: list[dict], payloads: list[bytes]) -> bytes:
    data = bytearray()
    for item, payload in zip(entries, payloads):
        data += bytes(-len(data) % 64)
        item["offset"] = len(data)
        data += payload
    version = 2 if any(e["compression"] == "rans" for e in entries) else 1
    return assemble({"tensors": entries, "metadata": {}}, bytes(data), version=version)


def _most_that_fit(make: object) -> bytes:
    """make(count) -> file bytes, increasing in count: the largest file under SIZE."""
    low, high = 1, 1
    while len(make(high)) < SIZE:  # type: ignore[operator]
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if len(make(middle)) < SIZE else (low, middle)  # type: ignore[operator]
    return make(low)  # type: ignore[operator]


def many_steps(count: int | None = None) -> bytes:
    """``count`` entries (by default as many as fit under SIZE) of 8,192 steps each."""
    payload = rans_payload(1)

    def make(count: int) -> bytes:
        return build([entry(f"{i:x}", MAX_STEPS, payload, "rans") for i in range(count)], [payload] * count)
    return make(count) if count else _most_that_fit(make)


def _up_to_the_bound(numel_per_byte: int, make_one: object) -> bytes:
    """Entries of float16 indices decoding to R23's bound for the file (about SIZE bytes)."""
    limit = default_max_bytes(SIZE) // 2  # float16 elements the bound allows a file of <= SIZE bytes
    data = b""
    for count in (1, 2, 4, 8, 16, 32):
        numel = limit // count
        numel -= numel % numel_per_byte
        entries, payloads = zip(*(make_one(f"{i:x}", numel) for i in range(count)))  # type: ignore[operator]
        data = build(list(entries), list(payloads))
        if len(data) < SIZE:
            return data
    return data


def many_lanes() -> bytes:
    def one(name: str, numel: int) -> tuple[dict, bytes]:
        payload = rans_payload(numel // MAX_STEPS)
        return entry(name, numel, payload, "rans"), payload
    return _up_to_the_bound(MAX_STEPS, one)


def zstd_frame_of_zeros(count: int) -> bytes:
    """A zstd frame (RFC 8878) of ``count`` zero bytes in run-length blocks of 128 KiB."""
    block = 1 << 17
    sizes = [block] * (count // block) + ([count % block] if count % block else [])
    out = bytearray(struct.pack("<IBQ", 0xFD2FB528, 0xE0, count))  # single segment, 8-byte content size
    for i, size in enumerate(sizes):
        out += ((size << 3) | (1 << 1) | int(i == len(sizes) - 1)).to_bytes(3, "little") + b"\x00"
    return bytes(out)


def zstd_expansion() -> bytes:
    def one(name: str, numel: int) -> tuple[dict, bytes]:
        payload = zstd_frame_of_zeros((numel + 7) // 8)
        return entry(name, numel, payload, "zstd"), payload
    return _up_to_the_bound(8, one)


BUILDERS = {"many_steps": many_steps, "many_lanes": many_lanes, "zstd_expansion": zstd_expansion}


def rans_steps(data: bytes) -> int:
    """Decoding steps of all rANS payloads in a file built here (lanes read from each payload)."""
    import msgpack

    length = struct.unpack_from("<I", data, 12)[0]
    doc = msgpack.unpackb(data[24:24 + length], raw=False)
    start = -(-(24 + length) // 64) * 64
    steps = 0
    for item in doc["tensors"]:
        if item["compression"] == "rans":
            lanes = struct.unpack_from("<I", data, start + item["offset"])[0]
            steps += -(-item["shape"][0] // lanes)
    return steps
