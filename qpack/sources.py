"""Where state dicts come from: torch checkpoints, safetensors files, sharded checkpoints.

Safetensors files and shards are read lazily, one tensor (or one shard) at a time, so
packing a sharded checkpoint never holds more than one shard in memory.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import torch

from .checkpoint import Checkpoint, read_checkpoint
from .dtypes import name_of_dtype
from .errors import InputError

__all__ = ["open_source", "INDEX_NAMES", "SINGLE_NAMES"]

#: index files of sharded checkpoints, in order of preference
INDEX_NAMES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
#: single-file checkpoints looked for inside a folder
SINGLE_NAMES = ("model.safetensors", "pytorch_model.bin", "model.pt", "model.pth")


class LazyTensors(Mapping[str, torch.Tensor]):
    """A read-only mapping that loads each tensor only when it is asked for."""

    def __init__(self, names: list[str], loader: Callable[[str], torch.Tensor]) -> None:
        self._names = names
        self._index = set(names)
        self._loader = loader

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._index:
            raise KeyError(name)
        return self._loader(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)


def open_source(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> Checkpoint:
    """Open a checkpoint of any supported kind as a (lazy) state dict.

    Args:
        path: a .pt/.pth/.bin/.ckpt file, a .safetensors file, a sharded checkpoint's
            index file (``*.index.json``), or a folder holding one of these.
        trust_pickle: allow arbitrary pickled objects in torch checkpoints (runs code).

    Raises:
        InputError: nothing usable at ``path``.
    """
    path = Path(path)
    if path.is_dir():
        return open_source(_pick_in_folder(path), trust_pickle=trust_pickle)
    if path.name.endswith(".index.json"):
        return _open_sharded(path, trust_pickle)
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        return _open_safetensors(path)
    return read_checkpoint(path, trust_pickle=trust_pickle)


def _pick_in_folder(folder: Path) -> Path:
    for name in INDEX_NAMES + SINGLE_NAMES:
        if (folder / name).is_file():
            return folder / name
    found = sorted(p.name for p in folder.iterdir())[:8]
    raise InputError(f"{folder} is a folder with no checkpoint qpack recognises "
                     f"(looked for {', '.join(INDEX_NAMES + SINGLE_NAMES)}; found {', '.join(found) or 'nothing'})")


def _looks_like_safetensors(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            head = handle.read(9)
    except OSError:
        return False
    if len(head) < 9:
        return False
    (length,) = struct.unpack("<Q", head[:8])
    return head[8:9] == b"{" and 2 <= length <= os.path.getsize(path) - 8


def _safe_open(path: Path):  # noqa: ANN202 - the safetensors handle type is not exported
    try:
        from safetensors import safe_open
    except ImportError:
        raise InputError(f"{path} is a safetensors file; install the safetensors package to read it "
                         "(pip install safetensors)") from None
    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:  # the package raises its own SafetensorError and OSError
        raise InputError(f"{path} is not a readable safetensors file: {exc}") from None


def _checked(name: str, tensor: torch.Tensor) -> torch.Tensor:
    if name_of_dtype(tensor.dtype) is None:
        raise InputError(f"tensor {name!r} has dtype {tensor.dtype}, which .qpk does not store")
    return tensor


def _open_safetensors(path: Path) -> Checkpoint:
    if not path.exists():
        raise InputError(f"{path}: no such file")
    handle = _safe_open(path)
    names = list(handle.keys())
    if not names:
        raise InputError(f"{path} holds no tensors")
    metadata = handle.metadata() or {}
    scalars = {f"safetensors.{k}": v for k, v in metadata.items() if isinstance(v, str)}
    return Checkpoint(LazyTensors(names, lambda n: _checked(n, handle.get_tensor(n))), [], scalars)


def _open_sharded(index_path: Path, trust_pickle: bool) -> Checkpoint:
    try:
        index = json.loads(index_path.read_text())
    except FileNotFoundError:
        raise InputError(f"{index_path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InputError(f"{index_path} is not a readable index file: {exc}") from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise InputError(f"{index_path} has no 'weight_map' of tensor names to shard files")
    shards: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        if Path(shard).name != shard:
            raise InputError(f"{index_path}: shard {shard!r} is not a plain file name beside the index")
        shards.setdefault(shard, []).append(name)
    for shard in shards:
        if not (index_path.parent / shard).is_file():
            raise InputError(f"{index_path} names shard {shard}, which is missing")
    names = [name for shard_names in shards.values() for name in shard_names]  # shard by shard
    owner = {name: shard for shard, shard_names in shards.items() for name in shard_names}
    current: dict[str, Mapping[str, torch.Tensor]] = {}

    def load(name: str) -> torch.Tensor:
        shard = owner[name]
        if shard not in current:
            current.clear()  # one shard in memory at a time
            current[shard] = open_source(index_path.parent / shard, trust_pickle=trust_pickle).tensors
        try:
            return current[shard][name]
        except KeyError:
            raise InputError(f"{index_path} puts {name!r} in {shard}, which does not hold it") from None

    notes = [f"read {len(names)} tensors from {len(shards)} shard(s) listed in {index_path.name}"]
    return Checkpoint(LazyTensors(names, load), notes, {})
