"""Reading .qpk files: validate the whole layout first, then decode tensors one at a time."""

from __future__ import annotations

import os
import stat
import threading
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import zstandard

from . import codecs, rans
from .bitpack import pack_bits, unpack_bits
from .dtypes import dtype_from_name
from .errors import ChecksumError, FormatError, InputError
from .format import (
    DEFAULT_LIMITS,
    PREAMBLE_SIZE,
    Limits,
    TensorEntry,
    align,
    header_crc,
    parse_header,
    parse_preamble,
    preamble_version,
)

__all__ = ["QpkReader", "decode_payload", "decode_indices", "params_on"]

_local = threading.local()


def _decompressor() -> zstandard.ZstdDecompressor:
    # zstd contexts are not thread-safe; one per thread
    dctx = getattr(_local, "dctx", None)
    if dctx is None:
        dctx = _local.dctx = zstandard.ZstdDecompressor()
    return dctx


class QpkReader:
    """A .qpk file opened for reading.

    Opening checks every reader rule that the header and layout can break (R1-R17) before any
    payload is read; each tensor is read, checksummed (R18), decompressed (R19) and decoded
    (R20) only when asked for. Safe to use from several threads at once.

    Args:
        path: the .qpk file.
        limits: reader limits; the defaults suit any real model.

    Raises:
        InputError: the path is missing, a folder or unreadable.
        FormatError: the file breaks a rule of the format (subclasses name which kind).
    """

    def __init__(self, path: str | os.PathLike[str], *, limits: Limits = DEFAULT_LIMITS) -> None:
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
            entries, self.metadata = parse_header(header, header_crc(preamble), limits, version=self.version)
            self.data_start = align(PREAMBLE_SIZE + header_length)
            self._check_layout(entries, PREAMBLE_SIZE + header_length)
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
        stored = os.pread(self._fd, entry.length, position)
        if len(stored) != entry.length:
            raise FormatError("R16", f"tensor {name!r}: file shrank while being read")
        _check_crc(entry, stored)
        if entry.compression == "rans":
            return _rans_decode(entry, stored)
        return _zstd_decompress(entry, stored)

    def tensor(self, name: str, device: str | torch.device = "cpu") -> torch.Tensor:
        """Decode one tensor (original dtype and shape) on ``device``."""
        return decode_payload(self.entry(name), self.read_payload(name), device)

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
    if zlib.crc32(data) != entry.crc32:
        raise ChecksumError("R18", f"tensor {entry.name!r}: payload checksum mismatch (the file is corrupted)")


def _zstd_decompress(entry: TensorEntry, stored: bytes) -> torch.Tensor:
    try:
        declared = zstandard.frame_content_size(stored)
    except zstandard.ZstdError as exc:
        raise FormatError("R19", f"tensor {entry.name!r}: not a zstd frame: {exc}") from None
    if declared != entry.raw_length:
        raise FormatError("R19", f"tensor {entry.name!r}: zstd frame declares {declared} bytes, header says {entry.raw_length}")
    try:
        # the output buffer is the declared size, which R19 just pinned to raw_length (itself
        # at most MAX_ZSTD_EXPANSION times the payload, R15); data after the frame is an error
        raw = _decompressor().decompress(stored, max_output_size=entry.raw_length, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise FormatError("R19", f"tensor {entry.name!r}: zstd payload is corrupted: {exc}") from None
    if len(raw) != entry.raw_length:
        raise FormatError("R19", f"tensor {entry.name!r}: decompressed to {len(raw)} bytes, expected {entry.raw_length}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only bytes; callers get a copy or a new tensor
        return torch.frombuffer(bytearray(raw), dtype=torch.uint8) if raw else torch.empty(0, dtype=torch.uint8)


def _rans_decode(entry: TensorEntry, stored: bytes) -> torch.Tensor:
    """The packed indices (section 4) that a rANS payload codes, so decoding continues as for
    packed payloads: only packed bytes cross to the device, and R20 checks them."""
    try:
        indices = rans.decode(stored, entry.numel, entry.bits)
    except rans.RansError as exc:
        raise FormatError("R19", f"tensor {entry.name!r}: rANS payload is corrupted: {exc}") from None
    return pack_bits(torch.from_numpy(indices.view(np.int16) if indices.dtype == np.uint16 else indices),
                     entry.width)


def params_on(entry: TensorEntry, device: torch.device | str) -> dict[str, torch.Tensor]:
    """A quantized tensor's parameters as float32 tensors on ``device``: ``min`` and ``max``
    (C values each) or ``codebook`` (C x K)."""
    if entry.encoding == "uniform":
        lo = torch.from_numpy(np.frombuffer(entry.params["min"], dtype="<f4").copy())
        hi = torch.from_numpy(np.frombuffer(entry.params["max"], dtype="<f4").copy())
        return {"min": lo.to(device), "max": hi.to(device)}
    book = np.frombuffer(entry.params["codebook"], dtype="<f4").copy()
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
    indices = decode_indices(entry, payload, device)
    codec = codecs.QUANTIZERS[entry.encoding]
    row_length = entry.group_size or None
    return codec.dequantize(indices, params_on(entry, device), entry.bits, entry.shape, dtype, row_length)


def decode_indices(entry: TensorEntry, payload: torch.Tensor, device: str | torch.device = "cpu") -> torch.Tensor:
    """The flat indices of a quantized tensor's payload, unpacked on ``device`` and checked (R20).

    Returns the narrowest integer type that holds them (see ``unpack_bits``).
    """
    used_bits = entry.numel * entry.width % 8
    if used_bits and int(payload[-1]) >> used_bits:
        raise FormatError("R20", f"tensor {entry.name!r}: unused bits of the last payload byte are not zero")
    indices = unpack_bits(payload.to(device, non_blocking=True), entry.width, entry.numel)
    limit = entry.params["codebook_size"] if entry.encoding == "kmeans" else 1 << entry.bits
    if limit < 1 << entry.width and int(indices.max()) >= limit:
        what = f"the {limit}-entry codebook" if entry.encoding == "kmeans" else f"{entry.bits} bits"
        raise FormatError("R20", f"tensor {entry.name!r}: an index does not fit {what}")
    return indices
