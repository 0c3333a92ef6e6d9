"""Reading .qpk files: validate the whole layout first, then decode tensors one at a time."""

from __future__ import annotations

import os
import stat
import threading
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import zstandard

from . import codecs, rans
from .bitpack import pack_bits, unpack_bits
from .dtypes import dtype_from_name, itemsize
from .errors import ChecksumError, FormatError, InputError, OutOfMemoryError, QpkError
from .format import (
    DEFAULT_LIMITS,
    PREAMBLE_SIZE,
    Limits,
    TensorEntry,
    crc32,
    data_start,
    decoded_bytes,
    decoded_size_problem,
    default_max_bytes,
    header_crc,
    parse_header,
    param_values,
    parse_preamble,
    preamble_field,
    preamble_version,
)

__all__ = ["QpkReader", "decode_payload", "decode_stored", "decode_indices", "check_indices", "dequantize_indices",
           "params_on", "MaxBytes"]

#: a reader's bound on decoded bytes (spec R23): "auto" for the spec's default (256x the file
#: size, at least 16 MiB), a number of bytes, or None for no bound
MaxBytes = int | str | None

_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    # zstd contexts are not thread-safe; one per thread
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


class Inflated(NamedTuple):
    """A tensor's payload read, checked and decompressed (:meth:`QpkReader.inflate`)."""

    entry: TensorEntry
    #: the decompressed payload (uint8), or with ``unpacked`` the checked indices
    data: torch.Tensor
    unpacked: bool


class QpkReader:
    """A .qpk file opened for reading.

    Opening checks every reader rule that the header and layout can break (R1-R17) before any
    payload is read; each tensor is read, checksummed (R18), decompressed (R19) and decoded
    (R20) only when asked for. Safe to use from several threads at once.

    Args:
        path: the .qpk file.
        limits: reader limits; the defaults suit any real model.
        max_bytes: the most bytes the file's tensors may decode to in all (spec R23):
            "auto" (the default) for 256 times the file's size, at least 16 MiB; a number
            of bytes; or None for no bound. It is checked when the file is opened.

    Raises:
        InputError: the path is missing, a folder or unreadable.
        FormatError: the file breaks a rule of the format (subclasses name which kind).
        OutOfMemoryError: the tensors decode to more than ``max_bytes`` (R23).
    """

    def __init__(self, path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS,
                 max_bytes: MaxBytes = "auto") -> None:
        self.path = Path(path)
        self._fd = _open_for_reading(self.path)
        try:
            self._file_size = os.fstat(self._fd).st_size
            preamble = os.pread(self._fd, PREAMBLE_SIZE, 0)
            header_length = parse_preamble(preamble, self._file_size, limits)
            header = os.pread(self._fd, header_length, PREAMBLE_SIZE)
            if len(header) != header_length:
                raise FormatError("R4", "file shrank while being read")
            self.version = preamble_version(preamble)
            raw_length = preamble_field(preamble) if self.version >= 3 else 0
            entries, self.metadata = parse_header(header, header_crc(preamble), limits, version=self.version,
                                                  header_raw_length=raw_length)
            self.data_start = data_start(PREAMBLE_SIZE + header_length, [e.length for e in entries], self.version)
            self._check_layout(entries, PREAMBLE_SIZE + header_length)
            bound = _bound(max_bytes, self._file_size)
            problem = decoded_size_problem(entries, self._file_size, bound)
            if problem is not None:
                raise OutOfMemoryError(problem, "R23")
        except BaseException:
            self.close()
            raise
        self.entries: dict[str, TensorEntry] = {e.name: e for e in entries}

    def _check_layout(self, entries: list[TensorEntry], header_end: int) -> None:
        data_end = entries[-1].offset + entries[-1].length if entries else 0
        expected_size = self.data_start + data_end
        if self._file_size != expected_size:
            what = "truncated" if self._file_size < expected_size else "has trailing bytes"
            raise FormatError("R16", f"file is {self._file_size} bytes but its header describes {expected_size}: it {what}")
        gaps = [(header_end, self.data_start)]
        end = 0
        for entry in entries:
            gaps.append((self.data_start + end, self.data_start + entry.offset))
            end = entry.offset + entry.length
        for start, stop in gaps:
            if stop > start and any(os.pread(self._fd, stop - start, start)):
                raise FormatError("R17", f"non-zero padding at bytes {start}..{stop}")

    # -- mapping-like access -------------------------------------------------------------
    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __contains__(self, name: object) -> bool:
        return name in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def entry(self, name: str) -> TensorEntry:
        """The header record of one tensor."""
        try:
            return self.entries[name]
        except KeyError:
            raise KeyError(f"no tensor named {name!r} in {self.path}") from None

    # -- payloads --------------------------------------------------------------------------
    def read_payload(self, name: str) -> torch.Tensor:
        """The decompressed payload of one tensor as a writable 1-D uint8 CPU tensor."""
        return self._read_payload(name)

    def _read_payload(self, name: str, writable: bool = True) -> torch.Tensor:
        """:meth:`read_payload`; ``writable=False``: the caller only reads the payload, so a
        zstd payload is not copied out of the decompressor's bytes."""
        entry = self.entry(name)
        position = self.data_start + entry.offset
        if entry.compression == "none":
            out = torch.empty(entry.length, dtype=torch.uint8)
            if entry.length:
                view = memoryview(out.numpy())
                if os.preadv(self._fd, [view], position) != entry.length:
                    raise FormatError("R16", f"tensor {name!r}: file shrank while being read")
                _check_crc(entry, view)
            elif entry.crc32 != 0:
                raise ChecksumError("R18", f"tensor {name!r}: checksum mismatch on its empty payload")
            return out
        stored = self._read_stored(entry)
        if entry.compression == "rans":
            return _pack_indices(entry, _rans_indices(entry, stored, None))
        return _decompressed(entry, stored, writable)

    def _read_stored(self, entry: TensorEntry) -> bytes:
        """A compressed payload's stored bytes, checksummed (R18)."""
        stored = os.pread(self._fd, entry.length, self.data_start + entry.offset)
        if len(stored) != entry.length:
            raise FormatError("R16", f"tensor {entry.name!r}: file shrank while being read")
        _check_crc(entry, stored)
        return stored

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Decode one tensor (original dtype and shape) on ``device``.

        Only stored bytes cross to an accelerator: a rANS payload too is decoded there. A
        derived tensor (spec 3.5) decodes its source and rebuilds itself from it.

        Raises:
            FormatError: the payload breaks R18-R20.
            OutOfMemoryError: an allocation failed; the message names the tensor and the bytes.
        """
        device = torch.device(device)
        entry = self.entry(name)
        if entry.encoding == "derived":  # no payload (its checksum still checked, R18): the source decoded
            self._read_payload(name)
            source = self.tensor(entry.params["source"], device)
            with _allocation_failures_named(entry):
                return codecs.derived.decode(source, dtype_from_name(entry.dtype), entry.params["rule"])
        return self.finish(self.inflate(name, device), device)

    def inflate(self, name: str, device: str | torch.device = "cpu") -> Inflated:
        """The first half of :meth:`tensor`: read, checksum (R18) and decompress (R19) one
        tensor's payload, and decode its rANS indices; :meth:`finish` builds the tensor.

        The halves let a load decompress on helper threads while the calling thread
        dequantizes into output it allocates itself (see ``qpack.load``). Derived tensors are
        not inflated: use :meth:`tensor`.
        """
        device = torch.device(device)
        entry = self.entry(name)
        if entry.encoding == "derived":
            raise InputError(f"tensor {name!r} is derived from {entry.params['source']!r}: decode it with tensor()")
        with _allocation_failures_named(entry):
            if entry.compression == "rans":
                # the decoded indices go straight to dequantization: packing them only to unpack
                # them again took more time than the decoding
                indices = _rans_indices(entry, self._read_stored(entry), None if device.type == "cpu" else device)
                check_indices(entry, indices)
                return Inflated(entry, indices, unpacked=True)
            # only raw tensors can be views of their payload; the other decoders build new tensors
            return Inflated(entry, self._read_payload(name, writable=entry.encoding == "raw"), unpacked=False)

    def finish(self, inflated: Inflated, device: str | torch.device = "cpu") -> torch.Tensor:
        """The second half of :meth:`tensor`: unpack (R20) and dequantize an inflated payload."""
        device = torch.device(device)
        entry = inflated.entry
        with _allocation_failures_named(entry):
            if inflated.unpacked:
                return dequantize_indices(entry, inflated.data, device)
            return decode_payload(entry, inflated.data, device)

    def check(self, name: str) -> None:
        """Check one tensor's payload as decoding it would (R18-R20), without keeping it.

        Tensors that decode to more than 64 MiB are checked in pieces of about 12 MiB
        (zstd output, packed indices or raw bytes), so memory stays near the zstd frame's
        window (2 MiB as qpack writes them; at most the payload's raw_length) whatever the
        tensor's size; smaller ones, and rANS payloads, are decoded whole.

        Raises:
            FormatError: the payload breaks R18-R20.
            OutOfMemoryError: an allocation failed.
        """
        entry = self.entry(name)
        if entry.encoding == "derived":  # nothing to decode: its source is checked as itself
            self._read_payload(name)
            return
        if entry.compression == "rans" or decoded_bytes(entry) <= _CHECK_WHOLE_BYTES:
            self.tensor(name)
            return
        with _allocation_failures_named(entry):
            _check_streamed(entry, self._fd, self.data_start + entry.offset)

    def close(self) -> None:
        """Close the file. Further reads fail."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> QpkReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)


def _bound(max_bytes: MaxBytes, file_size: int) -> int | None:
    if max_bytes == "auto":
        return default_max_bytes(file_size)
    if max_bytes is None:
        return None
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 0:
        raise InputError(f"max_bytes must be 'auto', None or a number of bytes >= 0, not {max_bytes!r}")
    return max_bytes


def _is_allocation_failure(exc: BaseException) -> bool:
    """MemoryError, or torch's RuntimeError for a failed allocation (CPU or CUDA)."""
    if isinstance(exc, MemoryError):
        return True
    text = str(exc).lower()
    return isinstance(exc, RuntimeError) and any(
        words in text for words in ("can't allocate memory", "out of memory", "not enough memory",
                                    "failed to allocate"))


class _allocation_failures_named:
    """Turns a failed allocation while ``entry`` is decoded into OutOfMemoryError."""

    def __init__(self, entry: TensorEntry) -> None:
        self.entry = entry

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, QpkError) or not _is_allocation_failure(exc):
            return False
        entry = self.entry
        raise OutOfMemoryError(
            f"tensor {entry.name!r} ({entry.dtype} {list(entry.shape)}) decodes to {decoded_bytes(entry):,} "
            f"bytes from {entry.raw_length:,} payload bytes, and allocating them failed") from None


def _open_for_reading(path: Path) -> int:
    """Open a regular file for reading; anything else (folder, FIFO, device) is an InputError."""
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a .qpk file")
    try:
        # O_NONBLOCK: opening a FIFO must not wait for a writer; it is refused just below
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise InputError(f"{path}: no such file") from None
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot open: {exc.strerror}") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise InputError(f"{path} is not a regular file")
    return fd


def _check_crc(entry: TensorEntry, data: bytes | memoryview) -> None:
    if crc32(data) != entry.crc32:
        raise ChecksumError("R18", f"tensor {entry.name!r}: payload checksum mismatch (the file is corrupted)")


def _check_declared_size(entry: TensorEntry, frame_start: bytes) -> None:
    """R19: the payload starts a zstd frame (not a skippable one) declaring raw_length bytes."""
    try:
        declared = zstandard.frame_content_size(frame_start)
    except zstandard.ZstdError as exc:
        raise FormatError("R19", f"tensor {entry.name!r}: not a zstd frame: {exc}") from None
    if declared != entry.raw_length:
        raise FormatError("R19", f"tensor {entry.name!r}: zstd frame declares {declared} bytes, header says {entry.raw_length}")


def _zstd_decompress(entry: TensorEntry, stored: bytes, writable: bool = True) -> torch.Tensor:
    _check_declared_size(entry, stored)
    try:
        # the output buffer is the declared size, which R19 just pinned to raw_length (itself
        # at most MAX_ZSTD_EXPANSION times the payload, R15); data after the frame is an error
        raw = _decompressor().decompress(stored, max_output_size=entry.raw_length, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError("R19", f"tensor {entry.name!r}: zstd payload is corrupted: {exc}") from None
    if len(raw) != entry.raw_length:
        raise FormatError("R19", f"tensor {entry.name!r}: decompressed to {len(raw)} bytes, expected {entry.raw_length}")
    if not raw:
        return torch.empty(0, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only bytes: a copy when the caller may write
        # the copy (and its fresh pages) cost 40 % of an 8-bit load's decompression
        return torch.frombuffer(bytearray(raw) if writable else raw, dtype=torch.uint8)


def _rans_indices(entry: TensorEntry, stored: bytes, device: torch.device | None) -> torch.Tensor:
    """The indices a rANS payload codes, as a 1-D tensor (uint8, int16 up to 15 bits, else
    int32, as :func:`unpack_bits` gives them). With ``device``, they are decoded there by the
    torch decoder: only stored bytes cross the bus."""
    try:
        if device is not None:
            indices = rans.decode_torch(stored, entry.numel, entry.bits, device)
            return indices.to(torch.int16) if indices.dtype == torch.int32 and entry.bits < 16 else indices
        decoded = rans.decode(stored, entry.numel, entry.bits)
    except rans.RansError as exc:
        raise FormatError("R19", f"tensor {entry.name!r}: rANS payload is corrupted: {exc}") from None
    if decoded.dtype == np.uint8:
        return torch.from_numpy(decoded)
    # 9..15-bit values fit int16 as they are; 16-bit ones need int32
    return torch.from_numpy(decoded.view(np.int16)) if entry.bits < 16 else torch.from_numpy(decoded.astype(np.int32))


def decode_stored(entry: TensorEntry, stored: bytes | memoryview) -> torch.Tensor:
    """The tensor an entry's stored payload (as the writer stores it: compressed, rANS-coded
    or not) decodes to, on the CPU, without a file: what a reader will return for it. The
    writer checks masks against it (codecs.derived)."""
    if entry.encoding == "derived":
        raise ValueError("a derived entry decodes from its source, not from a payload")
    stored = bytes(stored)
    if entry.compression == "rans":
        indices = _rans_indices(entry, stored, None)
        check_indices(entry, indices)
        return dequantize_indices(entry, indices)
    if entry.compression == "none":
        payload = torch.frombuffer(bytearray(stored), dtype=torch.uint8) if stored else torch.empty(0, dtype=torch.uint8)
        return decode_payload(entry, payload)
    return decode_payload(entry, _decompressed(entry, stored))


def _decompressed(entry: TensorEntry, stored: bytes, writable: bool = True) -> torch.Tensor:
    """A zstd or zstd_planes payload's decompressed bytes (section 2.2), as a 1-D uint8 tensor."""
    raw = _zstd_decompress(entry, stored, writable)
    if entry.compression == "zstd_planes":
        return codecs.raw.join_planes(raw, itemsize(entry.dtype))
    return raw


def _pack_indices(entry: TensorEntry, indices: torch.Tensor) -> torch.Tensor:
    """The packed form (section 4) of decoded rANS indices: what :meth:`QpkReader.read_payload`
    returns for them, checked by R20 like any packed payload."""
    return pack_bits(indices, entry.width)


def params_on(entry: TensorEntry, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A quantized tensor's parameters as float32 tensors on ``device``: ``min`` and ``max``
    (C values each) or ``codebook`` (C x K). float16 and uint8 parameters become float32
    exactly before any arithmetic (spec 3)."""
    if entry.encoding == "uniform":
        lo = torch.from_numpy(param_values(entry, "min"))
        hi = torch.from_numpy(param_values(entry, "max"))
        return {"min": lo.to(device), "max": hi.to(device)}
    book = param_values(entry, "codebook")
    return {"codebook": torch.from_numpy(book).reshape(entry.channels, -1).to(device)}


def decode_payload(entry: TensorEntry, payload: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Turn a tensor's decompressed payload into the tensor, decoding on ``device``.

    Only the payload (packed indices) and the parameters cross to the device; unpacking and
    dequantization run there.

    Raises:
        FormatError: the payload breaks R20 (stray bits, indices past the codebook, bool bytes).
    """
    dtype = dtype_from_name(entry.dtype)
    if entry.encoding == "raw":
        tensor = codecs.raw.decode(payload, dtype, entry.shape)
        if dtype == torch.bool and payload.numel() and int(payload.max()) > 1:
            raise FormatError("R20", f"tensor {entry.name!r}: bool bytes must be 0 or 1")
        return tensor.to(device)
    return dequantize_indices(entry, decode_indices(entry, payload, device), device)


def decode_indices(entry: TensorEntry, payload: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """The flat indices of a quantized tensor's payload, unpacked on ``device`` and checked (R20).

    Returns the narrowest integer type that holds them (see ``unpack_bits``).
    """
    used_bits = entry.numel * entry.width % 8
    if used_bits and int(payload[-1]) >> used_bits:
        raise FormatError("R20", f"tensor {entry.name!r}: unused bits of the last payload byte are not zero")
    indices = unpack_bits(payload.to(device, non_blocking=True), entry.width, entry.numel)
    check_indices(entry, indices)
    return indices


def check_indices(entry: TensorEntry, indices: torch.Tensor) -> None:
    """R20: every index below the codebook's size or 2^bits.

    Raises:
        FormatError: an index past the codebook or the grid.
    """
    limit = entry.params["codebook_size"] if entry.encoding == "kmeans" else 1 << entry.bits
    if limit < 1 << entry.width and int(indices.max()) >= limit:
        what = f"the {limit}-entry codebook" if entry.encoding == "kmeans" else f"{entry.bits} bits"
        raise FormatError("R20", f"tensor {entry.name!r}: an index does not fit {what}")


def dequantize_indices(entry: TensorEntry, indices: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """Turn a quantized tensor's checked indices (1-D, on ``device``) into the tensor: the part
    of :func:`decode_payload` after unpacking."""
    codec = codecs.QUANTIZERS[entry.encoding]
    row_length = entry.group_size or None
    return codec.dequantize(indices, params_on(entry, device), entry.bits, entry.shape,
                            dtype_from_name(entry.dtype), row_length)


# -- checking a large payload in pieces (QpkReader.check) -----------------------------------------

#: tensors decoding to at most this are checked by decoding them whole
_CHECK_WHOLE_BYTES = 64 << 20
#: bytes of payload checked at a time; a multiple of every width (1..16) in bytes
_PIECE_BYTES = 16 * 720720
#: compressed bytes fed to zstd at a time: at most 32,768x as many come out (R15)
_ZSTD_FEED_BYTES = 512


def _check_streamed(entry: TensorEntry, fd: int, position: int) -> None:
    """R18-R20 on a "none" or "zstd" payload, piece by piece (same errors as decoding it)."""
    crc = 0
    for piece in _stored_pieces(entry, fd, position):
        crc = crc32(piece, crc)
    if crc != entry.crc32:
        raise ChecksumError("R18", f"tensor {entry.name!r}: payload checksum mismatch (the file is corrupted)")
    check = _PieceCheck(entry)
    if entry.compression == "none":
        for piece in _stored_pieces(entry, fd, position):
            check.feed(piece)
    else:
        _zstd_pieces(entry, fd, position, check)
    check.finish()


def _stored_pieces(entry: TensorEntry, fd: int, position: int) -> Iterator[bytes]:
    """The stored payload, _PIECE_BYTES at a time."""
    for start in range(0, entry.length, _PIECE_BYTES):
        size = min(_PIECE_BYTES, entry.length - start)
        piece = os.pread(fd, size, position + start)
        if len(piece) != size:
            raise FormatError("R16", f"tensor {entry.name!r}: file shrank while being read")
        yield piece


def _zstd_pieces(entry: TensorEntry, fd: int, position: int, check: _PieceCheck) -> None:
    _check_declared_size(entry, os.pread(fd, min(entry.length, 32), position))  # a frame header is <= 18 bytes
    # streaming holds the frame's window: qpack writes 2 MiB windows, but a single-segment frame's
    # window is its whole content (raw_length), which one-shot decoding accepts too
    inflater = zstandard.ZstdDecompressor(max_window_size=1 << 31).decompressobj()
    pending, produced = bytearray(), 0
    for stored in _stored_pieces(entry, fd, position):
        for at in range(0, len(stored), _ZSTD_FEED_BYTES):
            if inflater.eof:
                raise FormatError("R19", f"tensor {entry.name!r}: bytes follow the zstd frame")
            try:
                out = inflater.decompress(stored[at:at + _ZSTD_FEED_BYTES])
            except zstandard.ZstdError as exc:
                raise FormatError("R19", f"tensor {entry.name!r}: zstd payload is corrupted: {exc}") from None
            produced += len(out)
            if produced > entry.raw_length:
                raise FormatError("R19", f"tensor {entry.name!r}: zstd frame holds more than {entry.raw_length} bytes")
            pending += out
            if len(pending) >= _PIECE_BYTES:
                cut = len(pending) - len(pending) % _PIECE_BYTES
                check.feed(bytes(pending[:cut]))
                del pending[:cut]
    if not inflater.eof or inflater.unused_data:
        what = "bytes follow the zstd frame" if inflater.eof else "the zstd frame is truncated"
        raise FormatError("R19", f"tensor {entry.name!r}: {what}")
    if produced != entry.raw_length:
        raise FormatError("R19", f"tensor {entry.name!r}: decompressed to {produced} bytes, expected {entry.raw_length}")
    check.feed(bytes(pending))


class _PieceCheck:
    """R20 over a payload's decoded bytes, fed in pieces of whole indices."""

    def __init__(self, entry: TensorEntry) -> None:
        self.entry = entry
        self.done = 0  # bytes fed so far
        self.last = 0

    def feed(self, piece: bytes) -> None:
        if not piece:
            return
        entry = self.entry
        data = torch.frombuffer(bytearray(piece), dtype=torch.uint8)
        if entry.encoding == "raw":
            if entry.dtype == "bool" and int(data.max()) > 1:
                raise FormatError("R20", f"tensor {entry.name!r}: bool bytes must be 0 or 1")
        else:
            limit = entry.params["codebook_size"] if entry.encoding == "kmeans" else 1 << entry.bits
            if limit < 1 << entry.width:
                first = self.done * 8 // entry.width
                count = min(entry.numel, (self.done + len(piece)) * 8 // entry.width) - first
                if count and int(unpack_bits(data, entry.width, count).max()) >= limit:
                    what = f"the {limit}-entry codebook" if entry.encoding == "kmeans" else f"{entry.bits} bits"
                    raise FormatError("R20", f"tensor {entry.name!r}: an index does not fit {what}")
        self.done += len(piece)
        self.last = piece[-1]

    def finish(self) -> None:
        entry = self.entry
        used_bits = entry.numel * entry.width % 8 if entry.encoding != "raw" else 0
        if used_bits and self.last >> used_bits:
            raise FormatError("R20", f"tensor {entry.name!r}: unused bits of the last payload byte are not zero")
