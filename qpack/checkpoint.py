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
from .structure import MAX_DEPTH, STRUCTURE_KEY, describe

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
    #: the ``qpack.structure`` metadata entry (the module of that name): the input's nesting
    #: and plain data as JSON, None for a flat state dict
    structure: str | None = None


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

    The state dict is the object itself when it holds tensors at its top level, else the
    value under one of NESTED_KEYS, else the one value (training state aside) that holds
    tensors, when it has siblings (``{"net": sd, "epoch": 3}``); this repeats downwards.
    Training state (TRAINING_KEYS) is left out with a note. Nested dicts of tensors are
    flattened with dots. Where the object is more than a flat mapping of names to tensors,
    its nesting and plain data (JSON-safe values: config, vocabularies) are kept as the
    ``qpack.structure`` metadata entry (see the module of that name), for ``unpack`` to
    rebuild; other values are left out with a note. Without that entry (it would pass the metadata limits)
    plain scalars are kept as ``state.NAME`` entries.
    """
    if isinstance(obj, torch.nn.Module):
        obj = obj.state_dict()
    if not isinstance(obj, Mapping):
        raise InputError(f"{source} holds a {type(obj).__name__}, not a state dict (a mapping of names to tensors)")
    root, path, notes = obj, [], []
    while not _holds_tensors(obj) and len(path) < MAX_DEPTH:
        key = _container_key(obj)
        if key is None:
            break
        value = obj[key]
        obj = value.state_dict() if isinstance(value, torch.nn.Module) else value
        path.append(key)
    if path:
        notes.append(f"took the state dict under {'.'.join(map(repr, path))}")
    container = obj
    training = [key for key in obj if key in TRAINING_KEYS and isinstance(obj[key], (Mapping, list))]
    if training:
        obj = {k: v for k, v in obj.items() if k not in training}
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, str] = {}
    skipped: list[str] = []
    _flatten(obj, "", tensors, scalars, skipped)
    if not tensors:
        found = ", ".join(f"{k!r}: {type(v).__name__}" for k, v in list(obj.items())[:6])
        raise InputError(f"{source} holds no tensors (found {{{found}}})")
    for name, tensor in tensors.items():
        _check_tensor(name, tensor)
    found = describe(root, tuple(path), container, tensors, TRAINING_KEYS)
    if found.text is not None and found.with_plain:
        if found.kept:
            notes.append(f"kept {_some(found.kept)} as plain data ({STRUCTURE_KEY} metadata: unpack rebuilds "
                         "the nesting)")
        elif path:
            notes.append(f"kept the nesting ({STRUCTURE_KEY} metadata: unpack rebuilds it)")
        training_left = [entry.rsplit(" (", 1)[0] for entry in found.left_out if entry.endswith("(training state)")]
        if training_left:
            notes.append(f"left out training state: {_some(training_left)}")
        others = [entry for entry in found.left_out if not entry.endswith("(training state)")]
        if others:
            notes.append(f"left out {len(others)} value(s): {_some(others)}")
        return Checkpoint(tensors, notes, {}, found.text)  # the plain data are in the structure
    # no structure, or one of the nesting only (the plain data would pass the metadata limit):
    # plain scalars as state.* entries, as qpack did before it recorded structures
    if path:
        rest = [str(k) for k in root if k != path[0]]
        if rest:
            notes[-1] += f"; left out {_some(rest)}"
    if training:
        notes.append(f"left out training state: {', '.join(map(str, training))}")
    if skipped:
        notes.append(f"left out {len(skipped)} non-tensor value(s): {', '.join(skipped[:6])}")
    if scalars:
        notes.append(f"kept {len(scalars)} scalar value(s) as metadata (state.<name>)")
    if found.text is not None:
        notes.append(f"kept the nesting only ({STRUCTURE_KEY} metadata): the plain data would pass the "
                     "metadata limits")
    return Checkpoint(tensors, notes, scalars, found.text)


def _some(items: list[str], shown: int = 8) -> str:
    return ", ".join(items[:shown]) + (f" and {len(items) - shown} more" if len(items) > shown else "")


def _container_key(obj: Mapping) -> Any:
    """The key of the value holding the state dict, or None: the first of NESTED_KEYS holding
    tensors, else the only value holding any (training state aside) when it has siblings."""
    for key in NESTED_KEYS:
        value = obj.get(key)
        if isinstance(value, torch.nn.Module) or isinstance(value, Mapping) and _holds_tensors(value):
            return key
    holders = [key for key, value in obj.items()
               if not (key in TRAINING_KEYS and isinstance(value, (Mapping, list)))
               and (isinstance(value, torch.nn.Module) or isinstance(value, Mapping) and _holds_tensors_below(value))]
    return holders[0] if len(holders) == 1 and len(obj) > 1 else None


def _holds_tensors(obj: Mapping) -> bool:
    return any(isinstance(v, torch.Tensor) for v in obj.values())


def _holds_tensors_below(obj: Mapping, depth: int = 0) -> bool:
    return depth < MAX_DEPTH and any(isinstance(v, torch.Tensor) or isinstance(v, Mapping) and
                                     _holds_tensors_below(v, depth + 1) for v in obj.values())


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
