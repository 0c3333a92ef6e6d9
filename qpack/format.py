"""The .qpk container, versions 1 to 5: constants, the header schema and its validation.

specs/qpk-format.md is the source of truth; every check below names the reader rule
(R1..R21) it enforces. Nothing here touches payload bytes: ``parse_header`` turns header
bytes into validated ``TensorEntry`` records, ``build_header`` does the reverse.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np
import zstandard

from .codecs.uniform import from_uint8
from .dtypes import DTYPES, is_float_name
from .errors import ChecksumError, FormatError, UnsupportedVersionError
from .rans import MAX_STEPS as RANS_MAX_STEPS

try:  # ISA-L's CRC-32 (carry-less multiplies): the same values, 3.4x zlib's speed (1.7 ms on 19 MB)
    from isal.isal_zlib import crc32
except ImportError:  # pragma: no cover - isal is a dependency where it has wheels
    from zlib import crc32

__all__ = [
    "crc32",
    "MAGIC",
    "VERSION",
    "SUPPORTED_VERSIONS",
    "PREAMBLE_SIZE",
    "ALIGNMENT",
    "ALIGNED_PAYLOAD",
    "Limits",
    "TensorEntry",
    "align",
    "pack_preamble",
    "parse_preamble",
    "build_header",
    "parse_header",
    "expected_raw_length",
    "parameter_rows",
    "layout_offsets",
    "payload_offset",
    "data_start",
    "payload_span",
    "name_problem",
    "metadata_problem",
    "encode_header",
    "fixed_bytes",
    "param_values",
    "decoded_bytes",
    "default_max_bytes",
    "decoded_size_problem",
    "check_sources",
]

MAGIC = b"\x89QPK\r\n\x1a\n"
#: the newest version, which qpack writes (spec section 6); older versions are written only
#: when asked (QpkWriter(version=)), for readers of those
VERSION = 5
#: version 2 adds rANS-coded indices; a version-2 file is one that uses them
RANS_VERSION = 2
#: version 3: compact entries, zstd header, param_dtype, compression "zstd_planes"
COMPACT_VERSION = 3
#: version 4: the "derived" encoding (a mask rebuilt from another tensor, no payload)
DERIVED_VERSION = 4
#: version 5: payloads follow each other without padding, except long ones (spec 1.3)
PACKED_VERSION = 5
SUPPORTED_VERSIONS = (1, 2, 3, 4, 5)
# magic, version, header length, header crc32, reserved (v1, v2) / header raw length U (v3)
PREAMBLE = struct.Struct("<8sIIII")
PREAMBLE_SIZE = PREAMBLE.size  # 24
ALIGNMENT = 64
#: version 5: a payload at least this long starts ALIGNMENT-aligned (so may be memory-mapped
#: in place), and so does the data section of a file holding one; shorter payloads, where
#: padding cost small models 3-8 % of their file, follow the one before directly
ALIGNED_PAYLOAD = 65_536

ENCODINGS = ("raw", "uniform", "kmeans", "derived")
#: the version each encoding appeared in (R12)
ENCODING_VERSION = {"raw": 1, "uniform": 1, "kmeans": 1, "derived": DERIVED_VERSION}
#: R24: the rules a derived entry may name (spec 3.5)
DERIVED_RULES = ("nonzero",)
GRANULARITIES = ("tensor", "channel", "group")
#: R12: group sizes a reader accepts
MIN_GROUP, MAX_GROUP = 16, 65536
COMPRESSIONS = ("none", "zstd", "rans", "zstd_planes")
#: the compression each version introduced (R15)
COMPRESSION_VERSION = {"none": 1, "zstd": 1, "rans": RANS_VERSION, "zstd_planes": COMPACT_VERSION}
#: parameter element types (R13), all but float32 from version 3 on; "uint8": 8-bit codes of
#: each row's min and max under a float32 base per tensor (uniform only, spec 3.2)
PARAM_DTYPES = {"float32": "<f4", "float16": "<f2", "uint8": "<u1"}
UINT8_PARAM_KEYS = frozenset({"min", "max", "base"})
TENSOR_KEYS = frozenset(
    {"name", "dtype", "shape", "encoding", "bits", "width", "granularity", "group_size", "params",
     "offset", "length", "raw_length", "compression", "crc32", "stats"}
)
#: version 3 (spec 2.4): the keys in their order; those with a default are omitted when equal
#: to it (width's default is bits); offset and raw_length are derived, never stored
COMPACT_KEYS = ("name", "dtype", "shape", "encoding", "bits", "width", "granularity", "group_size",
                "param_dtype", "params", "length", "compression", "crc32", "stats")
COMPACT_REQUIRED = frozenset({"name", "dtype", "shape", "length", "crc32"})
COMPACT_DEFAULTS: dict[str, Any] = {"encoding": "raw", "bits": 0, "granularity": "tensor", "group_size": 0,
                                    "param_dtype": "float32", "params": {}, "compression": "none", "stats": {}}
#: zstd level of a version-3 header (small: the slowest level costs nothing)
HEADER_ZSTD_LEVEL = 19
PARAM_KEYS = {"raw": frozenset(), "uniform": frozenset({"min", "max"}),
              "kmeans": frozenset({"codebook", "codebook_size"}), "derived": frozenset({"source", "rule"})}
#: R6: items in any msgpack array or map other than 'tensors' and 'metadata'
INNER_CONTAINER_ITEMS = 256
#: R15: no zstd frame expands more (a block of at most 128 KiB takes at least 4 bytes)
MAX_ZSTD_EXPANSION = 32768
#: R15: the fixed part of a rANS payload with a one-symbol alphabet (N, A, one frequency)
_RANS_FIXED_BYTES = 10
#: R23: by default a reader refuses a file whose tensors decode to more than this many
#: bytes per byte of file, and at least DECODED_FLOOR_BYTES (the caller may allow more)
DECODED_BYTES_PER_FILE_BYTE = 256
DECODED_FLOOR_BYTES = 16 << 20
_MAP_TYPE_BYTES = frozenset(range(0x80, 0x90)) | {0xDE, 0xDF}
_ARRAY_TYPE_BYTES = frozenset(range(0x90, 0xA0)) | {0xDC, 0xDD}


@dataclass(frozen=True)
class Limits:
    """Reader limits, as the spec's reader rules state them (R4, R6-R11, R21).

    Files beyond them are rejected. The defaults are the spec's; smaller ones suit a reader
    that only accepts small files.
    """

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
    #: stored bits per index: ``bits``, or a wider container that compresses better (spec 4)
    width: int = 0
    #: elements per parameter set with granularity "group", else 0
    group_size: int = 0
    #: element type of the parameter arrays in ``params``: "float32", or "float16" (version 3)
    param_dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.width == 0 and self.encoding != "raw":
            self.width = self.bits

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def channels(self) -> int:
        """Number of parameter sets (rows): spec section 3."""
        return parameter_rows(self.shape, self.granularity, self.group_size)

    def to_header(self) -> dict[str, Any]:
        return {
            "name": self.name, "dtype": self.dtype, "shape": list(self.shape),
            "encoding": self.encoding, "bits": self.bits, "width": self.width,
            "granularity": self.granularity, "group_size": self.group_size,
            "params": self.params, "offset": self.offset, "length": self.length,
            "raw_length": self.raw_length, "compression": self.compression, "crc32": self.crc32,
            "stats": self.stats,
        }

    def to_compact_header(self) -> dict[str, Any]:
        """The version-3 entry (spec 2.4): keys equal to their default left out, no offset or raw_length."""
        full = self.to_header()
        full["param_dtype"] = self.param_dtype
        out: dict[str, Any] = {}
        for key in COMPACT_KEYS:
            value = full[key]
            default = self.bits if key == "width" else COMPACT_DEFAULTS.get(key, _REQUIRED)
            if value != default or key in COMPACT_REQUIRED:
                out[key] = value
        return out


_REQUIRED = object()  # no default: the key is always stored
_DERIVED = object()  # version 3: a value the reader derives (raw_length)


def align(n: int, alignment: int = ALIGNMENT) -> int:
    """Round ``n`` up to a multiple of ``alignment``."""
    return (n + alignment - 1) // alignment * alignment


def expected_raw_length(dtype: str, shape: tuple[int, ...], encoding: str, width: int) -> int:
    """Decompressed payload length implied by dtype, shape, encoding and index width (R14)."""
    numel = math.prod(shape)
    if encoding == "raw":
        return numel * DTYPES[dtype][1]
    if encoding == "derived":  # no payload: rebuilt from its source (spec 3.5)
        return 0
    return (numel * width + 7) // 8


def parameter_rows(shape: tuple[int, ...] | list[int], granularity: str, group_size: int = 0) -> int:
    """Number of parameter sets: 1 per tensor, shape[0] per channel, ceil(numel / G) per group."""
    if granularity == "channel":
        return shape[0]
    if granularity == "group":
        return -(-math.prod(shape) // group_size)
    return 1


def _aligned(length: int, version: int) -> bool:
    """Whether a payload of this length starts aligned (spec 1.3): always before version 5."""
    return version < PACKED_VERSION or length >= ALIGNED_PAYLOAD


def payload_offset(end: int, length: int, version: int = VERSION) -> int:
    """Where a payload of ``length`` bytes starts, relative to the data section, when the one
    before it ends at ``end`` (spec 1.3): there, or rounded up to ALIGNMENT."""
    return align(end) if _aligned(length, version) else end


def layout_offsets(lengths: list[int], version: int = VERSION) -> list[int]:
    """Payload offsets relative to the data section (R16), the first at 0 (spec 1.3)."""
    offsets, end = [], 0
    for length in lengths:
        offsets.append(payload_offset(end, length, version))
        end = offsets[-1] + length
    return offsets


def data_start(header_end: int, lengths: list[int], version: int = VERSION) -> int:
    """D, where the data section starts (spec 1): ``header_end`` (24 + H) rounded up to
    ALIGNMENT, or in version 5, where no payload starts aligned, ``header_end`` itself."""
    if version < PACKED_VERSION or any(_aligned(length, version) for length in lengths):
        return align(header_end)
    return header_end


def payload_span(length: int, version: int = VERSION) -> int:
    """At most what a payload of this length adds to the data section, padding before it
    included (the allocation's cost of a candidate): ``length``, or aligned."""
    return align(length) if _aligned(length, version) else length


def version_for(entries: list[TensorEntry]) -> int:
    """The lowest of versions 1 and 2 that expresses these entries (what a legacy writer writes)."""
    return RANS_VERSION if any(e.compression == "rans" for e in entries) else 1


def param_values(entry: TensorEntry, key: str) -> np.ndarray:
    """A parameter array of ``entry`` ("min", "max" or "codebook") as float32: float16 widened
    exactly, uint8 codes decoded with their base (spec 3)."""
    if entry.param_dtype == "uint8":
        base = np.frombuffer(entry.params["base"], dtype="<f4")
        if key == "base":
            return base.copy()
        lo, hi = from_uint8(np.frombuffer(entry.params["min"], np.uint8), np.frombuffer(entry.params["max"], np.uint8), base)
        return lo if key == "min" else hi
    return np.frombuffer(entry.params[key], dtype=PARAM_DTYPES[entry.param_dtype]).astype(np.float32)


def pack_preamble(header: bytes, version: int = VERSION, header_raw_length: int = 0) -> bytes:
    """The 24 bytes before ``header`` (the stored header bytes); ``header_raw_length`` is the
    version-3 field U (0: the header is stored as it is)."""
    return PREAMBLE.pack(MAGIC, version, len(header), crc32(header), header_raw_length)


def encode_header(entries: list[TensorEntry], metadata: dict[str, str],
                  version: int = VERSION) -> tuple[bytes, int]:
    """The stored header bytes and the preamble's last field (spec 1.1, 1.2).

    Version 3: the compact msgpack (2.4), zstd-compressed when that is smaller, and its
    length U (0 when stored as it is). Versions 1 and 2: the full msgpack and 0.
    """
    header = build_header(entries, metadata, version)
    if version < COMPACT_VERSION:
        return header, 0
    compressed = zstandard.ZstdCompressor(level=HEADER_ZSTD_LEVEL, write_content_size=True,
                                          write_checksum=False).compress(header)
    if len(compressed) < len(header):
        return compressed, len(header)
    return header, 0


def fixed_bytes(entries: list[TensorEntry], metadata: dict[str, str], version: int = VERSION) -> int:
    """Bytes of a file with these entries that are not payload: preamble, stored header,
    padding to the data section and between payloads (spec 1.3).

    Exact for the entries as given (their lengths and crc32 values take part in the header);
    the file's size is this plus the sum of the payload lengths.
    """
    header, _ = encode_header(entries, metadata, version)
    lengths = [e.length for e in entries]
    offsets = layout_offsets(lengths, version)
    data_end = offsets[-1] + lengths[-1] if entries else 0
    return data_start(PREAMBLE_SIZE + len(header), lengths, version) + data_end - sum(lengths)


def preamble_field(data: bytes) -> int:
    """The preamble's last u32: reserved (versions 1, 2) or the header raw length U (version 3)."""
    return PREAMBLE.unpack(data[:PREAMBLE_SIZE])[4]


def parse_preamble(data: bytes, file_size: int, limits: Limits = DEFAULT_LIMITS) -> int:
    """Check the fixed 24 bytes (R1-R4) and return the stored header length."""
    if file_size < PREAMBLE_SIZE or len(data) < PREAMBLE_SIZE:
        raise FormatError("R1", f"file is {file_size} bytes, shorter than the {PREAMBLE_SIZE}-byte preamble: not a .qpk file")
    magic, version, header_length, _crc, reserved = PREAMBLE.unpack(data[:PREAMBLE_SIZE])
    if magic != MAGIC:
        raise FormatError("R1", f"bad magic bytes: not a .qpk file{_what_it_looks_like(data)}")
    if version not in SUPPORTED_VERSIONS:
        raise UnsupportedVersionError(
            "R2", f"file is .qpk version {version}; this reader reads version(s) "
            f"{', '.join(map(str, SUPPORTED_VERSIONS))} (upgrade qpack)")
    if reserved != 0 and version < COMPACT_VERSION:
        raise FormatError("R3", f"reserved preamble field is {reserved}, must be 0")
    if header_length == 0 or header_length > limits.max_header_bytes:
        raise FormatError("R4", f"header length {header_length} outside 1..{limits.max_header_bytes}")
    if version >= COMPACT_VERSION and reserved != 0:
        # R3 (v3): U bounds what decompressing the header may allocate, before it runs
        if not header_length < reserved <= min(limits.max_header_bytes, header_length * MAX_ZSTD_EXPANSION):
            raise FormatError("R3", f"header raw length {reserved} outside {header_length + 1}.."
                              f"{min(limits.max_header_bytes, header_length * MAX_ZSTD_EXPANSION)} "
                              f"(more than the {header_length} stored bytes, at most the header limit)")
    if PREAMBLE_SIZE + header_length > file_size:
        raise FormatError("R4", f"header length {header_length} runs past the end of the {file_size}-byte file (truncated?)")
    return header_length


def _what_it_looks_like(data: bytes) -> str:
    if data.startswith(b"PK\x03\x04") or data[:1] == b"\x80":
        return " (it looks like a PyTorch checkpoint: 'qpack pack' turns one into a .qpk)"
    return ""


def header_crc(data: bytes) -> int:
    return PREAMBLE.unpack(data[:PREAMBLE_SIZE])[3]


def preamble_version(data: bytes) -> int:
    return PREAMBLE.unpack(data[:PREAMBLE_SIZE])[1]


def build_header(entries: list[TensorEntry], metadata: dict[str, str], version: int = VERSION) -> bytes:
    """Deterministic msgpack bytes of the header (keys in a fixed order, floats as float64),
    uncompressed; version 3 writes compact entries (spec 2.4)."""
    compact = version >= COMPACT_VERSION
    tensors = [e.to_compact_header() if compact else e.to_header() for e in entries]
    doc = {"tensors": tensors, "metadata": dict(sorted(metadata.items()))}
    return msgpack.packb(doc, use_bin_type=True, use_single_float=False)


def decompress_header(stored: bytes, raw_length: int) -> bytes:
    """R22: a version-3 header stored as one zstd frame of exactly ``raw_length`` bytes.

    ``raw_length`` was bounded by R3 before this runs, and the output is bounded by it.
    """
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise FormatError("R22", f"the header is not a zstd frame: {exc}") from None
    if declared != raw_length:
        raise FormatError("R22", f"the header's zstd frame declares {declared} bytes, the preamble says {raw_length}")
    try:
        header = zstandard.ZstdDecompressor().decompress(stored, max_output_size=raw_length, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError("R22", f"the header's zstd frame is corrupted: {exc}") from None
    if len(header) != raw_length:
        raise FormatError("R22", f"the header decompressed to {len(header)} bytes, expected {raw_length}")
    return header


class _HeaderSyntaxError(ValueError):
    """Raised inside msgpack's hooks; reported as R6."""


def _refuse_ext(code: int, data: bytes) -> Any:
    raise _HeaderSyntaxError(f"msgpack ext type {code} is not allowed in a .qpk header")


def _map_of_pairs(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    result = dict(pairs)
    if len(result) != len(pairs):
        raise _HeaderSyntaxError("a map repeats a key")
    return result


class _HeaderReader:
    """The header's msgpack objects one at a time, decoded with R6's limits.

    The two large containers (``tensors`` and ``metadata``) are walked item by item from
    their headers, so msgpack never pre-allocates for a count the bytes cannot hold; any
    other container holds at most INNER_CONTAINER_ITEMS items and msgpack's own stack bounds
    nesting (about 1000 levels), so a hostile header costs memory in proportion to its size.
    Strings are decoded with ``surrogateescape``: invalid UTF-8 survives decoding and is
    rejected by the rule that covers the string (R7, R9, R21), naming it.
    """

    def __init__(self, header: bytes, limits: Limits) -> None:
        size = len(header)
        self._header = header
        self._unpacker = msgpack.Unpacker(
            None, raw=False, unicode_errors="surrogateescape", strict_map_key=True,
            use_list=True, max_buffer_size=max(size, 1),
            max_str_len=min(size, limits.max_metadata_value_bytes), max_bin_len=size,
            max_array_len=INNER_CONTAINER_ITEMS, max_map_len=INNER_CONTAINER_ITEMS,
            max_ext_len=0, ext_hook=_refuse_ext, object_pairs_hook=_map_of_pairs,
        )
        self._unpacker.feed(header)

    def _next_type_byte(self) -> int:
        position = self._unpacker.tell()
        _expect(position < len(self._header), "R6", "the header ends inside a msgpack object")
        return self._header[position]

    def map_header(self, rule: str, what: str) -> int:
        """The item count of the map that comes next; FormatError(rule) if it is not a map."""
        _expect(self._next_type_byte() in _MAP_TYPE_BYTES, rule, f"{what} must be a msgpack map")
        return self._decode(self._unpacker.read_map_header)

    def array_header(self, rule: str, what: str) -> int:
        """The item count of the array that comes next; FormatError(rule) if it is not an array."""
        _expect(self._next_type_byte() in _ARRAY_TYPE_BYTES, rule, f"{what} must be a msgpack array")
        return self._decode(self._unpacker.read_array_header)

    def value(self) -> Any:
        """The next whole object."""
        return self._decode(self._unpacker.unpack)

    def at_end(self) -> bool:
        return self._unpacker.tell() == len(self._header)

    @staticmethod
    def _decode(step: Any) -> Any:
        try:
            return step()
        except msgpack.OutOfData:
            raise FormatError("R6", "the header ends inside a msgpack object") from None
        except (ValueError, TypeError, RecursionError) as exc:
            # msgpack's own errors (limits, stack depth, bad type bytes) subclass ValueError
            detail = str(exc) or type(exc).__name__
            raise FormatError("R6", f"header is not valid msgpack within limits: {detail[:200]}") from None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _expect(cond: bool, rule: str, message: str) -> None:
    if not cond:
        raise FormatError(rule, message)


def _utf8_length(text: str) -> int | None:
    """Bytes of ``text`` in UTF-8, or None when it came from invalid UTF-8 (lone surrogates)."""
    if text.isascii():
        return len(text)
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return None


def name_problem(name: str, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """What makes ``name`` unusable as a tensor name (R9), or None when it is fine."""
    size = _utf8_length(name)
    if size is None:
        return f"name {name!r} is not valid UTF-8"
    if not 0 < size <= limits.max_name_bytes:
        return f"name {_short(name)} is {size} bytes; names are 1 to {limits.max_name_bytes} bytes of UTF-8"
    return None


def metadata_problem(key: str, value: str, limits: Limits = DEFAULT_LIMITS) -> str | None:
    """What makes one metadata entry unstorable (R7), or None when it is fine."""
    key_bytes, value_bytes = _utf8_length(key), _utf8_length(value)
    if key_bytes is None or value_bytes is None:
        return f"metadata entry {_short(key)} is not valid UTF-8"
    if key_bytes > limits.max_metadata_key_bytes or value_bytes > limits.max_metadata_value_bytes:
        return (f"metadata entry {_short(key)} is longer than the limits "
                f"({limits.max_metadata_key_bytes}-byte keys, {limits.max_metadata_value_bytes}-byte values)")
    return None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def parse_header(header: bytes, expected_crc: int, limits: Limits = DEFAULT_LIMITS, *,
                 version: int, header_raw_length: int = 0) -> tuple[list[TensorEntry], dict[str, str]]:
    """Validate header bytes (R5-R16, R22, R24 and R25, all but R16's file-size check) and build the entries.

    Args:
        header: the H stored header bytes.
        expected_crc: the header checksum stored in the preamble.
        limits: reader limits.
        version: the file's version (from the preamble); rANS payloads need version 2,
            compact entries are version 3's.
        header_raw_length: version 3's U from the preamble, already bounded by R3: the
            stored header is a zstd frame of U bytes (0: stored as it is).

    Returns:
        The tensor entries in file order and the metadata map.

    Raises:
        FormatError: the first rule the header breaks (``exc.rule`` names it).
    """
    if crc32(header) != expected_crc:
        raise ChecksumError("R5", "header checksum mismatch: the header is corrupted")
    if header_raw_length:
        header = decompress_header(header, header_raw_length)
    reader = _HeaderReader(header, limits)
    count = reader.map_header("R6", "the header")
    _expect(count == 2, "R6", f"the header map has {count} keys; it must have exactly 'tensors' and 'metadata'")
    entries: list[TensorEntry] | None = None
    metadata: dict[str, str] | None = None
    for _ in range(count):
        key = reader.value()
        if key == "tensors" and entries is None:
            entries = _read_tensors(reader, limits, version)
        elif key == "metadata" and metadata is None:
            metadata = _read_metadata(reader, limits)
        else:
            raise FormatError("R6", f"unexpected or repeated header key {_short(key)}; the keys are 'tensors' and 'metadata'")
    _expect(reader.at_end(), "R6", "bytes follow the header map inside the header")
    assert entries is not None and metadata is not None
    _expect(version != RANS_VERSION or version_for(entries) == version, "R15",
            f"a version-{version} file needs at least one rANS payload (write the lowest version)")
    check_sources(entries)
    expected = layout_offsets([e.length for e in entries], version)
    if version >= COMPACT_VERSION:  # offsets are not stored: they are what 1.3 says
        for entry, offset in zip(entries, expected):
            entry.offset = offset
    for entry, offset in zip(entries, expected):
        _expect(entry.offset == offset, "R16",
                f"tensor {entry.name!r}: payload offset {entry.offset}, expected {offset} (payloads must tile the data section in order, as spec 1.3 places them)")
    return entries, metadata


def _read_metadata(reader: _HeaderReader, limits: Limits) -> dict[str, str]:
    count = reader.map_header("R7", "'metadata'")
    _expect(count <= limits.max_metadata_entries, "R7",
            f"metadata has {count} entries, more than {limits.max_metadata_entries}")
    metadata: dict[str, str] = {}
    for _ in range(count):
        key, value = reader.value(), reader.value()
        _expect(isinstance(key, str) and isinstance(value, str), "R7",
                f"metadata keys and values must be strings, found {type(key).__name__} -> {type(value).__name__}")
        _expect(key not in metadata, "R6", f"metadata repeats the key {_short(key)}")
        problem = metadata_problem(key, value, limits)
        _expect(problem is None, "R7", problem or "")
        metadata[key] = value
    return metadata


def _read_tensors(reader: _HeaderReader, limits: Limits, version: int) -> list[TensorEntry]:
    count = reader.array_header("R8", "'tensors'")
    _expect(count <= limits.max_tensors, "R8", f"'tensors' has {count} entries, more than {limits.max_tensors}")
    entries: list[TensorEntry] = []
    seen: set[str] = set()
    for position in range(count):
        entry = _parse_entry(position, reader.value(), limits, version)
        _expect(entry.name not in seen, "R9", f"tensor name {entry.name!r} appears twice")
        seen.add(entry.name)
        entries.append(entry)
    return entries


def _expand_compact(where: str, raw: Any) -> dict[str, Any]:
    """A version-3 entry (spec 2.4) with its omitted keys filled in (R8)."""
    _expect(isinstance(raw, dict) and COMPACT_REQUIRED <= set(raw) and set(raw) <= set(COMPACT_KEYS), "R8",
            f"{where}: entry must be a map with the keys {sorted(COMPACT_REQUIRED)} and only "
            f"these others: {sorted(set(COMPACT_KEYS) - COMPACT_REQUIRED)}")
    full = dict(COMPACT_DEFAULTS)
    full.update(raw)
    if "width" not in raw:
        full["width"] = full["bits"]
    for key, value in raw.items():
        default = full["bits"] if key == "width" else COMPACT_DEFAULTS.get(key, _REQUIRED)
        _expect(value is not default and (type(value) is not type(default) or value != default), "R8",
                f"{where}: key {key!r} holds its default value and must be left out (spec 2.4)")
    full["offset"] = 0  # derived from the lengths (1.3) once all entries are read
    full["raw_length"] = _DERIVED  # derived (2.2) below
    return full


def _parse_entry(position: int, raw: Any, limits: Limits, version: int) -> TensorEntry:
    where = f"tensor #{position}"
    if version >= COMPACT_VERSION:
        raw = _expand_compact(where, raw)
    else:
        _expect(isinstance(raw, dict) and set(raw) == TENSOR_KEYS, "R8",
                f"{where}: entry must be a map with exactly the keys {sorted(TENSOR_KEYS)}")
    name = raw["name"]
    _expect(isinstance(name, str), "R9", f"{where}: name must be a string")
    problem = name_problem(name, limits)
    _expect(problem is None, "R9", f"{where}: {problem}")
    where = f"tensor {name!r}"
    for key in ("bits", "width", "group_size", "offset", "length", "raw_length", "crc32"):
        _expect(raw[key] is _DERIVED or _is_int(raw[key]) and raw[key] >= 0, "R8",
                f"{where}: {key} must be a non-negative integer")
    for key in ("dtype", "encoding", "granularity", "compression"):
        _expect(isinstance(raw[key], str), "R8", f"{where}: {key} must be a string")
    param_dtype = raw.get("param_dtype", "float32")
    _expect(isinstance(param_dtype, str) and param_dtype in PARAM_DTYPES, "R13",
            f"{where}: unknown param_dtype {str(param_dtype)[:40]!r}; float32, float16 or uint8")
    _expect(raw["crc32"] < 1 << 32, "R8", f"{where}: crc32 out of range")
    dtype = raw["dtype"]
    _expect(dtype in DTYPES, "R10", f"{where}: unknown dtype {dtype[:40]!r}")
    shape = raw["shape"]
    _expect(isinstance(shape, list) and len(shape) <= limits.max_ndim, "R11",
            f"{where}: shape must be an array of at most {limits.max_ndim} dimensions")
    numel = 1
    for dim in shape:
        _expect(_is_int(dim) and 0 <= dim <= limits.max_elements, "R11",
                f"{where}: dimension {_short(dim)} is not an integer in 0..{limits.max_elements}")
        numel *= dim  # Python ints do not wrap; the bound below keeps them small
        _expect(numel <= limits.max_elements, "R11", f"{where}: {numel} elements is more than {limits.max_elements}")
    encoding, bits, granularity = raw["encoding"], raw["bits"], raw["granularity"]
    width, group_size = raw["width"], raw["group_size"]
    _expect(encoding in ENCODINGS, "R12", f"{where}: unknown encoding {encoding[:40]!r} (a newer qpack may read it)")
    _expect(ENCODING_VERSION[encoding] <= version, "R12",
            f"{where}: encoding {encoding!r} needs file version {ENCODING_VERSION[encoding]}, this is {version}")
    _expect(granularity in GRANULARITIES, "R12", f"{where}: unknown granularity {granularity[:40]!r}")
    if encoding == "raw":
        _expect(bits == 0 and width == 0 and granularity == "tensor" and group_size == 0, "R12",
                f"{where}: raw tensors have bits 0, width 0, granularity 'tensor' and group_size 0")
    elif encoding == "derived":
        _check_derived(where, raw, param_dtype, limits)
    else:
        _expect(1 <= bits <= 16, "R12", f"{where}: bits {bits} outside 1..16")
        _expect(bits <= width <= 16, "R12", f"{where}: width {width} outside {bits}..16 (bits..16)")
        _expect(is_float_name(dtype), "R12", f"{where}: {encoding} needs a floating dtype, not {dtype}")
        _expect(numel >= 1, "R12", f"{where}: a quantized tensor needs at least one element")
        if granularity == "channel":
            _expect(len(shape) >= 1, "R12", f"{where}: per-channel needs at least one dimension")
        if granularity == "group":
            _expect(MIN_GROUP <= group_size <= MAX_GROUP, "R12",
                    f"{where}: group_size {group_size} outside {MIN_GROUP}..{MAX_GROUP}")
        else:
            _expect(group_size == 0, "R12", f"{where}: group_size must be 0 unless granularity is 'group'")
    channels = parameter_rows(shape, granularity, group_size) if encoding != "raw" else 1
    _expect(param_dtype == "float32" or encoding != "raw", "R13", f"{where}: raw tensors have no parameters to type")
    if encoding == "derived":  # checked by R24 above
        params = dict(raw["params"])
    else:
        params = _parse_params(where, encoding, bits, channels, raw["params"], param_dtype)
    raw_length = expected_raw_length(dtype, tuple(shape), encoding, width)
    if raw["raw_length"] is _DERIVED:  # version 3 derives it
        raw["raw_length"] = raw_length
    _expect(raw["raw_length"] == raw_length, "R14",
            f"{where}: raw_length {raw['raw_length']}, but {dtype} {shape} as {encoding} needs {raw_length} bytes")
    compression, length = raw["compression"], raw["length"]
    _expect(compression in COMPRESSIONS and COMPRESSION_VERSION[compression] <= version, "R15",
            f"{where}: unknown compression {compression[:40]!r} for a version-{version} file")
    if compression == "none":
        _expect(length == raw_length, "R15", f"{where}: uncompressed payload is {length} bytes, expected {raw_length}")
    elif compression == "rans":
        _expect(version >= RANS_VERSION, "R15", f"{where}: rANS payloads need file version {RANS_VERSION}, this is {version}")
        _expect(encoding != "raw" and width == bits, "R15", f"{where}: rANS codes quantized indices with width = bits")
        _expect(0 < length < raw_length, "R15", f"{where}: rANS payload of {length} bytes for {raw_length} packed bytes")
        # R19 allows at most RANS_MAX_STEPS steps, so N >= numel / RANS_MAX_STEPS lanes, and
        # the payload holds 4 bytes per lane: this bounds the expansion before any byte is read
        lanes = (length - _RANS_FIXED_BYTES) // 4
        _expect(numel <= RANS_MAX_STEPS * lanes, "R15",
                f"{where}: a {length}-byte rANS payload holds at most {max(lanes, 0)} lanes of "
                f"{RANS_MAX_STEPS} steps, not {numel} indices")
    else:
        if compression == "zstd_planes":
            _expect(encoding == "raw" and DTYPES[dtype][1] >= 2, "R15",
                    f"{where}: byte planes are for raw tensors of 2 bytes or more per element")
        _expect(0 < length < raw_length, "R15", f"{where}: zstd payload of {length} bytes for {raw_length} raw bytes")
        _expect(raw_length <= length * MAX_ZSTD_EXPANSION, "R15",
                f"{where}: {raw_length} raw bytes cannot come out of a {length}-byte zstd frame "
                f"(at most {MAX_ZSTD_EXPANSION}x)")
    stats = raw["stats"]
    _expect(isinstance(stats, dict) and len(stats) <= limits.max_stats_entries, "R21", f"{where}: stats must be a small map")
    for key, value in stats.items():
        key_bytes = _utf8_length(key) if isinstance(key, str) else None
        _expect(key_bytes is not None and key_bytes <= 64 and isinstance(value, (int, float))
                and not isinstance(value, bool), "R21",
                f"{where}: stats entries must map strings of at most 64 bytes to numbers")
    return TensorEntry(name, dtype, tuple(shape), encoding, bits, granularity, params,
                       raw["offset"], length, raw_length, compression, raw["crc32"], stats,
                       width=width, group_size=group_size, param_dtype=param_dtype)


def _check_derived(where: str, raw: dict[str, Any], param_dtype: str, limits: Limits) -> None:
    """R24, within the entry: a derived entry (spec 3.5) has no bits, no parameters to type,
    params naming a source tensor and a known rule, and an empty uncompressed payload."""
    _expect(raw["bits"] == 0 and raw["width"] == 0 and raw["granularity"] == "tensor" and raw["group_size"] == 0,
            "R24", f"{where}: derived tensors have bits 0, width 0, granularity 'tensor' and group_size 0")
    _expect(param_dtype == "float32", "R24", f"{where}: derived tensors have no parameters to type")
    params = raw["params"]
    _expect(isinstance(params, dict) and set(params) == PARAM_KEYS["derived"], "R24",
            f"{where}: params of a derived tensor must have exactly the keys 'rule' and 'source'")
    source, rule = params["source"], params["rule"]
    _expect(isinstance(source, str) and name_problem(source, limits) is None, "R24",
            f"{where}: params.source must be a tensor name (1 to {limits.max_name_bytes} bytes of UTF-8)")
    _expect(isinstance(rule, str) and rule in DERIVED_RULES, "R24",
            f"{where}: unknown derivation rule {_short(rule)}; this reader knows {', '.join(DERIVED_RULES)}")
    _expect(raw["compression"] == "none" and raw["length"] == 0, "R24",
            f"{where}: a derived tensor has no payload (compression 'none', length 0)")


def check_sources(entries: list[TensorEntry]) -> None:
    """R25, across the file: each derived entry's source is another entry of the file, not
    derived itself (no chains, no cycles), of the same shape (spec 3.5)."""
    by_name = {e.name: e for e in entries}
    for entry in entries:
        if entry.encoding != "derived":
            continue
        where, name = f"tensor {entry.name!r}", entry.params["source"]
        source = by_name.get(name)
        _expect(source is not None, "R25", f"{where}: derived from {_short(name)}, which the file does not hold")
        _expect(source.encoding != "derived", "R25",
                f"{where}: derived from {name!r}, which is derived itself (sources are stored tensors)")
        _expect(source.shape == entry.shape, "R25",
                f"{where}: shape {list(entry.shape)}, but its source {name!r} has shape {list(source.shape)}")


def _float_array(where: str, key: str, value: Any, count: int, param_dtype: str) -> np.ndarray:
    """A parameter array as float32 (float16 converted exactly, spec 3), checked (R13)."""
    code = PARAM_DTYPES[param_dtype]
    size = int(code[-1])
    _expect(isinstance(value, bytes) and len(value) == size * count, "R13",
            f"{where}: params.{key} must be {size * count} bytes of {param_dtype}")
    values = np.frombuffer(value, dtype=code).astype(np.float32)
    _expect(bool(np.isfinite(values).all()), "R13", f"{where}: params.{key} holds a non-finite value")
    return values


def _parse_uint8_params(where: str, encoding: str, channels: int, params: Any) -> dict[str, Any]:
    """R13 for two-level parameters: uniform only, codes of C bytes, a finite base whose
    steps are >= 0, and decoded rows with min <= max and a finite span."""
    _expect(encoding == "uniform", "R13", f"{where}: uint8 parameters are for uniform grids only")
    _expect(isinstance(params, dict) and set(params) == UINT8_PARAM_KEYS, "R13",
            f"{where}: uint8 params must have exactly the keys {sorted(UINT8_PARAM_KEYS)}")
    for key in ("min", "max"):
        _expect(isinstance(params[key], bytes) and len(params[key]) == channels, "R13",
                f"{where}: params.{key} must be {channels} bytes of uint8 codes")
    base = _float_array(where, "base", params["base"], 4, "float32")
    _expect(base[1] >= 0 and base[3] >= 0, "R13", f"{where}: params.base steps must be >= 0")
    lo, hi = from_uint8(np.frombuffer(params["min"], np.uint8), np.frombuffer(params["max"], np.uint8), base)
    _expect(bool(np.isfinite(lo).all() and np.isfinite(hi).all()), "R13", f"{where}: a decoded min or max overflows float32")
    _expect(bool((lo <= hi).all()), "R13", f"{where}: a decoded min is above its max")
    with np.errstate(over="ignore"):
        _expect(bool(np.isfinite(hi - lo).all()), "R13", f"{where}: max - min overflows float32")
    return dict(params)


def _parse_params(where: str, encoding: str, bits: int, channels: int, params: Any,
                  param_dtype: str = "float32") -> dict[str, Any]:
    if param_dtype == "uint8":
        return _parse_uint8_params(where, encoding, channels, params)
    _expect(isinstance(params, dict) and set(params) == PARAM_KEYS[encoding], "R13",
            f"{where}: params for {encoding} must have exactly the keys {sorted(PARAM_KEYS[encoding])}")
    if encoding == "uniform":
        lows = _float_array(where, "min", params["min"], channels, param_dtype)
        highs = _float_array(where, "max", params["max"], channels, param_dtype)
        _expect(bool((lows <= highs).all()), "R13", f"{where}: a min is above its max")
        with np.errstate(over="ignore"):
            spans = highs - lows
        _expect(bool(np.isfinite(spans).all()), "R13", f"{where}: max - min overflows float32")
    elif encoding == "kmeans":
        size = params["codebook_size"]
        _expect(_is_int(size) and 1 <= size <= 1 << bits, "R13",
                f"{where}: codebook_size {size!r} outside 1..{1 << bits} (2^bits)")
        _float_array(where, "codebook", params["codebook"], channels * size, param_dtype)
    return dict(params)


# -- R23: the memory a file may ask for ----------------------------------------------------------


def decoded_bytes(entry: TensorEntry) -> int:
    """Bytes of the tensor ``entry`` decodes to: numel x bytes(dtype) (spec R23)."""
    return entry.numel * DTYPES[entry.dtype][1]


def default_max_bytes(file_size: int) -> int:
    """The decoded bytes a reader accepts by default for a file of ``file_size`` bytes (R23)."""
    return max(DECODED_FLOOR_BYTES, DECODED_BYTES_PER_FILE_BYTE * file_size)


def decoded_size_problem(entries: list[TensorEntry], file_size: int, max_bytes: int | None) -> str | None:
    """Why a file's tensors decode to more than ``max_bytes`` in all (R23), or None.

    ``max_bytes`` None means no bound (the caller's consent).
    """
    if max_bytes is None or not entries:
        return None
    sizes = [decoded_bytes(e) for e in entries]
    total = sum(sizes)
    if total <= max_bytes:
        return None
    largest = max(range(len(entries)), key=sizes.__getitem__)
    entry = entries[largest]
    return (f"tensor {entry.name!r} ({entry.dtype} {list(entry.shape)}) decodes to {sizes[largest]:,} bytes "
            f"and the file's {len(entries)} tensor(s) to {total:,}, more than the {max_bytes:,} bytes "
            f"allowed for this {file_size:,}-byte file (by default {DECODED_BYTES_PER_FILE_BYTE}x its size, "
            f"at least {DECODED_FLOOR_BYTES >> 20} MiB); allow more with max_bytes= (--max-bytes N or unlimited)")
