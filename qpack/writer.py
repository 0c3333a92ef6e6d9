"""Writing .qpk files: deterministic bytes, bounded memory, atomic replacement.

Payloads stream into an anonymous spool file as tensors are encoded, since the header that
precedes them is only known at the end. ``finish`` then writes preamble, header and the
spooled data into a hidden temporary file beside the target, fsyncs it, and only then gives
it the target's name. A killed process therefore never leaves a partial file at the target
path and never damages a file already there (at worst a hidden ``.NAME.*.tmp`` file is left
beside it). Every write goes through ``os.write`` (or ``os.copy_file_range``) on a raw
descriptor; an OSError such as ENOSPC propagates with the target's path, after the
temporary file is removed.
"""

from __future__ import annotations

import errno
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import FormatError, InputError, OutputExistsError
from .format import (
    COMPACT_VERSION,
    DEFAULT_LIMITS,
    DERIVED_VERSION,
    VERSION,
    TensorEntry,
    crc32,
    data_start,
    encode_header,
    fixed_bytes,
    metadata_problem,
    name_problem,
    pack_preamble,
    parse_header,
    payload_offset,
)

__all__ = ["QpkWriter", "atomic_output", "planned_file_bytes"]

_ZEROS = bytes(64)
_COPY_CHUNK = 16 * 1024 * 1024
#: copy_file_range errors that mean "not here": copy through memory instead
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP, errno.EBADF})


class QpkWriter:
    """Builds a .qpk file tensor by tensor.

    Args:
        path: the target file.
        overwrite: replace an existing file at ``path``; without it an existing file is an
            OutputExistsError, checked both up front and at the final rename.
        metadata: free-form string-to-string map stored in the header (R7's limits).
        version: the format version to write. None (the default): 5, the newest (spec 6).
            1 to 4 for readers of those (the entries must then be expressible in it: 2 only
            with rANS payloads, 4 or 5 with derived entries).

    Raises:
        InputError: the output path is a folder or its folder is missing; a metadata entry
            or (in ``add``) a tensor name the format cannot store.
        OutputExistsError: ``path`` exists and ``overwrite`` is False.
        OSError: from the file system, naming ``path``.
    """

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False,
                 metadata: dict[str, str] | None = None, version: int | None = None) -> None:
        self.path = Path(path)
        self.version = VERSION if version is None else version
        self.overwrite = overwrite
        self.metadata = dict(metadata or {})
        if len(self.metadata) > DEFAULT_LIMITS.max_metadata_entries:
            raise InputError(f"{len(self.metadata)} metadata entries; a .qpk file holds at most "
                             f"{DEFAULT_LIMITS.max_metadata_entries}")
        for key, value in self.metadata.items():
            if not isinstance(key, str) or not isinstance(value, str):
                raise InputError("metadata keys and values must be strings")
            problem = metadata_problem(key, value)
            if problem:
                raise InputError(problem)
        check_output_path(self.path, overwrite)
        self.entries: list[TensorEntry] = []
        self._names: set[str] = set()
        with _naming_errors(self.path):
            # closed by close() or finish(); anonymous, so a killed process leaves nothing
            self._spool: BinaryIO = tempfile.TemporaryFile(  # noqa: SIM115
                dir=self.path.parent or ".", buffering=0)
        self._end = 0  # end of the last payload in the spool

    def add(self, entry: TensorEntry, payload: bytes | memoryview) -> TensorEntry:
        """Append one tensor: fills in offset, length and crc32 of ``entry`` and spools the payload."""
        if entry.name in self._names:
            raise InputError(f"tensor name {entry.name!r} given twice")
        problem = name_problem(entry.name)
        if problem:
            raise InputError(f"tensor {problem}")
        if self._spool.closed:
            raise ValueError("this QpkWriter is closed")
        view = memoryview(payload).cast("B")
        offset = payload_offset(self._end, len(view), self.version)
        try:
            with _naming_errors(self.path):
                _write_all(self._spool.fileno(), _ZEROS[: offset - self._end], view)
        except BaseException:
            self.close()  # the spool holds part of a payload: this writer cannot go on
            raise
        self._names.add(entry.name)
        entry.offset, entry.length, entry.crc32 = offset, len(view), crc32(view)
        self._end = offset + len(view)
        self.entries.append(entry)
        return entry

    def finish(self) -> int:
        """Write the file and give it its name. Returns the file size in bytes.

        The header is read back with the reader's own checks first, so this writer never
        writes a file that its reader would reject.
        """
        if self._spool.closed:
            raise ValueError("this QpkWriter is closed")
        version = self.version
        for entry in self.entries if version < DERIVED_VERSION else ():
            if entry.encoding == "derived":
                raise InputError(f"cannot write {self.path} as version {version}: tensor {entry.name!r} is derived "
                                 f"from {entry.params.get('source')!r}, which needs version {DERIVED_VERSION}")
        for entry in self.entries if version < COMPACT_VERSION else ():
            if entry.param_dtype != "float32" or entry.compression == "zstd_planes":
                raise InputError(f"cannot write {self.path} as version {version}: tensor {entry.name!r} uses "
                                 f"{entry.param_dtype} parameters or byte planes, which need version {COMPACT_VERSION}")
        header, raw_length = encode_header(self.entries, self.metadata, version)
        if max(len(header), raw_length) > DEFAULT_LIMITS.max_header_bytes:
            raise InputError(f"the header would be {max(len(header), raw_length)} bytes, more than a .qpk file "
                             f"allows ({DEFAULT_LIMITS.max_header_bytes}); too many tensors or metadata")
        try:
            parse_header(header, crc32(header), version=version, header_raw_length=raw_length)
        except FormatError as exc:
            raise InputError(f"cannot write {self.path}: {exc}") from None
        head = pack_preamble(header, version, raw_length) + header
        head += _ZEROS[: data_start(len(head), [e.length for e in self.entries], version) - len(head)]
        with _naming_errors(self.path), atomic_output(self.path, self.overwrite) as out:
            _write_all(out.fileno(), head)
            _copy_all(self._spool.fileno(), out.fileno(), self._end)
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


def planned_file_bytes(entries: list[TensorEntry], metadata: dict[str, str], version: int = VERSION) -> int:
    """The size of the file ``finish`` would write for these entries (offsets, lengths and
    crc32 filled, payloads laid out as ``add`` lays them out) and this metadata.

    The allocation plans with it, so that every byte of the header, of the alignment and of
    the lossless tensors is counted as the writer counts it.
    """
    return fixed_bytes(entries, metadata, version) + sum(e.length for e in entries)


def check_output_path(path: Path, overwrite: bool) -> None:
    """Refuse a folder, a missing parent folder, or an existing file without ``overwrite``."""
    if path.is_dir():
        raise InputError(f"{path} is a folder; give a file name for the output")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise InputError(f"{parent}: the output folder does not exist")
    if path.exists() and not overwrite:
        raise OutputExistsError(f"{path} exists; pass --force (overwrite=True) to replace it")


@contextmanager
def _naming_errors(path: Path) -> Iterator[None]:
    """Give an OSError that names no file (ENOSPC, EIO) the path being written."""
    try:
        yield
    except OSError as exc:
        if exc.filename is not None or exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(path)) from exc


def _write_all(fd: int, *chunks: bytes | memoryview) -> None:
    """Write every byte of ``chunks`` to ``fd`` (os.write may write less than asked)."""
    for chunk in chunks:
        view = memoryview(chunk).cast("B")
        while len(view):
            view = view[os.write(fd, view):]


def _copy_all(src: int, dst: int, length: int) -> None:
    """Append the first ``length`` bytes of ``src`` to ``dst`` at its current position."""
    done = 0
    if hasattr(os, "copy_file_range"):
        try:
            while done < length:
                copied = os.copy_file_range(src, dst, min(length - done, 1 << 30), done)
                if copied == 0:
                    break
                done += copied
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
    while done < length:
        chunk = os.pread(src, min(length - done, _COPY_CHUNK), done)
        if not chunk:
            raise OSError(errno.EIO, "the spool file is shorter than what was written to it")
        _write_all(dst, chunk)
        done += len(chunk)


class atomic_output:
    """Context manager: a binary file that appears at ``path`` only when the block succeeds.

    The block writes a hidden temporary file beside the target (same folder, so the same
    file system), which is flushed and fsynced, then renamed over the target (``overwrite``)
    or hard-linked to it, which fails if the target appeared meanwhile, so nothing is ever
    clobbered without ``overwrite``. The folder is fsynced last. If the block raises, the
    temporary file is removed and the target is untouched.

    Raises:
        OutputExistsError: without ``overwrite``, the target appeared while writing.
        OSError: from the file system (ENOSPC, EACCES, ...); the temporary file is removed.
    """

    def __init__(self, path: str | os.PathLike[str], overwrite: bool) -> None:
        self.path = Path(path)
        self.overwrite = overwrite
        self._temp_name: Path | None = None  # a hidden name beside the target
        self.file: BinaryIO | None = None

    def __enter__(self) -> BinaryIO:
        fd, self._temp_name = _create_temp_beside(self.path)
        self.file = os.fdopen(fd, "wb")
        return self.file

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        assert self.file is not None and self._temp_name is not None
        try:
            with _naming_errors(self.path):
                try:
                    if exc_type is None:
                        self.file.flush()
                        os.fsync(self.file.fileno())
                finally:
                    self.file.close()
                if exc_type is None:
                    self._publish()
        finally:
            try:
                self._temp_name.unlink()
            except FileNotFoundError:  # renamed to the target
                pass
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            # an error from the block (ENOSPC while writing): name the file it was writing
            raise OSError(exc.errno, exc.strerror or os.strerror(exc.errno), str(self.path)) from exc

    def _publish(self) -> None:
        assert self._temp_name is not None
        if self.overwrite:
            os.replace(self._temp_name, self.path)
        else:
            _link_new(self._temp_name, self.path)
        _fsync_folder(self.path.parent)


def _create_temp_beside(path: Path) -> tuple[int, Path]:
    """Create and open a new hidden file in ``path``'s folder, mode 0666 less the umask."""
    folder = path.parent if str(path.parent) else Path(".")
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0)
    for _ in range(100):
        name = folder / f".{path.name}.{os.urandom(6).hex()}.tmp"
        try:
            return os.open(name, flags, 0o666), name
        except FileExistsError:
            continue
    raise OSError(errno.EEXIST, "could not create a temporary file", str(folder))


def _link_new(source: Path, target: Path) -> None:
    """Give ``source``'s file the name ``target`` unless ``target`` exists."""
    try:
        os.link(source, target)
    except FileExistsError:
        raise OutputExistsError(f"{target} appeared while writing; nothing was overwritten") from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.ENOSYS, errno.EMLINK):
            raise
        # no hard links on this file system: a rename, checked just before
        if os.path.lexists(target):
            raise OutputExistsError(f"{target} appeared while writing; nothing was overwritten") from None
        os.replace(source, target)


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
