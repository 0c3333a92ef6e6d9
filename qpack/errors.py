"""The errors qpack raises. Every problem with a file or with user input is a QpkError."""

from __future__ import annotations

__all__ = [
    "QpkError",
    "FormatError",
    "UnsupportedVersionError",
    "ChecksumError",
    "InputError",
    "OutputExistsError",
    "OutOfMemoryError",
]


class QpkError(Exception):
    """Base of every error about a bad file or bad input."""

    #: exit code the CLI uses for this kind of error
    exit_code = 1


class InputError(QpkError, ValueError):
    """The input given to qpack (a checkpoint, an option) cannot be used."""

    exit_code = 2


class OutputExistsError(QpkError, FileExistsError):
    """The output path exists and overwriting was not asked for."""

    exit_code = 3


class FormatError(QpkError, ValueError):
    """A .qpk file breaks a rule of the format (specs/qpk-format.md).

    ``rule`` names the reader rule (``"R7"``) that the file breaks.
    """

    exit_code = 4

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{message} [{rule}]")
        self.rule = rule


class UnsupportedVersionError(FormatError):
    """The file is a .qpk of a version this reader cannot read."""


class ChecksumError(FormatError):
    """A stored checksum does not match the bytes it covers."""


class OutOfMemoryError(QpkError, MemoryError):
    """Decoding would need more memory than allowed or available.

    Raised before anything is allocated when a file's tensors decode to more than the
    reader's bound (spec R23: ``max_bytes``), and when an allocation fails while a tensor
    is decoded. The message names the tensor and the bytes; ``rule`` is ``"R23"`` for the
    bound and ``None`` for an allocation that failed.
    """

    exit_code = 5

    def __init__(self, message: str, rule: str | None = None) -> None:
        super().__init__(f"out of memory: {message}" + (f" [{rule}]" if rule else ""))
        self.rule = rule
