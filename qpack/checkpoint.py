"""Reading the checkpoints people actually have, without running code from them.

``torch.load(weights_only=True)`` reads tensors, containers and plain scalars but refuses
arbitrary pickled objects; a whole pickled ``nn.Module`` needs ``trust_pickle=True``.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .dtypes import name_of_dtype
from .errors import InputError
from .format import DEFAULT_LIMITS, MAGIC, metadata_problem

__all__ = ["Checkpoint", "from_mapping", "read_checkpoint"]

#: scalars kept as metadata at most; the rest of the format's metadata entries stay free
MAX_SCALARS = DEFAULT_LIMITS.max_metadata_entries // 2
#: keys under which training scripts nest the model's state dict, in order of preference
NESTED_KEYS = ("state_dict", "model_state_dict", "model", "module", "net", "network", "weights")
#: training state that sits beside the weights in checkpoints; never packed as weights
TRAINING_KEYS = frozenset({"optimizer", "optimizer_state_dict", "optimizer_states", "optim", "scheduler",
                           "lr_scheduler", "lr_schedulers", "scaler", "grad_scaler", "callbacks", "loops"})


@dataclass
class Checkpoint:
    """A state dict ready to pack: tensors in order, plus what was left out or kept aside."""

    tensors: dict[str, torch.Tensor]
    notes: list[str] = field(default_factory=list)
    #: plain scalars and strings found among the tensors, kept as file metadata
    scalars: dict[str, str] = field(default_factory=dict)


def read_checkpoint(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    """Load a .pt/.pth/.bin/.ckpt file (zip or legacy format) as a state dict, on the CPU.

    Args:
        path: the checkpoint.
        trust_pickle: allow arbitrary pickled objects (a whole ``nn.Module``); unpickling
            runs code from the file, so only for files you trust.

    Raises:
        InputError: the file is missing, not a checkpoint, or holds no usable state dict.
    """
    path = Path(path)
    _check_input_file(path)
    obj = _torch_load(path, trust_pickle)
    return from_mapping(obj, source=str(path))


def _check_input_file(path: Path) -> None:
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a checkpoint file")
    if not path.exists():
        raise InputError(f"{path}: no such file")
    try:
        with open(path, "rb") as handle:
            head = handle.read(max(len(MAGIC), 16))
    except PermissionError:
        raise InputError(f"{path}: permission denied") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read: {exc.strerror}") from None
    if not head:
        raise InputError(f"{path} is empty")
    if head.startswith(MAGIC):
        raise InputError(f"{path} is already a .qpk file; use 'qpack unpack' or 'qpack info' on it")
    if not _has_checkpoint_signature(head):
        # said before torch.load runs: a text file or random bytes would otherwise fail inside
        # the unpickler, and its message suggests --trust-pickle for a file that is no pickle
        raise InputError(f"{path} is not a PyTorch checkpoint: {_what_it_starts_with(head)}; torch.save writes "
                         "a zip archive (PK..) or a pickle (0x80 and a protocol number)")


#: pickle protocols torch.save may write (its default is 2)
_PICKLE_PROTOCOLS = range(2, 6)


def _has_checkpoint_signature(head: bytes) -> bool:
    """Whether a file starts as torch.save's files do: a zip archive, or a pickle of protocol 2+."""
    return head.startswith(b"PK\x03\x04") or (len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS)


def _what_it_starts_with(head: bytes) -> str:
    if len(head) >= 9 and head[8:9] == b"{":
        return "it looks like a safetensors file (name it .safetensors)"
    try:
        text = head.decode("utf-8")
    except UnicodeDecodeError:
        return f"it starts with bytes {head[:8].hex(' ')}"
    if text.isprintable() or all(c.isprintable() or c.isspace() for c in text):
        return "it is text"
    return f"it starts with bytes {head[:8].hex(' ')}"


def _torch_load(path: Path, trust_pickle: bool) -> Any:
    """torch.load on the CPU: memory-mapped when the file is a zip, plain otherwise.

    Storages saved on a GPU load on the CPU (``map_location``). A zip that memory-mapping
    cannot read (rewritten by a zip tool, storages not aligned) is loaded again without it.
    """
    is_zip = zipfile.is_zipfile(path)
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=is_zip)
        except pickle.UnpicklingError:
            raise
        except Exception:
            if not is_zip:
                raise
            return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=False)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights_only" in text or "Unsupported global" in text or "GLOBAL" in text:
            found = _unsupported_global(text)
            raise InputError(
                f"{path} holds pickled Python objects{found}, not just tensors (a whole nn.Module?); "
                "re-run with --trust-pickle only if you trust the file: unpickling runs its code"
            ) from None
        raise InputError(f"{path} is not a PyTorch checkpoint: {_first_line(text)}") from None
    except MemoryError:
        raise
    except Exception as exc:  # noqa: BLE001 - whatever torch.load, or a trusted file's code, raises
        raise InputError(f"{path} is not a readable PyTorch checkpoint: {type(exc).__name__}: "
                         f"{_first_line(str(exc))}") from None


def _unsupported_global(text: str) -> str:
    marker = "Unsupported global: GLOBAL "
    if marker in text:
        name = text.split(marker, 1)[1].split()[0].rstrip(".,")
        return f" (found {name})"
    return ""


def _first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0][:200] if lines else "unknown error"


def from_mapping(obj: Any, *, source: str = "the input") -> Checkpoint:
    """Find the state dict inside a loaded object and check every tensor can be stored.

    A training checkpoint's model weights nested under one of NESTED_KEYS are taken and the
    rest (optimizer state, counters) is left out with a note. Nested dicts of tensors are
    flattened with dots. Plain scalars and strings are kept as metadata; other values are
    left out with a note.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise InputError(f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    notes: list[str] = []
    if not _holds_tensors(obj):
        for key in NESTED_KEYS:
            value = obj.get(key)
            if isinstance(value, torch.nn.Module):
                value = value.state_dict()
            if isinstance(value, Mapping) and _holds_tensors(value):
                rest = [str(k) for k in obj if k != key]
                if rest:
                    notes.append(f"took the state dict under {key!r}; left out {', '.join(rest[:8])}"
                                 + (f" and {len(rest) - 8} more" if len(rest) > 8 else ""))
                obj = value
                break
    training = [key for key in obj if key in TRAINING_KEYS and isinstance(obj[key], (Mapping, list))]
    if training:
        notes.append(f"left out training state: {', '.join(map(str, training))}")
        obj = {k: v for k, v in obj.items() if k not in training}
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, str] = {}
    skipped: list[str] = []
    _flatten(obj, "", tensors, scalars, skipped)
    if not tensors:
        found = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:6])
        raise InputError(f"{source} holds no tensors (found {{{found}}})")
    if skipped:
        notes.append(f"left out {len(skipped)} non-tensor value(s): {', '.join(skipped[:6])}")
    if scalars:
        notes.append(f"kept {len(scalars)} scalar value(s) as metadata (state.<name>)")
    for name, tensor in tensors.items():
        _check_tensor(name, tensor)
    return Checkpoint(tensors, notes, scalars)


def _holds_tensors(obj: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


#: nesting deeper than this inside a state dict is left out (and never recursed into)
MAX_DEPTH = 64


def _flatten(obj: Mapping, prefix: str, tensors: dict, scalars: dict, skipped: list, depth: int = 0) -> None:
    for key, value in obj.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            if name in tensors:
                raise InputError(f"two tensors are both named {name!r} once nested names are joined with dots")
            tensors[name] = value
        elif isinstance(value, Mapping):
            if depth >= MAX_DEPTH:
                skipped.append(f"{name} (nested more than {MAX_DEPTH} levels)")
            else:
                _flatten(value, f"{name}.", tensors, scalars, skipped, depth + 1)
        elif isinstance(value, (bool, int, str)) or (isinstance(value, float) and math.isfinite(value)):
            _keep_scalar(name, value, scalars, skipped)
        else:
            skipped.append(f"{name} ({type(value).__name__})")


def _keep_scalar(name: str, value: float | str, scalars: dict, skipped: list) -> None:
    """Keep a scalar as metadata ``state.NAME`` when it fits the format's limits (spec 1.2)."""
    key, text = f"state.{name}", json.dumps(value)
    if len(scalars) >= MAX_SCALARS:
        skipped.append(f"{name} (more than {MAX_SCALARS} scalars)")
    elif metadata_problem(key, text) is not None:
        skipped.append(f"{name} ({type(value).__name__} too long for metadata)")
    else:
        scalars[key] = text


def _check_tensor(name: str, tensor: torch.Tensor) -> None:
    if tensor.is_meta:
        raise InputError(f"tensor {name!r} is on the meta device: it has a shape but no values to store")
    if tensor.is_sparse or tensor.layout != torch.strided:
        raise InputError(f"tensor {name!r} is sparse ({tensor.layout}); convert it with .to_dense() first")
    if tensor.is_quantized:
        raise InputError(f"tensor {name!r} is already quantized ({tensor.dtype}); dequantize it first")
    if tensor.is_complex():
        raise InputError(f"tensor {name!r} is complex ({tensor.dtype}), which .qpk does not store")
    if name_of_dtype(tensor.dtype) is None:
        raise InputError(f"tensor {name!r} has dtype {tensor.dtype}, which .qpk does not store")
