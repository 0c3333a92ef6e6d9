"""qpack: pack PyTorch state dicts into compact, safe .qpk files and back.

    >>> import qpack
    >>> qpack.pack("model.pt", "model.qpk", bits=8)          # doctest: +SKIP
    >>> state = qpack.load("model.qpk", device="cuda")       # doctest: +SKIP

The file format is specified in specs/qpk-format.md. Importing qpack loads torch, numpy,
msgpack and zstandard, never scikit-learn, torchvision or the demo.
"""

from __future__ import annotations

__version__ = "0.1.0"

from .api import PackReport, TensorReport, info, load, load_into, pack, unpack, verify
from .errors import (
    ChecksumError,
    FormatError,
    InputError,
    OutOfMemoryError,
    OutputExistsError,
    QpkError,
    UnsupportedVersionError,
)
from .reader import QpkReader
from .sensitivity import measure_sensitivity

__all__ = [
    "__version__",
    "pack",
    "load",
    "load_into",
    "unpack",
    "info",
    "verify",
    "measure_sensitivity",
    "QpkReader",
    "PackReport",
    "TensorReport",
    "QpkError",
    "FormatError",
    "UnsupportedVersionError",
    "ChecksumError",
    "InputError",
    "OutputExistsError",
    "OutOfMemoryError",
]
