"""The .qpk container, version 1: constants, the header schema and its validation.

specs/qpk-format.md is the source of truth; every check below names the reader rule
(R1..R21) it enforces. Nothing here touches payload bytes: ``parse_header`` turns header
bytes into validated ``TensorEntry`` records, ``build_header`` does the reverse.
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from .dtypes import DTYPES, is_float_name
from .errors import FormatError, UnsupportedVersionError

__all__ = [
    "MAGIC",
    "VERSION",
    "SUPPORTED_VERSIONS",
    "PREAMBLE_SIZE",
    "ALIGNMENT",
    "Limits",
    "TensorEntry",
    "align",
    "pack_preamble",
    "parse_preamble",
    "build_header",
    "parse_header",
    "expected_raw_length",
    "layout_offsets",
]

MAGIC = b"\x89QPK\r\n\x1a\n"
VERSION = 1
SUPPORTED_VERSIONS = (1,)
PREAMBLE = struct.Struct("<8sIIII")  # magic, version, header length, header crc32, reserved
PREAMBLE_SIZE = PREAMBLE.size  # 24
ALIGNMENT = 64

ENCODINGS = ("raw", "uniform", "kmeans")
GRANULARITIES = ("tensor", "channel")
COMPRESSIONS = ("none", "zstd")
TENSOR_KEYS = frozenset(
    {"name", "dtype", "shape", "encoding", "bits", "granularity", "params", "offset",
     "length", "raw_length", "compression", "crc32", "stats"}
)
PARAM_KEYS = {"raw": frozenset(), "uniform": frozenset({"min", "max"}),
              "kmeans": frozenset({"codebook", "codebook_size"})}


@dataclass(frozen=True)
class Limits:
    """Reader limits (spec section "Limits"). Files beyond them are rejected."""

    max_header_bytes: int = 256 * 1024 * 1024
    max_tensors: int = 1_000_000
    max_name_bytes: int = 1024
    max_ndim: int = 32
    max_elements: int = 1 << 48
    max_metadata_entries: int = 4096
    max_metadata_key_bytes: int = 256
    max_metadata_value_bytes: int = 65536
    max_stats_entries: int = 16


DEFAULT_LIMITS = Limits()


@dataclass
class TensorEntry:
    """One tensor's record in the header. ``params`` holds float32 little-endian bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    encoding: str
    bits: int
    granularity: str
    params: dict[str, Any]
    offset: int = 0
    length: int = 0
    raw_length: int = 0
    compression: str = "none"
    crc32: int = 0
    stats: dict[str, int | float] = field(default_factory=dict)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        return self.shape[0] if self.granularity == "channel" else 1

    def to_header(self) -> dict[str, Any]:
        return {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "encoding": self.encoding, "bits": self.bits, "granularity": self.granularity,
            "params": self.params, "offset": self.offset, "length": self.length,
            "raw_length": self.raw_length, "compression": self.compression, "crc32": self.crc32,
            "stats": self.stats,
        }


def align(n: int, alignment: int = ALIGNMENT) -> int:
    """Round ``n`` up to a multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment


def expected_raw_length(dtype: str, shape: tuple[int, ...], encoding: str, bits: int) -> int:
    """Decompressed payload length implied by dtype, shape, encoding and bits (R14)."""
    numel = math.prod(shape)
    if encoding == "raw":
        return numel * DTYPES[dtype][1]
    return (numel * bits + 7) // 8


def layout_offsets(lengths: list[int]) -> list[int]:
    """Payload offsets relative to the data section: first at 0, each next one aligned (R16)."""
    offsets, end = [], 0
    for length in lengths:
        offsets.append(align(end))
        end = offsets[-1] + length
    return offsets


def pack_preamble(header: bytes, version: int = VERSION) -> bytes:
    return PREAMBLE.pack(MAGIC, version, len(header), zlib.crc32(header), 0)


def parse_preamble(data: bytes, file_size: int, limits: Limits = DEFAULT_LIMITS) -> int:
    """Check the fixed 24 bytes (R1-R4) and return the header length."""
    if file_size < PREAMBLE_SIZE or len(data) < PREAMBLE_SIZE:
        raise FormatError("R1", f"file is {file_size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble: not a .qpk file")
    magic, version, header_length, _crc, reserved = PREAMBLE.unpack(data[:PREAMBLE_SIZE])
    if magic != MAGIC:
        raise FormatError("R1", "bad magic bytes: not a .qpk file")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            "R2", f"file is .qpk version {version}; this reader reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))} (upgrade qpack)")
    if reserved != 0:
        raise FormatError("R3", f"reserved preamble field is {reserved}, must be 0")
    if header_length == 0 or header_length > limits.max_header_bytes:
        raise FormatError("R4", f"header length {header_length} outside 1..{limits.max_header_bytes}")
    if PREAMBLE_SIZE + header_length > file_size:
        raise FormatError("R4", f"header length {header_length} runs past the end of the {file_size}-byte file (truncated?)")
    return header_length


def header_crc(data: bytes) -> int:
    return PREAMBLE.unpack(data[:PREAMBLE_SIZE])[3]


def build_header(entries: list[TensorEntry], metadata: dict[str, str]) -> bytes:
    """Deterministic msgpack bytes of the header (keys in a fixed order, floats as float64)."""
    doc = {"tensors": [e.to_header() for e in entries], "metadata": dict(sorted(metadata.items()))}
    return msgpack.packb(doc, use_bin_type=True, use_single_float=False)


def _unpack_msgpack(header: bytes, limits: Limits) -> Any:
    n = len(header)
    try:
        return msgpack.unpackb(
            header, raw=False, strict_map_key=True, use_list=True,
            max_str_len=min(n, limits.max_metadata_value_bytes),
            max_bin_len=n, max_array_len=min(n, max(limits.max_tensors, limits.max_ndim)),
            max_map_len=min(n, max(limits.max_metadata_entries, 16)), max_ext_len=0,
        )
    except (ValueError, TypeError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError,
            msgpack.OutOfData, RecursionError, UnicodeDecodeError) as exc:
        raise FormatError("R6", f"header is not valid msgpack within limits: {type(exc).__name__}: {exc}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(cond: bool, rule: str, message: str) -> None:
    if not cond:
        raise FormatError(rule, message)


def parse_header(header: bytes, expected_crc: int, limits: Limits = DEFAULT_LIMITS) -> tuple[list[TensorEntry], dict[str, str]]:
    """Validate header bytes (R5-R16 but the file-size check) and build the entries."""
    _expect(zlib.crc32(header) == expected_crc, "R5", "header checksum mismatch: the header is corrupted")
    doc = _unpack_msgpack(header, limits)
    _expect(isinstance(doc, dict) and set(doc) == {"tensors", "metadata"}, "R6",
            "header must be a map with exactly the keys 'tensors' and 'metadata'")
    metadata = doc["metadata"]
    _expect(isinstance(metadata, dict) and len(metadata) <= limits.max_metadata_entries, "R7",
            "metadata must be a map of at most "f"{limits.max_metadata_entries} entries")
    for key, value in metadata.items():
        _expect(isinstance(key, str) and isinstance(value, str), "R7", "metadata keys and values must be strings")
        _expect(len(key.encode()) <= limits.max_metadata_key_bytes
                and len(value.encode()) <= limits.max_metadata_value_bytes, "R7",
                f"metadata entry {key[:40]!r} is longer than the limits")
    tensors = doc["tensors"]
    _expect(isinstance(tensors, list) and len(tensors) <= limits.max_tensors, "R8",
            f"'tensors' must be an array of at most {limits.max_tensors} maps")
    entries: list[TensorEntry] = []
    seen: set[str] = set()
    for position, raw in enumerate(tensors):
        entry = _parse_entry(position, raw, limits)
        _expect(entry.name not in seen, "R9", f"tensor name {entry.name!r} appears twice")
        seen.add(entry.name)
        entries.append(entry)
    expected = layout_offsets([e.length for e in entries])
    for entry, offset in zip(entries, expected):
        _expect(entry.offset == offset, "R16",
                f"tensor {entry.name!r}: payload offset {entry.offset}, expected {offset} (payloads must tile the data section in order, {ALIGNMENT}-byte aligned)")
    return entries, dict(metadata)


def _parse_entry(position: int, raw: Any, limits: Limits) -> TensorEntry:
    where = f"tensor #{position}"
    _expect(isinstance(raw, dict) and set(raw) == TENSOR_KEYS, "R8",
            f"{where}: entry must be a map with exactly the keys {sorted(TENSOR_KEYS)}")
    name = raw["name"]
    _expect(isinstance(name, str) and 0 < len(name.encode()) <= limits.max_name_bytes, "R9",
            f"{where}: name must be a non-empty string of at most {limits.max_name_bytes} bytes")
    where = f"tensor {name!r}"
    for key in ("bits", "offset", "length", "raw_length", "crc32"):
        _expect(_is_int(raw[key]) and raw[key] >= 0, "R8", f"{where}: {key} must be a non-negative integer")
    for key in ("dtype", "encoding", "granularity", "compression"):
        _expect(isinstance(raw[key], str), "R8", f"{where}: {key} must be a string")
    _expect(raw["crc32"] < 1 << 32, "R8", f"{where}: crc32 out of range")
    dtype = raw["dtype"]
    _expect(dtype in DTYPES, "R10", f"{where}: unknown dtype {dtype[:40]!r}")
    shape = raw["shape"]
    _expect(isinstance(shape, list) and len(shape) <= limits.max_ndim, "R11",
            f"{where}: shape must be an array of at most {limits.max_ndim} dimensions")
    numel = 1
    for dim in shape:
        _expect(_is_int(dim) and 0 <= dim <= limits.max_elements, "R11", f"{where}: bad dimension {dim!r}")
        numel *= dim  # Python ints do not wrap; the bound below keeps them small
        _expect(numel <= limits.max_elements, "R11", f"{where}: {numel} elements is more than {limits.max_elements}")
    encoding, bits, granularity = raw["encoding"], raw["bits"], raw["granularity"]
    _expect(encoding in ENCODINGS, "R12", f"{where}: unknown encoding {encoding[:40]!r} (a newer qpack may read it)")
    _expect(granularity in GRANULARITIES, "R12", f"{where}: unknown granularity {granularity[:40]!r}")
    if encoding == "raw":
        _expect(bits == 0 and granularity == "tensor", "R12", f"{where}: raw tensors have bits 0 and granularity 'tensor'")
    else:
        _expect(1 <= bits <= 16, "R12", f"{where}: bits {bits} outside 1..16")
        _expect(is_float_name(dtype), "R12", f"{where}: {encoding} needs a floating dtype, not {dtype}")
        _expect(numel >= 1, "R12", f"{where}: a quantized tensor needs at least one element")
        if granularity == "channel":
            _expect(len(shape) >= 1, "R12", f"{where}: per-channel needs at least one dimension")
    channels = shape[0] if granularity == "channel" else 1
    params = _parse_params(where, encoding, bits, channels, raw["params"])
    raw_length = expected_raw_length(dtype, tuple(shape), encoding, bits)
    _expect(raw["raw_length"] == raw_length, "R14",
            f"{where}: raw_length {raw['raw_length']}, but {dtype} {shape} as {encoding} needs {raw_length} bytes")
    compression, length = raw["compression"], raw["length"]
    _expect(compression in COMPRESSIONS, "R15", f"{where}: unknown compression {compression[:40]!r}")
    if compression == "none":
        _expect(length == raw_length, "R15", f"{where}: uncompressed payload is {length} bytes, expected {raw_length}")
    else:
        _expect(0 < length < raw_length, "R15", f"{where}: zstd payload of {length} bytes for {raw_length} raw bytes")
    stats = raw["stats"]
    _expect(isinstance(stats, dict) and len(stats) <= limits.max_stats_entries, "R21", f"{where}: stats must be a small map")
    for key, value in stats.items():
        _expect(isinstance(key, str) and len(key) <= 64 and (isinstance(value, (int, float)) and not isinstance(value, bool)),
                "R21", f"{where}: stats entries must map short strings to numbers")
    return TensorEntry(name, dtype, tuple(shape), encoding, bits, granularity, params,
                       raw["offset"], length, raw_length, compression, raw["crc32"], stats)


def _float32_array(where: str, key: str, value: Any, count: int) -> np.ndarray:
    _expect(isinstance(value, bytes) and len(value) == 4 * count, "R13",
            f"{where}: params.{key} must be {4 * count} bytes of float32")
    values = np.frombuffer(value, dtype="<f4")
    _expect(bool(np.isfinite(values).all()), "R13", f"{where}: params.{key} holds a non-finite value")
    return values


def _parse_params(where: str, encoding: str, bits: int, channels: int, params: Any) -> dict[str, Any]:
    _expect(isinstance(params, dict) and set(params) == PARAM_KEYS[encoding], "R13",
            f"{where}: params for {encoding} must have exactly the keys {sorted(PARAM_KEYS[encoding])}")
    if encoding == "uniform":
        lows = _float32_array(where, "min", params["min"], channels)
        highs = _float32_array(where, "max", params["max"], channels)
        _expect(bool((lows <= highs).all()), "R13", f"{where}: a min is above its max")
        with np.errstate(over="ignore"):
            spans = highs - lows
        _expect(bool(np.isfinite(spans).all()), "R13", f"{where}: max - min overflows float32")
    elif encoding == "kmeans":
        size = params["codebook_size"]
        _expect(_is_int(size) and 1 <= size <= 1 << bits, "R13",
                f"{where}: codebook_size {size!r} outside 1..{1 << bits} (2^bits)")
        _float32_array(where, "codebook", params["codebook"], channels * size)
    return dict(params)
