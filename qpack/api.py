"""The Python API: pack, load, load_into, unpack, info, verify."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .checkpoint import from_mapping
from .codecs import derived
from .dtypes import dtype_from_name, itemsize
from .encoder import TensorReport, encode_derived, encode_tensor, error_energy, snr_db, storage_of
from .errors import InputError
from .format import MAGIC, TensorEntry, default_max_bytes, param_values
from .parallel import default_workers, ordered_map, torch_threads
from .policy import Policy, normalized_outputs
from .reader import MaxBytes, QpkReader, decode_stored
from .sources import open_source
from .structure import STRUCTURE_KEY, rebuild
from .writer import QpkWriter, atomic_output, check_output_path

__all__ = ["pack", "load", "load_into", "unpack", "info", "verify", "diff", "load_state", "PackReport",
           "TensorReport", "DiffRow", "SweepRow", "sweep", "Progress"]

#: progress callback: (tensor name, tensors done, tensors in all)
Progress = Callable[[str, int, int], None]

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
    #: with --target-bpw or --max-error: the objective, quality floor (dB) and predicted error
    allocation: dict[str, Any] | None = None
    #: ``info`` only: the file's format version and the bytes it spends besides its payloads
    #: (preamble, header, padding; spec 1)
    format_version: int | None = None
    container_bytes: int | None = None

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
            "allocation": None if self.allocation is None else json_safe(dict(self.allocation)),
            "format_version": self.format_version,
            "container_bytes": self.container_bytes,
            "tensors": [json_safe(asdict(t)) for t in self.tensors],
        }


def json_safe(row: dict[str, Any]) -> dict[str, Any]:
    """The row with non-finite floats as None (JSON has no NaN or Infinity)."""
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
    prune: float | None = None,
    exact_zero: bool = False,
    rans: str = "auto",
    param_dtype: str = "auto",
    target_bpw: float | None = None,
    max_error: float | None = None,
    sensitivity: Mapping[str, float] | None = None,
    allocate_granularity: str | Iterable[str] | None = None,
    force: bool = False,
    metadata: Mapping[str, str] | None = None,
    trust_pickle: bool = False,
    progress: Progress | None = None,
    threads: int | None = None,
    **policy_options: Any,
) -> PackReport:
    """Quantize a state dict and write it as a .qpk file.

    Args:
        source: a checkpoint path (.pt/.pth/.bin/.ckpt), a state dict, or a module.
        out_path: the .qpk file to write (atomically; see ``force``).
        bits: index width for quantized tensors, 1..16.
        method: "uniform" (min/max grid) or "kmeans" (codebook of at most 2**bits centroids).
        granularity: "tensor", "channel" (per output channel) or "group:G" (per run of G
            elements, 16 <= G <= 65536).
        bias_bits: also quantize 1-D float tensors at this width (None keeps them raw).
        exclude: glob patterns of names kept raw.
        bit_overrides: ``{glob: bits}`` for matching tensors.
        min_numel: float tensors with fewer elements stay raw.
        prune: zero this fraction of the smallest weights of each quantized tensor; zero is
            then an exact level, and runs of zeros cost little after compression.
        exact_zero: give every grid or codebook an exact 0 level without pruning (a uniform
            range widens by less than a step): zeros stay zeros, and the near-zero bulk of
            L1-trained or sparse weights lands on 0 instead of on the nearest level.
        rans: when indices are rANS-coded (spec 4.1): "auto" when that saves at least 5 %
            over zstd, "always" when it saves anything, "never" (files that load at
            unpacking speed; rANS decodes at 20-140 M indices/s per core, more for larger
            tensors).
        param_dtype: element type of stored min/max and codebooks: "float32", "float16" or
            "auto" (float16 for group granularity, float32 otherwise); see
            :class:`qpack.Policy`.
        target_bpw: choose each quantized tensor's bits (1 to 8; ``bits`` is then unused),
            granularity (see ``allocate_granularity``) and method (``method``, and k-means per
            tensor) so that the whole file has at most this many bits per weight, with the
            least predicted error: relative errors squared, summed per layer, the first and
            last layers weighted more (qpack.allocate), no tensor below the quality floor
            (``min_snr_db``). Candidates are predicted from histograms; the chosen ones are encoded.
        max_error: instead of ``target_bpw``, the smallest file whose predicted error,
            ``sqrt(sum_t w_t rel_t^2 / sum_t w_t)`` over the quantized tensors (``rel_t`` a
            tensor's ``rel_rms``, ``w_t`` its weight in the objective), is at most this.
        sensitivity: with ``target_bpw`` or ``max_error``, ``{name: weight}`` from
            :func:`qpack.measure_sensitivity` (or ``qpack.sensitivity.load_sensitivity``):
            the objective then weighs each tensor's rel^2 by numel * weight (1 for names it
            lacks) instead of per layer.
        allocate_granularity: with ``target_bpw`` or ``max_error``, the granularities tried
            for each tensor ("tensor,channel,group:64" or a list of those); by default
            ``granularity``, "channel" (uniform only: per-row k-means fits are slow) and
            "tensor". Each one adds 8 trial encodes per tensor.
        force: overwrite an existing ``out_path``.
        metadata: extra string-to-string entries stored in the file.
        trust_pickle: allow checkpoints holding arbitrary pickled objects (runs their code).
        progress: called after each tensor with (name, done, total).
        threads: tensors encoded side by side (default: one per two cores, at most 4); each holds
            its tensor's temporaries, so memory grows with it.
        policy_options: further :class:`qpack.policy.Policy` fields, e.g. ``min_snr_db=12.0``
            (the allocation's quality floor, 13 dB SNR per quantized tensor by default),
            ``allow_below_floor=True`` or ``rounding="nearest"`` (balanced by default).

    Returns:
        A PackReport with one row per tensor and the totals.

    Raises:
        InputError: bad options or an unusable checkpoint; a target met only below the
            quality floor (the message names the smallest target met above it).
        OutputExistsError: ``out_path`` exists and ``force`` is False.
    """
    started = time.perf_counter()
    unknown = sorted(set(policy_options) - {f.name for f in dataclasses.fields(Policy)})
    if unknown:
        raise InputError(f"unknown packing option {unknown[0]!r}")
    policy = Policy(bits=bits, method=method, granularity=granularity, bias_bits=bias_bits,
                    exclude=tuple(exclude), bit_overrides=tuple((bit_overrides or {}).items()),
                    min_numel=min_numel, prune=prune, exact_zero=exact_zero, rans=rans,
                    param_dtype=param_dtype, **policy_options)
    out_path = Path(out_path)
    check_output_path(out_path, force)
    if isinstance(source, (str, os.PathLike)):
        checkpoint = open_source(source, trust_pickle=trust_pickle)
        provenance = {"qpack.source": Path(source).name}
        if Path(source).is_file():
            provenance["qpack.source_sha256"] = _sha256(Path(source))
    else:
        checkpoint = from_mapping(source)
        provenance = {}
    if policy.normalized is None and policy.channel_spread is not None:
        policy = dataclasses.replace(policy, normalized=normalized_outputs(checkpoint.tensors))
    extra = {}
    for key, value in (metadata or {}).items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise InputError("metadata keys and values must be strings")
        extra[key] = value

    def file_metadata(candidates: tuple[str, ...], summary: dict[str, Any] | None) -> dict[str, str]:
        options = _options(policy, target_bpw, max_error, candidates, summary)
        structure = {} if checkpoint.structure is None else {STRUCTURE_KEY: checkpoint.structure}
        return {"qpack.version": __version__, **provenance, "qpack.options": json.dumps(options, sort_keys=True),
                **structure, **checkpoint.scalars, **extra}

    candidates: tuple[str, ...] = ()
    summary = None
    planned: dict[str, Any] = {}
    notes = list(checkpoint.notes)
    if target_bpw is not None or max_error is not None:
        from .allocate import candidate_granularities, plan

        candidates = candidate_granularities(policy, allocate_granularity)
        with torch_threads(1):  # trial encodes, one tensor at a time: see qpack.parallel
            chosen = plan(checkpoint.tensors, policy, target_bpw, sensitivity, max_error=max_error,
                          granularities=candidates, metadata=lambda summary: file_metadata(candidates, summary))
        summary = chosen.summary()
        planned = dict(chosen.encoded)
        notes += _allocation_notes(chosen, target_bpw)
        allocation = f"--target-bpw {target_bpw}" if max_error is None else f"--max-error {max_error}"
        choices = chosen.choices.items()
        policy = dataclasses.replace(
            policy, bits_by_name=tuple((name, c.bits) for name, c in choices),
            granularity_by_name=tuple((name, c.granularity) for name, c in choices),
            method_by_name=tuple((name, c.method) for name, c in choices),
            span_by_name=tuple((name, c.span) for name, c in choices if c.span != 1.0), allocation=allocation)
    elif sensitivity is not None or allocate_granularity is not None:
        what = "sensitivity weighs errors" if sensitivity is not None else "allocate_granularity lists choices"
        raise InputError(f"{what} for target_bpw or max_error (--target-bpw, --max-error); give one of them")
    meta = file_metadata(candidates, summary)
    rows: list[TensorReport] = []
    with QpkWriter(out_path, overwrite=force, metadata=meta) as writer:
        total = len(checkpoint.tensors)

        def encode_one(name: str, tensor: torch.Tensor) -> tuple[Any, Any, TensorReport]:
            decision = policy.decide(name, tensor)
            done = planned.pop(name, None)
            if done is not None and dataclasses.replace(done[0], reason="") == dataclasses.replace(decision, reason=""):
                _, entry, payload, row = done  # the allocation encoded this very decision already
                row.reason = decision.reason
                return dataclasses.replace(entry), payload, row
            return encode_tensor(name, tensor, decision)

        masks = derived.find_sources(checkpoint.tensors) if policy.derive_masks else {}
        sources = _SharedEncodes(encode_one, masks)

        def encode(item: tuple[str, torch.Tensor]) -> tuple[Any, Any, TensorReport]:
            name, tensor = item
            if name in sources:
                entry, payload, row = sources.get(name, tensor)
                return dataclasses.replace(entry), payload, row
            source = masks.get(name)
            if source is None:
                return encode_one(name, tensor)
            source_entry, source_payload, _ = sources.get(source, checkpoint.tensors[source])
            if derived.matches(tensor, decode_stored(source_entry, source_payload)):
                return encode_derived(name, tensor, source)
            entry, payload, row = encode_one(name, tensor)
            # quantization moved a value of the source to 0 (or a 0 off it): the mask says otherwise
            row.reason += "; a mask, but not derived: its source's zeros move when quantized"
            return entry, payload, row

        encoded = ordered_map(encode, checkpoint.tensors.items(), min(threads or default_workers(4), total))
        with closing(encoded):  # an error stops the workers here, not in the garbage collector
            for done, (entry, payload, row) in enumerate(encoded, 1):
                name = entry.name
                writer.add(entry, payload)
                row.stored_bytes = entry.length
                rows.append(row)
                log.debug("packed %s: %s", name, entry.encoding)
                if progress is not None:
                    progress(name, done, total)
        file_bytes = writer.finish()
    original = sum(r.original_bytes for r in rows)
    if original > default_max_bytes(file_bytes):
        notes.append(f"the tensors decode to {original:,} bytes, more than readers accept by default from a "
                     f"{file_bytes:,}-byte file (spec R23); load it with max_bytes=None (--max-bytes unlimited)")
    return PackReport(str(out_path), rows, file_bytes, original, notes, meta,
                      time.perf_counter() - started, _allocation_of(meta, rows))


class _SharedEncodes:
    """The encodes of the tensors masks may be derived from: each is encoded once, by its own
    turn or by its first mask's (in another thread, or before it in file order), and kept
    until it and all its masks have taken it (so a checkpoint holding its masks after every
    weight keeps those weights' stored bytes, about the file's size, until the masks come).

    A mask's worker encodes the source itself when nobody has started it, so no worker
    waits for an item ``ordered_map`` has not yet submitted.
    """

    def __init__(self, encode: Callable[[str, torch.Tensor], Any], masks: Mapping[str, str]) -> None:
        self._encode = encode
        self._lock = threading.Lock()
        self._uses: dict[str, int] = {}
        for source in masks.values():
            self._uses[source] = self._uses.get(source, 1) + 1  # the source itself and each mask
        self._slots: dict[str, Future[Any]] = {}

    def __contains__(self, name: object) -> bool:
        return name in self._uses

    def get(self, name: str, tensor: torch.Tensor) -> Any:
        with self._lock:
            slot = self._slots.get(name)
            mine = slot is None
            if mine:
                slot = self._slots[name] = Future()
            self._uses[name] -= 1
            if self._uses[name] == 0:
                del self._slots[name]  # the last user: nothing keeps its payload after this
        if mine:
            try:
                slot.set_result(self._encode(name, tensor))
            except BaseException as exc:
                slot.set_exception(exc)
                raise
        return slot.result()


def _allocation_notes(chosen: Any, target_bpw: float | None) -> list[str]:
    """What the allocation counted and predicts, in words."""
    from .allocate import describe_floors

    floor = "no quality floor" if chosen.min_snr_db is None else f"floor {chosen.min_snr_db:g} dB SNR per tensor"
    floor += describe_floors(chosen.tensor_floors)
    lowest = "" if chosen.lowest_snr_db is None else f", lowest {chosen.lowest_snr_db:.1f} dB"
    notes = [f"allocation: predicted error {chosen.predicted_error:.4f} (weighted RMS of the per-layer relative "
             f"errors, {chosen.objective}); {floor}{lowest}"]
    if target_bpw is not None:
        notes.append(f"budget: {chosen.budget_bytes:,} bytes for --target-bpw {target_bpw:g}: {chosen.fixed_bytes:,} "
                     f"fixed (header, metadata, lossless tensors, alignment), "
                     f"{chosen.budget_bytes - chosen.fixed_bytes:,} left for the quantized weights, "
                     f"which take {chosen.quantized_bytes:,}")
    if chosen.below_floor:
        notes.append(f"below the quality floor: {', '.join(chosen.below_floor)}")
    return notes


def _allocation_of(metadata: Mapping[str, str], rows: list[TensorReport]) -> dict[str, Any] | None:
    """The allocation summary recorded in a file's options, if any (None for files without one),
    with the lowest SNR and the tensors below the floor, from the rows."""
    try:
        options = json.loads(metadata.get("qpack.options", "null"))
    except ValueError:
        return None
    found = options.get("allocation") if isinstance(options, dict) else None
    if not isinstance(found, dict):
        return None
    floor = found.get("min_snr_db")
    own = found.get("tensor_floors")
    # a file may hold anything there: keep the numbers (the floors info shows and counts by)
    own = {name: dB for name, dB in own.items() if isinstance(dB, (int, float)) and not isinstance(dB, bool)
           } if isinstance(own, dict) else {}
    snrs = {r.name: r.snr_db for r in rows if r.encoding != "raw" and isinstance(r.snr_db, (int, float))}
    return {"target_bpw": options.get("target_bpw"), "max_error": options.get("max_error"), **found,
            "tensor_floors": own, "lowest_snr_db": min(snrs.values(), default=None),
            "below_floor": [name for name, snr in snrs.items()
                            if isinstance(floor, (int, float)) and snr < own.get(name, floor)]}


def _options(policy: Policy, target_bpw: float | None, max_error: float | None,
             candidates: tuple[str, ...], summary: dict[str, Any] | None = None) -> dict[str, Any]:
    # An allocation records its summary; what each tensor got is in its header entry, so the
    # allocated_* keys (kept for plain packs, whose bytes stay as they were) are left out.
    allocated: dict[str, Any] = {"allocated_bits": None, "allocated_granularity": None}
    if summary is not None:
        allocated = {"allocation": summary}
    return {"target_bpw": _float_or_none(target_bpw), "max_error": _float_or_none(max_error),
            "allocate_granularity": list(candidates) or None, **allocated,
            "bits": policy.bits, "method": policy.method, "granularity": policy.granularity,
            "bias_bits": policy.bias_bits, "exclude": list(policy.exclude),
            "bit_overrides": dict(policy.bit_overrides), "min_numel": policy.min_numel,
            "prune": policy.prune, "exact_zero": policy.exact_zero, "rans": policy.rans,
            "param_dtype": policy.param_dtype, "rounding": policy.rounding}


def _float_or_none(value: float | None) -> float | None:
    return None if value is None else float(value)  # a numpy scalar is not JSON


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# -- read side ---------------------------------------------------------------------------------

def load(path: str | os.PathLike[str], device: str | torch.device = "cpu", *,
         threads: int | None = None, progress: Progress | None = None,
         max_bytes: MaxBytes = "auto", nested: bool = False) -> Any:
    """Read a .qpk file back into a state dict.

    Quantized tensors are unpacked and dequantized on ``device``: only the packed indices and
    their parameters travel there. Tensors come back in their original dtype and shape.

    Args:
        path: the .qpk file.
        device: where the tensors are built ("cpu", "cuda", "cuda:1", ...).
        threads: decoding threads (default: one per two cores, at most 8; on 2-3 cores, two
            helper threads read and decompress while this thread dequantizes).
        progress: called after each tensor with (name, done, total).
        max_bytes: the most bytes the tensors may take in all (spec R23): "auto" for 256
            times the file's size, at least 16 MiB; a number; None for no bound.
        nested: give back the checkpoint as it was packed, when its ``qpack.structure``
            metadata records one (``{"model_state": {...}, "config": {...}}``: the state
            dict where it sat, beside the plain data kept; see the module qpack.structure);
            else, and by default, the flat state dict.

    Returns:
        ``{name: tensor}`` in the order they were packed (with ``nested``, the checkpoint).

    Raises:
        InputError: the path is missing or not a file; with ``nested``, a structure entry
            that cannot be rebuilt (StructureError).
        FormatError: the file is not a valid .qpk.
        OutOfMemoryError: the tensors would take more than ``max_bytes``, or an allocation
            failed (the message names the tensor and the bytes).
    """
    device = torch.device(device)
    with QpkReader(path, max_bytes=max_bytes) as reader:
        names = reader.keys()
        structure = reader.metadata.get(STRUCTURE_KEY) if nested else None
        # derived tensors (spec 3.5) last, from their sources as decoded here: no source twice
        stored = [n for n in names if reader.entry(n).encoding != "derived"]
        with _decoded(reader, stored, device, threads) as decoded:
            state = _collect(stored, decoded, progress, len(names))
        for done, name in enumerate((n for n in names if n not in state), len(state) + 1):
            entry = reader.entry(name)
            state[name] = derived.decode(state[entry.params["source"]], dtype_from_name(entry.dtype),
                                         entry.params["rule"])
            if progress is not None:
                progress(name, done, len(names))
        state = {name: state[name] for name in names}  # file order
    return state if structure is None else rebuild(structure, state, source=str(path))


#: how far (payload bytes, as packed) a load's helper threads may inflate ahead of the
#: dequantization: the extra memory a load holds at most, besides the tensors themselves
INFLATE_AHEAD_BYTES = 64 << 20


def _payload_bytes(entry: TensorEntry) -> int:
    # what an inflated payload holds: its decompressed bytes, or the stored ones (uncompressed)
    return max(entry.raw_length, entry.length)


@contextmanager
def _decoded(reader: QpkReader, names: list[str], device: torch.device,
             threads: int | None) -> Iterator[Iterator[torch.Tensor]]:
    """The tensors ``names`` in order, decoded on ``threads`` workers (default: see
    ``default_workers``).

    Where the default is one worker but a second core is there (2-3 cores), a helper
    thread inflates the payloads (read, zstd, rANS) while this thread dequantizes them into
    output it allocates itself: on the 2-core machine a 25 M-parameter 8-bit load took 28-30
    ms against 41 for one thread (torch.load of the fp32 file: 22 ms), where whole tensors
    decoded on two workers took 50 (their outputs, allocated on the workers, fault in fresh
    pages). The helpers run up to INFLATE_AHEAD_BYTES of payload ahead: with only two
    payloads in flight the same load took 41-47 ms.

    A context manager, so that an error while the tensors are taken stops the workers before
    the reader closes (see ``ordered_map``).
    """
    workers = min(threads or default_workers(), max(len(names), 1))
    if threads is None and workers == 1 and device.type == "cpu" and (os.cpu_count() or 1) >= 2:
        with closing(ordered_map(lambda n: reader.inflate(n, device), names, 2,
                                 ahead=lambda n: _payload_bytes(reader.entry(n)),
                                 ahead_limit=INFLATE_AHEAD_BYTES)) as inflated:
            yield (reader.finish(payload, device) for payload in inflated)
        return
    with closing(ordered_map(lambda n: reader.tensor(n, device), names, workers)) as tensors:
        yield tensors


def _collect(names: list[str], tensors: Iterable[torch.Tensor], progress: Progress | None,
             total: int | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for done, (name, tensor) in enumerate(zip(names, tensors), 1):
        state[name] = tensor
        if progress is not None:
            progress(name, done, len(names) if total is None else total)
    return state


def load_into(module: torch.nn.Module, path: str | os.PathLike[str], strict: bool = True, *,
              packed: bool = False) -> Any:
    """Load a .qpk file into a module's parameters and buffers (on the module's device).

    Args:
        module: the model.
        path: the .qpk file.
        strict: as for ``load_state_dict``: every key must match.
        packed: keep quantized weights packed (qpack.packed): each ``nn.Linear``,
            ``nn.Conv1d/2d/3d``, ``nn.Embedding`` and transformers ``Conv1D`` whose weight
            the file stores at 8 bits or fewer is replaced by a layer that holds the indices
            (one byte, or half a byte, each) and rebuilds its weight inside ``forward``, or
            runs a quantized matmul kernel. Everything else loads as usual. The model's
            ``state_dict()`` still holds the rebuilt weights, equal to ``qpack.load``'s.

    Returns:
        What ``module.load_state_dict`` returns (missing and unexpected keys).
    """
    own = module.state_dict()
    first = next(iter(own.values()), None)
    device = first.device if first is not None else torch.device("cpu")
    with QpkReader(path, max_bytes=None) as header_only:  # names only: nothing is decoded here
        problem = _wrapper_prefix_problem(own.keys(), header_only.keys())
    if problem is not None:
        raise InputError(f"{path}: {problem}")
    if not packed:
        return module.load_state_dict(load(path, device), strict=strict)
    from .packed import pack_modules

    with QpkReader(path) as reader:
        done = pack_modules(module, reader, device)  # one tensor decoded at a time
        rest = {name: reader.tensor(name, device) for name in reader.keys() if name not in done}
    return module.load_state_dict(rest, strict=strict)


#: prefixes that wrappers add to every name: DataParallel / DistributedDataParallel, torch.compile
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _wrapper_prefix_problem(model_names: Iterable[str], file_names: Iterable[str]) -> str | None:
    """Why the names cannot match when a wrapper's prefix is all that differs, else None."""
    model_names, file_names = set(model_names), set(file_names)
    if model_names == file_names or not model_names or not file_names:
        return None
    for prefix in _WRAPPER_PREFIXES:
        for having, lacking, flip in ((file_names, model_names, False), (model_names, file_names, True)):
            if all(n.startswith(prefix) for n in having) and {n[len(prefix):] for n in having} == lacking:
                what = "the model's names" if flip else "the file's names"
                other = "the file's" if flip else "the model's"
                return (f"{what} all start with {prefix!r} (a DataParallel, DistributedDataParallel or "
                        f"torch.compile wrapper) and {other} do not: load the unwrapped model "
                        f"(model.module or model._orig_mod), or rename with "
                        f"{{k.removeprefix({prefix!r}): v for k, v in qpack.load(path).items()}}")
    return None


def unpack(src: str | os.PathLike[str], dst: str | os.PathLike[str], *, force: bool = False,
           format: str | None = None, progress: Progress | None = None,
           max_bytes: MaxBytes = "auto", flat: bool = False) -> Path:
    """Write a .qpk file back as a checkpoint (atomically).

    A "pt" file holds what was packed, nested as it was (``load(nested=True)``): the state
    dict where it sat and the plain data kept beside it; what packing left out (optimizer
    state, objects) stays out. Safetensors holds the flat state dict, with the file's metadata.

    Args:
        src: the .qpk file.
        dst: the output file.
        force: overwrite an existing ``dst``.
        format: "pt" (``torch.save``) or "safetensors"; by default ``dst``'s extension
            decides (.safetensors, else pt).
        progress: called after each tensor is decoded.
        max_bytes: as for :func:`load`.
        flat: write the flat state dict (``qpack.load``'s names) even where the file
            records a nesting.

    Raises:
        OutputExistsError: ``dst`` exists and ``force`` is False.
        InputError: an unknown format; a structure entry that cannot be rebuilt.
        OutOfMemoryError: as for :func:`load`.
    """
    dst = Path(dst)
    format = format or ("safetensors" if dst.suffix == ".safetensors" else "pt")
    if format not in ("pt", "safetensors"):
        raise InputError(f"unknown output format {format!r}; choose pt or safetensors")
    check_output_path(dst, force)
    state = load(src, progress=progress, max_bytes=max_bytes, nested=not flat and format == "pt")
    if format == "safetensors":
        try:
            from safetensors.torch import save
        except ImportError:
            raise InputError("writing safetensors needs the safetensors package (pip install safetensors)") from None
        with QpkReader(src, max_bytes=None) as reader:  # the header only
            metadata = dict(reader.metadata)
        data = save(state, metadata=metadata)
        with atomic_output(dst, force) as handle:
            handle.write(data)
        return dst
    with atomic_output(dst, force) as handle:
        torch.save(state, handle)
    return dst


def info(path: str | os.PathLike[str]) -> PackReport:
    """Describe a .qpk file from its header alone (no payload is decoded, so no bound on
    decoded bytes applies). Stats that are not counts (NaN, negative, huge) show as None."""
    with QpkReader(path, max_bytes=None) as reader:
        rows = []
        for entry in reader.entries.values():
            stats = entry.stats
            rows.append(TensorReport(
                entry.name, list(entry.shape), entry.dtype, entry.encoding, entry.bits,
                entry.granularity, entry.numel * itemsize(entry.dtype), entry.length,
                _count_or_none(stats.get("unique_before")), _count_or_none(stats.get("unique_after")),
                _finite_or_none(stats.get("rel_rms")), _finite_or_none(stats.get("snr_db")),
                params=_header_params(entry), storage=storage_of(entry),
                param_dtype=entry.param_dtype if entry.encoding not in ("raw", "derived") else None))
        size = os.path.getsize(path)
        original = sum(r.original_bytes for r in rows)
        metadata = dict(reader.metadata)
        return PackReport(str(path), rows, size, original, metadata=metadata,
                          allocation=_allocation_of(metadata, rows), format_version=reader.version,
                          container_bytes=size - sum(r.stored_bytes for r in rows))


#: stats above this are not counts a tensor can have (R11 allows 2^48 elements)
_MAX_COUNT = 1 << 48


def _count_or_none(value: Any) -> int | None:
    """A stats value as a count: a whole number in 0..2^48, else None (R21 allows any number)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # NaN and the infinities are not integers
    return value if isinstance(value, int) and 0 <= value <= _MAX_COUNT else None


def _finite_or_none(value: Any) -> float | None:
    """A stats value as a finite float, else None (huge ints would not print as floats)."""
    if isinstance(value, int):
        value = float(value) if abs(value) < 1 << 1000 else math.inf
    return value if isinstance(value, float) and math.isfinite(value) else None


def _header_params(entry: TensorEntry) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in entry.params.items():
        if isinstance(value, bytes):
            array = param_values(entry, key)
            out[key] = array.tolist() if array.size <= 4096 else f"{array.size} values"
        else:
            out[key] = value
    return out


def verify(path: str | os.PathLike[str], *, progress: Progress | None = None,
           max_bytes: MaxBytes = "auto") -> int:
    """Check a whole file: every rule, every checksum, every payload decoded.

    Tensors are checked one at a time, and those over 64 MiB in pieces
    (:meth:`QpkReader.check`), so memory stays bounded whatever the file holds; ``max_bytes``
    still bounds the work (the same bound as :func:`load`, so a file ``verify`` accepts
    also loads).

    Args:
        path: the .qpk file.
        progress: called after each tensor with (name, done, total).
        max_bytes: as for :func:`load`.

    Returns:
        The number of tensors checked.

    Raises:
        FormatError: the first problem found (its message names the tensor and the rule).
        OutOfMemoryError: the tensors decode to more than ``max_bytes`` (R23).
    """
    with QpkReader(path, max_bytes=max_bytes) as reader:
        names = reader.keys()
        for done, name in enumerate(names, 1):
            reader.check(name)
            if progress is not None:
                progress(name, done, len(names))
        return len(names)

def load_state(path: str | os.PathLike[str], *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Any supported file as a state dict: a .qpk is decoded, anything else is read as a checkpoint."""
    path = Path(path)
    if path.is_file():
        with open(path, "rb") as handle:
            if handle.read(len(MAGIC)) == MAGIC:
                return load(path)
    return dict(open_source(path, trust_pickle=trust_pickle).tensors.items())


@dataclass
class DiffRow:
    """How one tensor differs between two checkpoints."""

    name: str
    shape: list[int]
    max_abs: float
    rms: float
    snr_db: float | None
    equal: bool


def diff(a: str | os.PathLike[str], b: str | os.PathLike[str]) -> tuple[list[DiffRow], list[str], list[str]]:
    """Compare two checkpoints (.qpk, .pt, .safetensors, ...) tensor by tensor.

    Returns:
        (rows for the names both hold, names only in ``a``, names only in ``b``).

    Raises:
        InputError: a tensor has different shapes in the two files.
    """
    left, right = load_state(a), load_state(b)
    rows = []
    for name, x in left.items():
        if name not in right:
            continue
        y = right[name]
        if x.shape != y.shape:
            raise InputError(f"tensor {name!r} has shape {list(x.shape)} in {a} but {list(y.shape)} in {b}")
        signal, noise = error_energy(x, y)
        max_abs = float((y.to(torch.float64) - x.to(torch.float64)).abs().max()) if x.numel() else 0.0
        rows.append(DiffRow(name, list(x.shape), max_abs, math.sqrt(noise / max(x.numel(), 1)),
                            snr_db(signal, noise), bool(torch.equal(x, y))))
    return rows, [n for n in left if n not in right], [n for n in right if n not in left]


@dataclass
class SweepRow:
    """One packing setting tried by ``sweep``."""

    method: str
    bits: int
    granularity: str
    file_bytes: int
    bits_per_weight: float
    snr_db: float | None
    pack_seconds: float
    load_seconds: float


def sweep(path: str | os.PathLike[str], *, methods: Iterable[str] = ("uniform", "kmeans"),
          bits: Iterable[int] = (2, 3, 4, 8), granularities: Iterable[str] = ("tensor", "channel"),
          trust_pickle: bool = False, progress: Callable[[str], None] | None = None) -> list[SweepRow]:
    """Pack one checkpoint every way asked and measure each result, so a user can choose.

    SNR is over the quantized tensors, measured on the tensors loaded back from each file;
    bits per weight count the whole file against every element of every tensor.
    """
    import tempfile

    state = load_state(path, trust_pickle=trust_pickle)
    params = sum(t.numel() for t in state.values())
    rows: list[SweepRow] = []
    with tempfile.TemporaryDirectory(prefix="qpack-sweep-") as folder:
        target = Path(folder) / "sweep.qpk"
        for method in methods:
            for granularity in granularities:
                if method == "kmeans" and granularity != "tensor":
                    continue  # per-channel codebooks rarely pay for their size
                for width in bits:
                    if progress is not None:
                        progress(f"{method} {width}-bit {granularity}")
                    started = time.perf_counter()
                    report = pack(state, target, bits=width, method=method, granularity=granularity, force=True)
                    packed = time.perf_counter() - started
                    started = time.perf_counter()
                    loaded = load(target)
                    loaded_in = time.perf_counter() - started
                    energies = [error_energy(state[row.name], loaded[row.name])
                                for row in report.tensors if row.encoding != "raw"]
                    snr = snr_db(sum(e[0] for e in energies), sum(e[1] for e in energies))
                    rows.append(SweepRow(method, width, granularity, report.file_bytes,
                                         report.file_bytes * 8 / max(params, 1), snr, packed, loaded_in))
    return rows
