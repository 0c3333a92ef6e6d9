"""The Python API: pack, load, load_into, unpack, info, verify."""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import time
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from . import __version__
from .checkpoint import from_mapping, read_checkpoint
from .dtypes import itemsize
from .encoder import TensorReport, encode_tensor
from .errors import InputError
from .format import TensorEntry
from .policy import Policy
from .reader import QpkReader, decode_payload
from .writer import QpkWriter, atomic_output, check_output_path

__all__ = ["pack", "load", "load_into", "unpack", "info", "verify", "PackReport", "TensorReport"]

log = logging.getLogger("qpack")


@dataclass
class PackReport:
    """The result of ``pack`` or ``info``: per-tensor rows and totals."""

    path: str
    tensors: list[TensorReport]
    file_bytes: int
    original_bytes: int
    notes: list[str] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
    seconds: float | None = None

    @property
    def ratio(self) -> float:
        """File size as a fraction of the tensors' original size."""
        return self.file_bytes / self.original_bytes if self.original_bytes else float("nan")

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict with stable keys."""
        return {
            "path": self.path,
            "file_bytes": self.file_bytes,
            "original_bytes": self.original_bytes,
            "ratio": None if math.isnan(self.ratio) else self.ratio,
            "seconds": self.seconds,
            "notes": list(self.notes),
            "metadata": dict(self.metadata),
            "tensors": [_json_safe(asdict(t)) for t in self.tensors],
        }


def _json_safe(row: dict[str, Any]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}


# -- pack ------------------------------------------------------------------------------------

def pack(
    source: str | os.PathLike[str] | Mapping[str, Any] | torch.nn.Module,
    out_path: str | os.PathLike[str],
    *,
    bits: int = 8,
    method: str = "uniform",
    granularity: str = "tensor",
    bias_bits: int | None = None,
    exclude: Iterable[str] = (),
    bit_overrides: Mapping[str, int] | None = None,
    min_numel: int = 64,
    force: bool = False,
    metadata: Mapping[str, str] | None = None,
    trust_pickle: bool = False,
) -> PackReport:
    """Quantize a state dict and write it as a .qpk file.

    Args:
        source: a checkpoint path (.pt/.pth/.bin/.ckpt), a state dict, or a module.
        out_path: the .qpk file to write (atomically; see ``force``).
        bits: index width for quantized tensors, 1..16.
        method: "uniform" (min/max grid) or "kmeans" (codebook of at most 2**bits centroids).
        granularity: "tensor" or "channel" (per output channel).
        bias_bits: also quantize 1-D float tensors at this width (None keeps them raw).
        exclude: glob patterns of names kept raw.
        bit_overrides: ``{glob: bits}`` for matching tensors.
        min_numel: float tensors with fewer elements stay raw.
        force: overwrite an existing ``out_path``.
        metadata: extra string-to-string entries stored in the file.
        trust_pickle: allow checkpoints holding arbitrary pickled objects (runs their code).

    Returns:
        A PackReport with one row per tensor and the totals.

    Raises:
        InputError: bad options or an unusable checkpoint.
        OutputExistsError: ``out_path`` exists and ``force`` is False.
    """
    started = time.perf_counter()
    policy = Policy(bits=bits, method=method, granularity=granularity, bias_bits=bias_bits,
                    exclude=tuple(exclude), bit_overrides=tuple((bit_overrides or {}).items()),
                    min_numel=min_numel)
    out_path = Path(out_path)
    check_output_path(out_path, force)
    if isinstance(source, (str, os.PathLike)):
        checkpoint = read_checkpoint(source, trust_pickle=trust_pickle)
        provenance = {"qpack.source": Path(source).name, "qpack.source_sha256": _sha256(Path(source))}
    else:
        checkpoint = from_mapping(source)
        provenance = {}
    meta = {"qpack.version": __version__, **provenance,
            "qpack.options": json.dumps(_options(policy), sort_keys=True), **checkpoint.scalars}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InputError("metadata keys and values must be strings")
        meta[key] = value
    rows: list[TensorReport] = []
    with QpkWriter(out_path, overwrite=force, metadata=meta) as writer:
        for name, tensor in checkpoint.tensors.items():
            entry, payload, row = encode_tensor(name, tensor, policy.decide(name, tensor))
            writer.add(entry, payload)
            row.stored_bytes = entry.length
            rows.append(row)
            log.debug("packed %s: %s", name, entry.encoding)
        file_bytes = writer.finish()
    original = sum(r.original_bytes for r in rows)
    return PackReport(str(out_path), rows, file_bytes, original, checkpoint.notes, meta,
                      time.perf_counter() - started)


def _options(policy: Policy) -> dict[str, Any]:
    return {"bits": policy.bits, "method": policy.method, "granularity": policy.granularity,
            "bias_bits": policy.bias_bits, "exclude": list(policy.exclude),
            "bit_overrides": dict(policy.bit_overrides), "min_numel": policy.min_numel}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# -- read side ---------------------------------------------------------------------------------

def load(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
         threads: int | None = None) -> dict[str, torch.Tensor]:
    """Read a .qpk file back into a state dict.

    Quantized tensors are unpacked and dequantized on ``device``: only the packed indices and
    their parameters travel there. Tensors come back in their original dtype and shape.

    Args:
        path: the .qpk file.
        device: where the tensors are built ("cpu", "cuda", "cuda:1", ...).
        threads: decoding threads (default: up to 8, one per core).

    Returns:
        ``{name: tensor}`` in the order they were packed.

    Raises:
        InputError: the path is missing or not a file.
        FormatError: the file is not a valid .qpk.
    """
    device = torch.device(device)
    with QpkReader(path) as reader:
        names = reader.keys()
        workers = threads or min(8, os.cpu_count() or 1)
        if workers <= 1 or len(names) <= 1:
            return {name: reader.tensor(name, device) for name in names}
        with ThreadPoolExecutor(max_workers=workers) as pool:
            tensors = list(pool.map(lambda n: reader.tensor(n, device), names))
    return dict(zip(names, tensors))


def load_into(module: torch.nn.Module, path: str | os.PathLike[str], strict: bool = True) -> Any:
    """Load a .qpk file into a module's parameters and buffers (on the module's device).

    Returns:
        What ``module.load_state_dict`` returns (missing and unexpected keys).
    """
    first = next(iter(module.state_dict().values()), None)
    device = first.device if first is not None else torch.device("cpu")
    return module.load_state_dict(load(path, device), strict=strict)


def unpack(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, force: bool = False) -> Path:
    """Write a .qpk file back as a plain state dict with ``torch.save`` (atomically).

    Raises:
        OutputExistsError: ``dst`` exists and ``force`` is False.
    """
    dst = Path(dst)
    check_output_path(dst, force)
    state = load(src)
    with atomic_output(dst, force) as handle:
        torch.save(state, handle)
    return dst


def info(path: str | os.PathLike[str]) -> PackReport:
    """Describe a .qpk file from its header alone (no payload is decoded)."""
    with QpkReader(path) as reader:
        rows = []
        for entry in reader.entries.values():
            stats = entry.stats
            rows.append(TensorReport(
                entry.name, list(entry.shape), entry.dtype, entry.encoding, entry.bits,
                entry.granularity, entry.numel * itemsize(entry.dtype), entry.length,
                _int_or_none(stats.get("unique_before")), _int_or_none(stats.get("unique_after")),
                stats.get("rel_rms"), stats.get("snr_db"), params=_header_params(entry)))
        size = os.path.getsize(path)
        original = sum(r.original_bytes for r in rows)
        return PackReport(str(path), rows, size, original, metadata=dict(reader.metadata))


def _int_or_none(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) else None


def _header_params(entry: TensorEntry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entry.params.items():
        if isinstance(value, bytes):
            array = np.frombuffer(value, dtype="<f4")
            out[key] = array.tolist() if array.size <= 4096 else f"{array.size} values"
        else:
            out[key] = value
    return out


def verify(path: str | os.PathLike[str]) -> int:
    """Check a whole file: every rule, every checksum, every payload decoded.

    Returns:
        The number of tensors checked.

    Raises:
        FormatError: the first problem found (its message names the tensor and the rule).
    """
    with QpkReader(path) as reader:
        for name in reader.keys():
            decode_payload(reader.entry(name), reader.read_payload(name), "cpu")
        return len(reader)

