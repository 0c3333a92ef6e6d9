"""Lazy access to qpack's compiled (numba) kernels.

numba is imported only when a kernel is first needed, never by ``import qpack``. Without
numba, or with ``QPACK_NO_JIT`` set to anything but ``0`` or empty, :func:`kernels` returns
None and callers run their numpy / torch reference code, which gives the same bits.
"""

from __future__ import annotations

import importlib
import os
import threading
from types import ModuleType

__all__ = ["enabled", "kernels"]

_lock = threading.Lock()
_loaded: dict[str, ModuleType | None] = {}


def enabled() -> bool:
    """False when ``QPACK_NO_JIT`` asks for the reference code."""
    return os.environ.get("QPACK_NO_JIT", "") in ("", "0")


def kernels(module: str) -> ModuleType | None:
    """The kernel module ``module`` (e.g. ``"qpack.rans_jit"``), imported on first use, or
    None when the JIT is off or numba cannot be imported."""
    if not enabled():
        return None
    if module not in _loaded:
        with _lock:
            if module not in _loaded:
                try:
                    _loaded[module] = importlib.import_module(module)
                except ImportError:  # numba missing or broken: the reference path still works
                    _loaded[module] = None
    return _loaded[module]
