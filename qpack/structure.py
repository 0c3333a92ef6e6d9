"""A checkpoint's nesting and plain data, kept as one metadata entry, and rebuilt from it.

``torch.save({"model_state": sd, "config": {...}, "itos": {0: "a"}})`` holds more than a
state dict: the state dict sits under a key, beside plain data that a script needs to use
it. The packer stores the tensors by their flat names, as always; ``describe`` records where
each tensor sat and the plain data around it as the JSON entry ``qpack.structure`` (a qpack
convention in the free-form metadata, spec 1.2: not a format rule, and a reader that ignores
it still reads every tensor); ``rebuild`` puts the decoded tensors back in place.

The JSON is ``{"tree": NODE, "left_out": [TEXT, ...]}``. A NODE is an object with one key:

- ``{"tensor": NAME}``: the file's tensor NAME.
- ``{"tensors": PREFIX}``: a dict of every tensor whose name starts with PREFIX, in file
  order, keyed by the rest of the name (a state dict; written only when that is exactly it).
- ``{"dict": [[KEY, NODE], ...]}``: a dict, in order; KEY a JSON string, number, boolean or
  null (checkpoints key vocabularies by ints).
- ``{"list": [NODE, ...]}``, ``{"tuple": [NODE, ...]}``.
- ``{"json": VALUE}``: plain data that JSON gives back exactly (str, int, finite float,
  bool, null, lists, dicts with string keys).
- ``{"float": "nan" | "inf" | "-inf"}``.

Nothing here is ever unpickled or evaluated: the JSON names tensors and holds plain values.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import InputError
from .format import metadata_problem

__all__ = ["STRUCTURE_KEY", "Described", "StructureError", "describe", "rebuild"]

#: the metadata key (spec 1.2)
STRUCTURE_KEY = "qpack.structure"
#: nesting deeper than this is left out when describing, and refused when rebuilding
MAX_DEPTH = 64
#: left-out entries named in the file at most (the pack report names them all)
MAX_LEFT_OUT = 32
_KEY_TYPES = (str, int, float, bool, type(None))
_NON_FINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


class StructureError(InputError):
    """A ``qpack.structure`` entry that cannot be rebuilt (the tensors still load flat)."""


# -- describe (pack side) ------------------------------------------------------------------------

class _Describer:
    """Builds the tree from the loaded checkpoint; ``path`` leads from the root to the state dict."""

    def __init__(self, path: tuple, names: Mapping[str, Any], training: frozenset, keep_plain: bool) -> None:
        self.path, self.names, self.training, self.keep_plain = path, names, training, keep_plain
        self.left_out: list[str] = []
        self.kept: list[str] = []

    def outside(self, obj: Any, depth: int, label: str, state: Mapping) -> dict | None:
        """A node for ``obj`` on the way to the state dict (its tensors are not in the file)."""
        if depth == len(self.path):
            return self.inside(state, "", depth, label)
        pairs: list = []
        for key, value in obj.items():
            if key == self.path[depth]:
                pairs.append([key, self.outside(value, depth + 1, _join(label, key), state)])
            else:
                self._add(pairs, key, value, depth, label)
        return {"dict": pairs}

    def inside(self, obj: Mapping, prefix: str, depth: int, label: str) -> dict:
        """A node for a dict inside the state dict: its tensors are the file's, named by prefix."""
        if depth == len(self.path):  # the state dict itself: training state beside the weights is left out
            training = [k for k, v in obj.items() if k in self.training and isinstance(v, (Mapping, list))]
            self.left_out += [f"{_join(label, k)} (training state)" for k in training]
            obj = {k: v for k, v in obj.items() if k not in training} if training else obj
        if all(isinstance(k, str) for k in obj) and _is_exactly(obj, prefix, self.names):
            return {"tensors": prefix}
        pairs: list = []
        for key, value in obj.items():
            name = f"{prefix}{key}"
            # a key JSON cannot hold (a tuple) keeps its tensors under the text the names use
            place = key if _json_key(key) else str(key)
            if isinstance(value, torch.Tensor):
                if name in self.names and self.names[name] is value:
                    pairs.append([place, {"tensor": name}])
            elif isinstance(value, Mapping) and _holds_tensor(value, depth + 1):
                if depth - len(self.path) < MAX_DEPTH:  # as deep as the packer flattens (checkpoint._flatten)
                    pairs.append([place, self.inside(value, f"{name}.", depth + 1, _join(label, key))])
                else:
                    self.left_out.append(f"{_join(label, key)} (nested more than {MAX_DEPTH} levels)")
            else:
                self._add(pairs, key, value, depth, label)
        return {"dict": pairs}

    def _add(self, pairs: list, key: Any, value: Any, depth: int, label: str) -> None:
        """Append ``[key, node]`` for plain data under ``key``, or note why it is left out."""
        where = _join(label, key)
        if not _json_key(key):
            self.left_out.append(f"{where} (a {type(key).__name__} key)")
        elif key in self.training and isinstance(value, (Mapping, list)):
            self.left_out.append(f"{where} (training state)")
        else:
            node = self.plain(value, depth + 1, where)
            if node is not None:
                pairs.append([key, node])
                if depth == 0:
                    self.kept.append(str(key))

    def plain(self, value: Any, depth: int, where: str) -> dict | None:
        """A node for plain data, or None (and a left-out entry) for anything else."""
        if isinstance(value, torch.Tensor) or isinstance(value, torch.nn.Module):
            self.left_out.append(f"{where} ({type(value).__name__} outside the state dict)")
            return None
        if isinstance(value, Mapping) and _holds_tensor(value, depth):
            self.left_out.append(f"{where} (tensors outside the state dict)")
            return None
        if not self.keep_plain:
            self.left_out.append(f"{where} (plain data: kept as state.* metadata where they fit)")
            return None
        if depth > MAX_DEPTH:
            self.left_out.append(f"{where} (nested more than {MAX_DEPTH} levels)")
            return None
        if _json_exact(value, depth):
            return {"json": value}
        if type(value) is float:  # finite floats are JSON-exact
            return {"float": repr(value)}
        if isinstance(value, Mapping):
            pairs: list = []
            for key, item in value.items():
                if not _json_key(key):
                    self.left_out.append(f"{_join(where, key)} (a {type(key).__name__} key)")
                    continue
                node = self.plain(item, depth + 1, _join(where, key))
                if node is not None:
                    pairs.append([key, node])
            return {"dict": pairs}
        if type(value) in (list, tuple):
            before = len(self.left_out)
            items = [self.plain(item, depth + 1, f"{where}[{i}]") for i, item in enumerate(value)]
            if len(self.left_out) > before:  # a hole would shift the items after it
                del self.left_out[before:]
                self.left_out.append(f"{where} (a {type(value).__name__} holding what is not plain data)")
                return None
            return {type(value).__name__: items}
        self.left_out.append(f"{where} ({type(value).__name__})")
        return None


@dataclass
class Described:
    """What :func:`describe` found: the JSON (None: nothing to record, or it does not fit),
    what it left out, the top-level keys kept as plain data, and whether it kept plain data
    at all (False: they would pass the metadata limit, so only the nesting is recorded)."""

    text: str | None
    left_out: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    with_plain: bool = True


def describe(root: Mapping, path: tuple, state: Mapping, names: Mapping[str, Any],
             training: frozenset) -> Described:
    """The ``qpack.structure`` JSON of a loaded checkpoint; its text is None where there is
    nothing to record (a flat mapping of names to tensors: the flat state dict is the
    original), or where even the nesting alone would pass the metadata limits.

    Args:
        root: the loaded object (a mapping).
        path: keys from ``root`` to the state dict that was packed.
        state: that state dict, training state still in it (it is left out, and listed).
        names: the tensors packed, by their flat names (``state`` flattened with dots).
        training: keys of training state, left out.
    """
    for with_plain in (True, False):
        describer = _Describer(tuple(path), names, training, with_plain)
        tree = describer.outside(root, 0, "", state)
        if tree == {"tensors": ""}:
            return Described(None, describer.left_out)
        left = describer.left_out
        listed = left[:MAX_LEFT_OUT] + ([f"and {len(left) - MAX_LEFT_OUT} more"] if len(left) > MAX_LEFT_OUT else [])
        try:
            text = json.dumps({"tree": tree, "left_out": listed}, ensure_ascii=True, separators=(",", ":"),
                              allow_nan=False)
        except (ValueError, RecursionError):
            continue
        if metadata_problem(STRUCTURE_KEY, text) is None:
            return Described(text, left, describer.kept, with_plain)
    return Described(None)


def _json_key(key: Any) -> bool:
    """Whether a dict key can be a JSON scalar that reads back as itself."""
    return isinstance(key, _KEY_TYPES) and not (isinstance(key, float) and not math.isfinite(key))


def _join(label: str, key: Any) -> str:
    return f"{label}.{key}" if label else str(key)


def _is_exactly(obj: Mapping, prefix: str, names: Mapping[str, Any]) -> bool:
    """Whether the file's tensors named PREFIX... are exactly ``obj``'s entries, in order."""
    if not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        return False
    mine = [n for n in names if n.startswith(prefix)]
    return mine == [f"{prefix}{k}" for k in obj] and all(names[f"{prefix}{k}"] is v for k, v in obj.items())


def _holds_tensor(obj: Mapping, depth: int) -> bool:
    if depth > MAX_DEPTH + 64:
        return False
    return any(isinstance(v, (torch.Tensor, torch.nn.Module)) or isinstance(v, Mapping) and _holds_tensor(v, depth + 1)
               for v in obj.values())


def _json_exact(value: Any, depth: int) -> bool:
    """Whether ``json.loads(json.dumps(value))`` gives back ``value``, types included."""
    kind = type(value)
    if kind in (str, int, bool, type(None)):
        return True
    if kind is float:
        return math.isfinite(value)
    if depth > MAX_DEPTH:
        return False
    if kind is list:
        return all(_json_exact(v, depth + 1) for v in value)
    if kind is dict:
        return all(type(k) is str and _json_exact(v, depth + 1) for k, v in value.items())
    return False


# -- rebuild (unpack side) -------------------------------------------------------------------------

def rebuild(text: str, tensors: Mapping[str, torch.Tensor], *, source: str = "the file") -> Any:
    """The checkpoint as it was packed: ``tensors`` (by flat name) put back in the nesting
    ``text`` (a ``qpack.structure`` entry) records, around its plain data.

    Raises:
        StructureError: the entry is not a structure this version understands, or it does
            not place every tensor (the message says to unpack flat instead).
    """
    hint = "; unpack it flat (--flat, or qpack.load) to get its tensors"
    try:
        doc = json.loads(text)
    except (ValueError, RecursionError):
        raise StructureError(f"{source}: its {STRUCTURE_KEY} metadata is not JSON{hint}") from None
    if not isinstance(doc, dict) or "tree" not in doc:
        raise StructureError(f"{source}: its {STRUCTURE_KEY} metadata has no 'tree'{hint}")
    placed: set[str] = set()
    try:
        obj = _build(doc["tree"], tensors, placed, 0)
    except StructureError as exc:
        raise StructureError(f"{source}: its {STRUCTURE_KEY} metadata {exc}{hint}") from None
    missing = [name for name in tensors if name not in placed]
    if missing:
        raise StructureError(f"{source}: its {STRUCTURE_KEY} metadata places no tensor {missing[0]!r}{hint}")
    return obj


def _build(node: Any, tensors: Mapping[str, torch.Tensor], placed: set[str], depth: int) -> Any:
    if depth > 3 * MAX_DEPTH:
        raise StructureError(f"nests more than {3 * MAX_DEPTH} levels")
    if not isinstance(node, dict) or len(node) != 1:
        raise StructureError(f"has a node that is not an object with one key: {_short(node)}")
    (kind, value), = node.items()
    if kind == "json":
        return value
    if kind == "tensor":
        if not isinstance(value, str) or value not in tensors:
            raise StructureError(f"names a tensor {_short(value)} that the file does not hold")
        placed.add(value)
        return tensors[value]
    if kind == "tensors":
        if not isinstance(value, str):
            raise StructureError(f"has a 'tensors' prefix that is not a string: {_short(value)}")
        found = {name[len(value):]: tensor for name, tensor in tensors.items() if name.startswith(value)}
        placed.update(value + key for key in found)
        return found
    if kind == "float":
        if value not in _NON_FINITE:
            raise StructureError(f"has a 'float' that is not nan, inf or -inf: {_short(value)}")
        return _NON_FINITE[value]
    if kind in ("list", "tuple"):
        if not isinstance(value, list):
            raise StructureError(f"has a {kind!r} that is not an array: {_short(value)}")
        items = [_build(item, tensors, placed, depth + 1) for item in value]
        return items if kind == "list" else tuple(items)
    if kind == "dict":
        if not isinstance(value, list):
            raise StructureError(f"has a 'dict' that is not an array of pairs: {_short(value)}")
        out: dict = {}
        for pair in value:
            if not isinstance(pair, list) or len(pair) != 2 or not isinstance(pair[0], _KEY_TYPES):
                raise StructureError(f"has a 'dict' entry that is not a [key, node] pair: {_short(pair)}")
            out[pair[0]] = _build(pair[1], tensors, placed, depth + 1)
        return out
    raise StructureError(f"has a node of unknown kind {_short(kind)} (written by a newer qpack?)")


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
