"""Encoding one tensor: the chosen codec, run block by block so memory stays bounded.

A quantized tensor never has more than a block's worth of float temporaries alive: the
indices are gathered in their narrowest integer type, packed, and the error statistics are
accumulated block by block.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import zstandard

from . import codecs, rans
from .bitpack import pack_bits, packed_size
from .dtypes import itemsize, name_of_dtype
from .format import PARAM_DTYPES, TensorEntry, expected_raw_length, parameter_rows
from .policy import Decision
from .prune import prune_smallest

__all__ = ["TensorReport", "encode_tensor", "encode_derived", "snr_db", "error_energy", "storage_of", "BLOCK_ELEMENTS", "UNIQUE_LIMIT"]

#: elements per block of quantization work (a multiple of 8)
BLOCK_ELEMENTS = 1 << 21
#: distinct values are counted for tensors up to this size (it takes a sorted copy)
UNIQUE_LIMIT = 1 << 24
#: zstd level of lossless tensors' payloads
ZSTD_LEVEL = 3
#: zstd level of quantized indices. Dense indices are close to independent draws from a
#: peaked distribution: level 3's match finder takes the many short repeats such data holds
#: by chance, and each match costs more than its literals would under Huffman coding. On
#: bench_formats' tensors level 1 came to 1.004-1.011 times the indices' entropy, level 3 to
#: 1.004-1.124 (5-6 bits with wider spans worst), at 3-7x the speed (about 1 GB/s)
INDEX_ZSTD_LEVEL = 1
#: indices whose most common value holds at least this share (pruned or sparse weights) have
#: long runs worth level 3's search: both levels are tried there and the smaller kept
INDEX_RUNS_SHARE = 0.25
#: a float tensor of at most this many distinct values (and at most 2^bits, each used
#: EXACT_MIN_USES times on average) is stored exactly as a codebook of them (masks from
#: torch.nn.utils.prune, already-quantized weights)
MAX_EXACT_VALUES = 256
EXACT_MIN_USES = 16
#: elements looked at first to tell a tensor of many values cheaply (a strided sample)
_EXACT_SAMPLE = 1 << 12
#: integer views of each float dtype: values are told apart by their bits (-0.0 from +0.0)
_BITS_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}
#: rANS is chosen only when it saves at least this share of the best zstd form
RANS_MIN_SAVING = {"auto": 0.05, "always": 0.0}
_local = threading.local()


@dataclass
class TensorReport:
    """What happened to one tensor (also what ``info`` shows)."""

    name: str
    shape: list[int]
    dtype: str
    encoding: str
    bits: int
    granularity: str
    original_bytes: int
    stored_bytes: int
    unique_before: int | None = None
    unique_after: int | None = None
    rel_rms: float | None = None
    snr_db: float | None = None
    reason: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    #: how the payload is stored: "none", "zstd", "zstd_planes" or "rans", with "/wN" for an
    #: N-bit container
    storage: str = ""
    #: element type of the stored parameters (quantized tensors): "float32" or "float16"
    param_dtype: str | None = None


def _compressor(level: int = ZSTD_LEVEL) -> zstandard.ZstdCompressor:
    # zstd contexts are not thread-safe; one per thread and level
    contexts = getattr(_local, "contexts", None)
    if contexts is None:
        contexts = _local.contexts = {}
    if level not in contexts:
        contexts[level] = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)
    return contexts[level]


def compress(raw: memoryview, itemsize: int = 1, levels: tuple[int, ...] = (ZSTD_LEVEL,)) -> tuple[str, memoryview | bytes]:
    """The stored form of a payload: zstd when that is smaller, else the bytes as they are.

    Each of ``levels`` is tried, the smallest frame kept (the first of equal ones). With
    ``itemsize`` >= 2 (a raw tensor's elements), zstd of the byte planes (spec 2.2,
    "zstd_planes") is tried as well and kept when it is smaller still.
    """
    best: tuple[str, memoryview | bytes] = ("none", raw)
    if len(raw) > 64:
        for level in levels:
            compressed = _compressor(level).compress(raw)
            if len(compressed) < len(best[1]):
                best = ("zstd", compressed)
        if itemsize >= 2:
            planar = _compressor().compress(codecs.raw.split_planes(raw, itemsize))
            if len(planar) < len(best[1]):
                best = ("zstd_planes", planar)
    return best


def encode_tensor(name: str, tensor: torch.Tensor, decision: Decision, *,
                  distinct: int | None = None) -> tuple[TensorEntry, memoryview | bytes, TensorReport]:
    """Encode one tensor as ``decision`` says.

    ``distinct``: the tensor's count of distinct values when the caller knows it already
    (:func:`count_distinct`; the allocation encodes one tensor dozens of times).

    Returns:
        Its header entry (offset, length and crc32 still to be filled by the writer), the
        payload to store, and its report row.

    A tensor to quantize that holds NaN or Inf is stored raw instead (spec 3.4), so no value
    is lost; the report row says so.
    """
    tensor = tensor.detach().to("cpu")
    dtype = name_of_dtype(tensor.dtype)
    assert dtype is not None, "checkpoint validation admits only table dtypes"
    shape = tuple(tensor.shape)
    row = TensorReport(name, list(shape), dtype, decision.encoding, decision.bits, decision.granularity,
                       tensor.numel() * itemsize(dtype), 0, reason=decision.reason)
    if decision.encoding != "raw" and not _finite(tensor):
        decision = Decision("raw", 0, "tensor", "holds NaN or Inf: stored raw")
        row.encoding, row.bits, row.granularity, row.reason = "raw", 0, "tensor", decision.reason
    if decision.encoding == "raw":
        entry = TensorEntry(name, dtype, shape, "raw", 0, "tensor", {},
                            raw_length=expected_raw_length(dtype, shape, "raw", 0))
        row.rel_rms = 0.0
        entry.compression, stored = compress(codecs.raw.encode(tensor), itemsize(dtype))
        row.storage = storage_of(entry)
        return entry, stored, row

    most = min(MAX_EXACT_VALUES, 1 << decision.bits, tensor.numel() // EXACT_MIN_USES)
    if decision.exact_values and not decision.prune and most >= 1 and (distinct is None or distinct <= most):
        exact = exact_codebook(tensor, most)
        if exact is not None:
            return _encode_exact(name, tensor, *exact, decision, row)
    codec = codecs.QUANTIZERS[decision.encoding]
    bits, group_size = decision.bits, decision.group_size
    original = tensor
    if decision.prune:
        tensor, pruned = prune_smallest(tensor, decision.prune)
        row.reason += f", {pruned:,} smallest pruned to 0"
    rows = parameter_rows(shape, decision.granularity, group_size)
    row_length = group_size or None
    keep_zero = bool(decision.prune) or decision.exact_zero
    span = {"span": decision.span} if decision.span != 1.0 and codec is codecs.uniform else {}
    params = codec.choose_params(tensor, bits, rows, row_length, keep_zero=keep_zero, **span)
    if codec is codecs.uniform and not keep_zero:
        # values near 0 (L1, sparse): a grid with 0 between two levels moves them all. Most
        # of the tensor's values so: every row gets an exact 0 level; else the rows most of
        # whose own values are (the live rows of an L1-trained layer, outnumbered by its dead
        # ones), unless that would cost float16 parameters (an exact 0 needs float32 ones for
        # the whole tensor: groups of 32 would pay 1 more bit per weight for a few rows)
        if codec.zero_heavy(tensor, params, bits, rows, row_length):
            heavy = torch.ones(rows, dtype=torch.bool)
        elif decision.param_dtype == "float32" and rows > 1:
            heavy = codec.zero_heavy_rows(tensor, params, bits, rows, row_length)
        else:
            heavy = torch.zeros(rows, dtype=torch.bool)
        if bool(heavy.any()):
            with_zero = codec.with_zero_rows(
                params, codec.choose_params(tensor, bits, rows, row_length, keep_zero=True, **span), heavy)
            if codec.zero_level_helps(tensor, params, with_zero, bits, rows, row_length):
                keep_zero, params = True, with_zero
                share = "" if bool(heavy.all()) else f" on {int(heavy.sum()):,} of {rows:,} rows"
                row.reason += f", many values near 0: a grid with an exact 0{share}"
    param_dtype = "float32"
    stored_params = None
    if decision.param_dtype == "uint8" and codec is codecs.uniform and not keep_zero:
        coded = codec.as_uint8(params)
        if coded is not None:
            (params, stored_params), param_dtype = coded, "uint8"
    if decision.param_dtype != "float32" and param_dtype == "float32" and not keep_zero:
        # float16 (k-means codebooks under "uint8" too); an exact zero needs float32's min and step
        half = codec.as_float16(params)
        if half is not None:
            params, param_dtype = half, "float16"
    segment = _balance_segment(decision, shape, rows, row_length) if codec is codecs.uniform else None
    indices, counts, signal, noise = _quantize_blocks(codec, tensor, original, params, bits, rows, row_length,
                                                      segment)
    if not math.isfinite(noise):
        # a level past the dtype's range (an --exact-zero grid widened past float16's 65504)
        # would decode as Inf: the tensor is stored losslessly instead
        raw = Decision("raw", 0, "tensor", f"its {bits}-bit grid overflows {dtype}: stored raw")
        entry, stored, raw_row = encode_tensor(name, original, raw)
        return entry, stored, raw_row
    width, compression, stored = _store_indices(indices, bits, counts, decision.rans)
    entry = TensorEntry(name, dtype, shape, decision.encoding, bits, decision.granularity,
                        _params_to_header(params, param_dtype, stored_params), compression=compression,
                        raw_length=expected_raw_length(dtype, shape, decision.encoding, width),
                        width=width, group_size=group_size, param_dtype=param_dtype)
    row.param_dtype = param_dtype
    if original.numel() <= UNIQUE_LIMIT:
        row.unique_before = count_distinct(original) if distinct is None else distinct
    row.unique_after = int(np.count_nonzero(counts))
    # rounded so that summation order (BLAS, thread count) cannot change the file's bytes
    row.rel_rms = float(f"{math.sqrt(noise / signal):.4g}") if signal > 0 else (0.0 if noise == 0 else math.inf)
    snr = snr_db(signal, noise)
    row.snr_db = None if snr is None else round(snr, 2)
    row.params = _params_for_report(params)
    row.storage = storage_of(entry)
    entry.stats = {"unique_before": row.unique_before, "unique_after": row.unique_after, "rel_rms": row.rel_rms}
    if row.unique_before is None:
        del entry.stats["unique_before"]
    if row.snr_db is not None:
        entry.stats["snr_db"] = row.snr_db
    return entry, stored, row


def exact_codebook(tensor: torch.Tensor, max_values: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The tensor as a codebook of its distinct values and one index per element, when it has
    at most ``max_values`` of them and that codebook rebuilds every element bit for bit (spec
    3.3: a float32 codebook converted to the dtype); else None. Values are told apart by
    their bits, so -0.0 and +0.0 are two values; the caller has ruled out NaN and Inf.

    Returns:
        (codebook: float32 ``(1, K)``, sorted by value, -0.0 before +0.0; indices: flat,
        uint8 or int32).
    """
    view = _BITS_OF.get(tensor.dtype)
    if view is None or tensor.numel() == 0:
        return None
    flat = tensor.contiguous().reshape(-1).view(view).numpy()
    sample = flat[:: max(1, flat.size // _EXACT_SAMPLE)]
    if np.unique(sample).size > max_values:
        return None  # the common case (trained weights), at the cost of a small sort
    found = np.empty(0, dtype=flat.dtype)
    for start in range(0, flat.size, BLOCK_ELEMENTS):  # a block's sorted copy at a time
        found = np.union1d(found, flat[start:start + BLOCK_ELEMENTS])
        if found.size > max_values:
            return None
    values = torch.from_numpy(found.copy()).view(tensor.dtype).to(torch.float32)
    order = np.argsort(values.numpy(), kind="stable")  # by value; -0.0 (a negative int) stays first
    rank = np.empty(order.size, dtype=np.int64)
    rank[order] = np.arange(order.size)
    codebook = values[torch.from_numpy(order)].reshape(1, -1)
    bits = max(1, (order.size - 1).bit_length())
    indices = torch.empty(flat.size, dtype=torch.uint8 if bits <= 8 else torch.int32)
    book = codebook.reshape(-1)
    for start in range(0, flat.size, BLOCK_ELEMENTS):
        part = flat[start:start + BLOCK_ELEMENTS]
        idx = torch.from_numpy(rank[np.searchsorted(found, part)])
        # the codebook is float32: a float64 value it cannot hold comes back different
        rebuilt = book[idx].to(tensor.dtype).view(view).numpy()
        if not np.array_equal(rebuilt, part):
            return None
        indices[start:start + part.size] = idx.to(indices.dtype)
    return codebook, indices


def _encode_exact(name: str, tensor: torch.Tensor, codebook: torch.Tensor, indices: torch.Tensor,
                  decision: Decision, row: TensorReport) -> tuple[TensorEntry, memoryview | bytes, TensorReport]:
    """A tensor of few distinct values as a k-means entry whose codebook holds exactly them (lossless)."""
    count = codebook.shape[1]
    bits = max(1, (count - 1).bit_length())
    counts = np.bincount(indices.numpy(), minlength=1 << bits).astype(np.int64)
    width, compression, stored = _store_indices(indices, bits, counts, decision.rans)
    params = {"codebook": codebook}
    dtype, shape = row.dtype, tuple(row.shape)
    entry = TensorEntry(name, dtype, shape, "kmeans", bits, "tensor", _params_to_header(params), compression=compression,
                        raw_length=expected_raw_length(dtype, shape, "kmeans", width), width=width,
                        group_size=0, param_dtype="float32")
    row.encoding, row.bits, row.granularity, row.param_dtype = "kmeans", bits, "tensor", "float32"
    row.reason += f"; {count} distinct value(s): stored exactly as a {bits}-bit codebook of them"
    row.unique_before = row.unique_after = int(np.count_nonzero(counts))
    row.rel_rms, row.snr_db = 0.0, None
    row.params = _params_for_report(params)
    row.storage = storage_of(entry)
    entry.stats = {"unique_before": row.unique_before, "unique_after": row.unique_after, "rel_rms": 0.0}
    return entry, stored, row


def encode_derived(name: str, tensor: torch.Tensor, source: str,
                   rule: str = "nonzero") -> tuple[TensorEntry, bytes, TensorReport]:
    """A mask stored as derived from the tensor ``source`` (spec 3.5): a header entry, no
    payload. The caller has checked that it rebuilds exactly (``codecs.derived.matches``
    against the source as decoded)."""
    dtype = name_of_dtype(tensor.dtype)
    assert dtype is not None, "checkpoint validation admits only table dtypes"
    shape = tuple(tensor.shape)
    params = {"source": source, "rule": rule}
    entry = TensorEntry(name, dtype, shape, "derived", 0, "tensor", dict(params), raw_length=0)
    row = TensorReport(name, list(shape), dtype, "derived", 0, "tensor", tensor.numel() * itemsize(dtype), 0,
                       rel_rms=0.0, reason="a mask, (w != 0) of a tensor w as it decodes: derived from w, no payload",
                       params=dict(params), storage=storage_of(entry))
    return entry, b"", row


def storage_of(entry: TensorEntry) -> str:
    """How a payload is stored, for reports: its compression, and the container if wider;
    a derived tensor's rule and source."""
    if entry.encoding == "derived":
        return f"{entry.params['rule']}({entry.params['source']})"
    return entry.compression + (f"/w{entry.width}" if entry.width != entry.bits else "")


def snr_db(signal: float, noise: float) -> float | None:
    """10 log10(signal / noise): None when there is no error (or no signal) to speak of."""
    if not (noise > 0 and signal > 0):
        return None
    # as a difference of logs: signal / noise may underflow (or overflow) where each is finite
    return 10 * (math.log10(signal) - math.log10(noise)) if math.isfinite(noise) else -math.inf


def error_energy(reference: torch.Tensor, other: torch.Tensor) -> tuple[float, float]:
    """(sum of reference^2, sum of (other - reference)^2), in float64."""
    x = reference.to(torch.float64)
    error = other.to(torch.float64) - x
    return float((x * x).sum()), float((error * error).sum())


def container_width(bits: int) -> int:
    """The byte-friendly width (2, 4, 8 or 16 bits) that holds ``bits``-bit indices."""
    return next(w for w in (1, 2, 4, 8, 16) if w >= bits)


def _store_indices(indices: torch.Tensor, bits: int, counts: np.ndarray,
                   rans_mode: str = "auto") -> tuple[int, str, memoryview | bytes]:
    """The smallest stored form of the indices: packed at ``bits`` or in a byte-friendly
    container (each zstd-compressed when that helps), or rANS-coded.

    zstd models bytes: indices that straddle byte boundaries (3, 5, 6, 7, 9-15 bits) hide
    their skewed distribution from it, while a container of 4, 8 or 16 bits exposes it. It
    still stays well above the entropy on very skewed indices (trained or pruned weights),
    which rANS codes to within about 1 %. rANS decodes about 10x slower than unpacking, so
    by default ("auto") it is only used when it saves at least 5 % of the best zstd form
    ("always": any saving; "never": not at all); its size is known from the counts before
    anything is coded.
    """
    candidates = []
    runs = counts.size > 0 and counts.max() >= INDEX_RUNS_SHARE * max(1, indices.numel())
    levels = (INDEX_ZSTD_LEVEL, ZSTD_LEVEL) if runs else (INDEX_ZSTD_LEVEL,)
    for width in sorted({bits, container_width(bits)}):
        compression, stored = compress(memoryview(_pack(indices, width)), levels=levels)
        candidates.append((len(stored), width, compression, stored))
    best = min(candidates, key=lambda c: (c[0], c[1]))
    if rans_mode == "never":
        return best[1], best[2], best[3]
    estimate = rans.encoded_size(indices.numel(), counts)
    if estimate is not None and estimate < best[0] * (1 - RANS_MIN_SAVING[rans_mode]):
        coded = rans.encode(indices.numpy(), counts)
        # best[0] is at most the packed size (the width-`bits` candidate is stored raw when
        # zstd does not help), so a smaller coding also meets R15's length < raw_length
        if coded is not None and len(coded) < best[0]:
            return bits, "rans", coded
    _, width, compression, stored = best
    return width, compression, stored


def _pack(indices: torch.Tensor, width: int) -> np.ndarray:
    numel = indices.numel()
    packed = np.empty(packed_size(numel, width), dtype=np.uint8)
    for start in range(0, numel, BLOCK_ELEMENTS):  # BLOCK_ELEMENTS is a multiple of 8
        end = min(numel, start + BLOCK_ELEMENTS)
        part = pack_bits(indices[start:end], width).numpy()
        packed[start * width // 8: start * width // 8 + part.size] = part
    return packed


def count_distinct(tensor: torch.Tensor) -> int:
    """Number of distinct values: one sorted copy (numpy's sort is far faster than torch.unique)."""
    values = tensor.reshape(-1)
    if values.dtype not in (torch.float32, torch.float64):
        values = values.to(torch.float32)  # exact for float16 and bfloat16
    ordered = np.sort(values.numpy())
    return int(np.count_nonzero(ordered[1:] != ordered[:-1])) + 1 if ordered.size else 0


def _finite(tensor: torch.Tensor) -> bool:
    # min and max propagate NaN and expose +-Inf without a full-size boolean temporary
    return bool(torch.isfinite(tensor.amin()).item() and torch.isfinite(tensor.amax()).item())


def _blocks(numel: int, rows: int, row_length: int | None) -> list[tuple[int, int, int, int]]:
    """(first element, end element, first row, end row) of each block of work.

    One row (per-tensor parameters) is cut anywhere; several rows are cut between rows.
    """
    if rows == 1:
        return [(s, min(numel, s + BLOCK_ELEMENTS), 0, 1) for s in range(0, numel, BLOCK_ELEMENTS)]
    length = row_length or numel // rows
    per_block = max(1, BLOCK_ELEMENTS // max(length, 1))
    return [(r * length, min(numel, (r + per_block) * length), r, min(rows, r + per_block))
            for r in range(0, rows, per_block)]


def _balance_segment(decision: Decision, shape: tuple[int, ...], rows: int, row_length: int | None) -> int | None:
    """The runs whose rounding errors a uniform grid balances (``codecs.uniform.balanced``),
    in elements: each grid's row (a channel, a group), or for one grid per tensor each output
    channel's fan-in; None for nearest rounding (``Policy.rounding``, a 1-D tensor, which no
    layer sums over, or a width above ``codecs.uniform.BALANCED_MAX_BITS``)."""
    if decision.rounding != "balanced" or len(shape) < 2 or decision.bits > codecs.uniform.BALANCED_MAX_BITS:
        return None
    numel = math.prod(shape)
    if rows > 1:
        return row_length or numel // rows
    return max(1, numel // shape[0])


def _quantize_blocks(codec: Any, tensor: torch.Tensor, original: torch.Tensor, params: dict[str, torch.Tensor],
                     bits: int, rows: int, row_length: int | None,
                     segment: int | None = None) -> tuple[torch.Tensor, np.ndarray, float, float]:
    """All indices (in their narrowest type), how often each is used, and the error sums.

    ``segment``: balance the rounding in runs of that many elements (uniform grids only).

    ``tensor`` is what gets quantized (pruned or not); the error is measured against
    ``original``, so pruning shows in the reported SNR.
    """
    flat, reference = tensor.reshape(-1), original.reshape(-1)
    numel = flat.numel()
    indices = torch.empty(numel, dtype=torch.uint8 if bits <= 8 else torch.int32)
    counts = np.zeros(1 << bits, dtype=np.int64)
    signal = noise = 0.0
    for start, end, first_row, end_row in _blocks(numel, rows, row_length):
        block_params = {k: v[first_row:end_row] for k, v in params.items()}
        values = flat[start:end].to(torch.float32)
        # a block may start inside a run; only the uniform codec takes ``balance``
        extra = {} if segment is None else {"balance": (segment, start % segment)}
        idx = codec.quantize(values, block_params, bits, row_length, **extra)
        rebuilt = codec.dequantize(idx, block_params, bits, (end - start,), tensor.dtype, row_length)
        target = reference[start:end].to(torch.float32)
        error = rebuilt.to(torch.float32).sub_(target)  # exact: both sides are float32 values
        block_signal, block_noise = float(torch.dot(target, target)), float(torch.dot(error, error))
        if not (math.isfinite(block_signal) and math.isfinite(block_noise)):
            # squares past float32's range (|w| >= about 1e18): the same sums in float64; Inf
            # stays only where a rebuilt value itself is Inf
            wide, wide_error = target.to(torch.float64), error.to(torch.float64)
            block_signal, block_noise = float(wide.dot(wide)), float(wide_error.dot(wide_error))
        signal += block_signal
        noise += block_noise
        counts += np.bincount(idx.numpy(), minlength=1 << bits)
        indices[start:end] = idx
    return indices, counts, signal, noise


def _params_to_header(params: dict[str, torch.Tensor], param_dtype: str = "float32",
                      stored: dict[str, np.ndarray] | None = None) -> dict[str, Any]:
    if stored is not None:  # uint8 codes and their float32 base (spec 3.2)
        return {"min": stored["min"].tobytes(), "max": stored["max"].tobytes(),
                "base": stored["base"].astype("<f4").tobytes()}
    out: dict[str, Any] = {}
    code = PARAM_DTYPES[param_dtype]
    for key, value in params.items():
        # float16: the values are float16 values already (codec.as_float16), so this is exact
        out[key] = value.to(torch.float32).contiguous().numpy().astype(code).tobytes()
    if "codebook" in params:
        out["codebook_size"] = int(params["codebook"].shape[-1])
    return out


def _params_for_report(params: dict[str, torch.Tensor]) -> dict[str, Any]:
    return {key: value.reshape(-1).tolist() if value.numel() <= 256 else f"{value.numel()} values"
            for key, value in params.items()}
