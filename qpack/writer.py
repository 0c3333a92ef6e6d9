"""Writing .qpk files: deterministic bytes, bounded memory, atomic replacement.

Payloads stream into an anonymous spool file as tensors are encoded, since the header that
precedes them is only known at the end. ``finish`` then writes preamble, header and the
spooled data into a hidden temporary file beside the target, fsyncs it, and only then gives
it the target's name. A killed process therefore never leaves a partial file at the target
path (at worst a hidden ``.NAME.*.tmp`` file beside it).
"""

from __future__ import annotations

import os
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO

from .errors import InputError, OutputExistsError
from .format import (
    PREAMBLE_SIZE,
    TensorEntry,
    align,
    build_header,
    pack_preamble,
)

__all__ = ["QpkWriter", "atomic_output"]

_ZEROS = bytes(64)
_COPY_CHUNK = 64 * 1024 * 1024


class QpkWriter:
    """Builds a .qpk file tensor by tensor.

    Args:
        path: the target file.
        overwrite: replace an existing file at ``path``; without it an existing file is an
            OutputExistsError, checked both up front and at the final rename.
        metadata: free-form string-to-string map stored in the header.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False,
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self.metadata = dict(metadata or {})
        check_output_path(self.path, overwrite)
        self.entries: list[TensorEntry] = []
        self._names: set[str] = set()
        self._spool: BinaryIO = tempfile.TemporaryFile(dir=self.path.parent or ".")
        self._end = 0  # end of the last payload in the spool

    def add(self, entry: TensorEntry, payload: bytes | memoryview) -> TensorEntry:
        """Append one tensor: fills in offset, length and crc32 of ``entry`` and spools the payload."""
        if entry.name in self._names:
            raise InputError(f"tensor name {entry.name!r} given twice")
        self._names.add(entry.name)
        offset = align(self._end)
        if offset > self._end:
            self._spool.write(_ZEROS[: offset - self._end])
        view = memoryview(payload).cast("B")
        self._spool.write(view)
        entry.offset, entry.length, entry.crc32 = offset, len(view), zlib.crc32(view)
        self._end = offset + len(view)
        self.entries.append(entry)
        return entry

    def finish(self) -> int:
        """Write the file and give it its name. Returns the file size in bytes."""
        header = build_header(self.entries, self.metadata)
        head = pack_preamble(header) + header
        head += _ZEROS[: align(len(head)) - len(head)]
        assert len(head) == align(PREAMBLE_SIZE + len(header))
        self._spool.flush()
        with atomic_output(self.path, self.overwrite) as out:
            out.write(head)
            out.flush()
            _copy_all(self._spool, out, self._end)
        self.close()
        return len(head) + self._end

    def close(self) -> None:
        """Drop the spool; nothing is written to the target."""
        if not self._spool.closed:
            self._spool.close()

    def __enter__(self) -> QpkWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse a folder, a missing parent folder, or an existing file without ``overwrite``."""
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name for the output")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: the output folder does not exist")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --force (overwrite=True) to replace it")


def _copy_all(src: BinaryIO, dst: BinaryIO, length: int) -> None:
    src.seek(0)
    remaining = length
    copy_range = getattr(os, "copy_file_range", None)
    if copy_range is not None:
        try:
            while remaining:
                done = copy_range(src.fileno(), dst.fileno(), min(remaining, 1 << 30))
                if done == 0:
                    break
                remaining -= done
        except OSError as exc:
            if exc.errno not in (18, 22, 38, 95):  # EXDEV, EINVAL, ENOSYS, EOPNOTSUPP: copy by hand
                raise
    while remaining:
        chunk = src.read(min(remaining, _COPY_CHUNK))
        if not chunk:
            raise OSError("spool file shorter than expected")
        dst.write(chunk)
        remaining -= len(chunk)


class atomic_output:
    """Context manager: a binary file that appears at ``path`` only when the block succeeds.

    The data is fsynced before the rename. Without ``overwrite``, the final step is a
    hard link that fails if the target appeared meanwhile, so nothing is ever clobbered.
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._temp_name: Path | None = None  # a hidden name beside the target
        self.file: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        folder = self.path.parent if str(self.path.parent) else Path(".")
        fd, name = tempfile.mkstemp(dir=folder, prefix=f".{self.path.name}.", suffix=".tmp")
        self._temp_name = Path(name)
        os.fchmod(fd, 0o666 & ~_umask())
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.file is not None
        try:
            if exc_type is None:
                self.file.flush()
                os.fsync(self.file.fileno())
                self._publish()
        finally:
            self.file.close()
            if self._temp_name is not None and self._temp_name.exists():
                self._temp_name.unlink()

    def _publish(self) -> None:
        assert self._temp_name is not None
        if self.overwrite:
            os.replace(self._temp_name, self.path)
        else:
            _link_new(self._temp_name, self.path)
            self._temp_name.unlink()
        _fsync_folder(self.path.parent)


def _link_new(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except FileExistsError:
        raise OutputExistsError(f"{target} appeared while writing; nothing was overwritten") from None


def _fsync_folder(folder: Path) -> None:
    try:
        fd = os.open(folder if str(folder) else ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
