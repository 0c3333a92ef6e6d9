"""Write the spec's test vectors: tiny .qpk files and expected.json.

The expected values come from a second, independent reading of the spec: the preamble and
header (version 3: zstd-compressed, compact entries with their defaults), the quantization
rule (float16 parameters rounded outward), the reconstruction formulas, the bit order, rANS
byte planes and derived masks are re-implemented here in plain numpy, msgpack and zstd (not with qpack's
reader or codecs); the files themselves are written by qpack. tests/test_spec_vectors.py
checks that qpack decodes each file to exactly these values and that the writer still
produces the same bytes.

The vectors of versions 1 to 4 (``legacy_inputs``) were written by the qpack of their time
and are kept as they are: old files must read bit-exactly forever. This script never
rewrites them or their expected values; it rewrites the version-5 vectors (``vector_inputs``:
the inputs of the version-3 and -4 vectors, written as qpack writes them now, payloads
packed as section 1.3 places them in version 5).

    python specs/vectors/make_vectors.py            # rewrite the version-5 vectors
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import zlib
from pathlib import Path

import msgpack
import numpy as np
import torch
import zstandard

HERE = Path(__file__).resolve().parent
#: decoded values of up to this many bytes are written into expected.json in hex; longer ones
#: as their length, SHA-256 and first bytes, so that the file stays small: the .qpk files
#: hold the data, and a failing check still shows where the values start to differ
VALUES_INLINE_BYTES = 2048


def v4_masks() -> dict[str, torch.Tensor]:
    """Version 4 (spec 3.5): pruned weights and their masks (float32, bool, uint8)."""
    gen = torch.Generator().manual_seed(13)
    fc = torch.randn(8, 40, generator=gen)
    fc[fc.abs() < 1.2] = 0  # Deep Compression: the weight already pruned, its mask beside it
    fc[0, :3] = -0.0  # zero for the rule: the masks are 0 there
    emb = torch.randn(16, 6, generator=gen).half()
    emb[emb.abs() < 0.5] = -0.0
    return {"fc.weight": fc, "fc.weight_mask": (fc != 0).float(), "fc.flags": fc != 0,
            "fc.bias": torch.randn(8, generator=gen),
            "emb.mask": (emb != 0).to(torch.uint8), "emb.weight": emb}  # a raw source, after its mask


def vector_inputs() -> dict[str, dict]:
    """Version 5: name -> (state dict, pack options), the version-3 and -4 vectors' inputs."""
    return {"v5_" + name[3:]: inputs for name, inputs in _compact_inputs().items()}


def _compact_inputs() -> dict[str, dict]:
    """The version-3 and -4 vectors' inputs: name -> (state dict, pack options), deterministic."""
    torch.manual_seed(11)  # the Laplace samples
    gen = torch.Generator().manual_seed(11)
    # uniform vectors pin the nearest rounding they were made with: how the writer picks
    # indices is not part of the format (Policy.rounding), and their bytes must not move
    nearest = {"rounding": "nearest"}
    return {
        # derived masks (3.5), from a k-means source with an exact 0 and from a raw one
        "v4_derived_masks": (v4_masks(), {"bits": 5, "method": "kmeans", "exact_zero": True, "min_numel": 1,
                                          "exclude": ["emb.*"]}),
        # compact entries only: the header is too small for zstd to pay (U = 0)
        "v3_raw_tiny": ({"b": torch.tensor([0.5, -1.25, 3.0])}, {}),
        # raw tensors: BatchNorm-like statistics compress best as byte planes (2.2)
        "v3_raw_planes": ({
            "bn.weight": 1 + 0.01 * torch.randn(96, generator=gen),
            "bn.running_var": (0.9 + 0.1 * torch.rand(96, generator=gen)).to(torch.bfloat16),
            "bn.running_mean": 0.01 * torch.randn(96, generator=gen, dtype=torch.float64),
            "bn.num_batches_tracked": torch.tensor(1000, dtype=torch.int64),
            "mask": torch.tensor([True, False, True]),
            "empty": torch.empty(0, 4),
        }, {}),
        # float16 min/max per group (the default for groups), a short last group
        "v3_uniform_group32_b4_f16": ({"w": 0.05 * torch.randn(6, 30, generator=gen)},
                                      {"bits": 4, "granularity": "group:32", "min_numel": 1, **nearest}),
        "v3_uniform_channel_b6_f16": ({"w": (0.2 * torch.randn(4, 9, generator=gen)).to(torch.float16)},
                                      {"bits": 6, "granularity": "channel", "param_dtype": "float16",
                                       "min_numel": 1, **nearest}),
        "v3_kmeans_group64_b3_f16": ({"w": torch.distributions.Laplace(0.0, 0.03).sample((5, 40))},
                                     {"bits": 3, "method": "kmeans", "granularity": "group:64", "min_numel": 1}),
        # rANS (section 4.1) in a version-3 file, float32 min/max, a compressed header
        "v3_uniform_b5_rans": ({"w": torch.distributions.Laplace(0.0, 0.02).sample((48, 64)),
                                "w.bias": 0.1 * torch.randn(48, generator=gen)},
                               {"bits": 5, "min_numel": 1, "rans": "always", **nearest}),
        # two-level parameters: 8-bit min/max codes under a float32 base (3.2)
        "v3_uniform_group32_b4_u8": ({"w": 0.05 * torch.randn(8, 36, generator=gen)},
                                     {"bits": 4, "granularity": "group:32", "param_dtype": "uint8",
                                      "min_numel": 1, **nearest}),
    }


def legacy_inputs() -> dict[str, dict]:
    """Versions 1 to 4, as they were made (not rewritten: see the module docstring)."""
    return {**_version_1_and_2_inputs(), **_compact_inputs()}


def _version_1_and_2_inputs() -> dict[str, dict]:
    torch.manual_seed(7)
    ramp = torch.tensor([[-1.0, -0.3, 0.4, 1.0], [0.2, 0.9, -0.7, 0.0]])
    gen = torch.Generator().manual_seed(42)
    return {
        "raw_mixed": ({
            "f32": torch.tensor([[1.5, -2.25, 3.0], [0.0, -0.0, 1e-30]]),
            "i64_scalar": torch.tensor(-7, dtype=torch.int64),
            "flags": torch.tensor([True, False, True, True]),
            "bf16": torch.tensor([0.1, -3.5, 65504.0], dtype=torch.bfloat16),
            "empty": torch.empty(0, 2),
        }, {"exclude": ["*"]}),
        "uniform_b2": ({"w": ramp}, {"bits": 2, "min_numel": 1}),
        "uniform_channel_b5_f16": ({"w": (torch.randn(3, 7, generator=gen) * 0.1).to(torch.float16)},
                                   {"bits": 5, "granularity": "channel", "min_numel": 1}),
        "uniform_b13": ({"w": torch.randn(2, 11, generator=gen)}, {"bits": 13, "min_numel": 1}),
        "uniform_group16_b4": ({"w": torch.randn(5, 7, generator=gen)},
                               {"bits": 4, "granularity": "group:16", "min_numel": 1}),
        "kmeans_b5_container": ({"w": torch.distributions.Laplace(0.0, 0.02).sample((40, 50))},
                                {"bits": 5, "method": "kmeans", "min_numel": 1}),
        "kmeans_b3": ({"w": torch.tensor([[0.5, 0.5, -1.0, 2.0], [2.0, 0.25, -1.0, 0.5],
                                          [0.25, 0.25, 7.0, -3.0]])},
                      {"bits": 3, "method": "kmeans", "min_numel": 1}),
        # version 2: skewed indices, stored rANS-coded (section 4.1)
        "uniform_b5_rans": ({"w": torch.distributions.Laplace(0.0, 0.02).sample((48, 64))},
                            {"bits": 5, "min_numel": 1}),
        "kmeans_b4_pruned_rans": ({"w": torch.distributions.Laplace(0.0, 0.02).sample((64, 40))},
                                  {"bits": 4, "method": "kmeans", "prune": 0.7, "min_numel": 1}),
    }


# ---- the spec, re-implemented in numpy ------------------------------------------------------

def spec_pack(indices: np.ndarray, bits: int) -> bytes:
    """Section 4: LSB-first bit stream of ``bits`` (the entry's width) per index."""
    bit_matrix = (indices.astype(np.uint64)[:, None] >> np.arange(bits, dtype=np.uint64)) & np.uint64(1)
    return np.packbits(bit_matrix.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


#: every finite binary16 value, ascending (-0 left out: it equals +0)
_ALL_FLOAT16 = np.unique(np.arange(1 << 16, dtype=np.uint16).view(np.float16).astype(np.float32))
_ALL_FLOAT16 = _ALL_FLOAT16[np.isfinite(_ALL_FLOAT16)]


def float16_outward(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Section 3.2, float16 parameters: the largest binary16 <= lo, the smallest >= hi,
    found by searching the table of all binary16 values."""
    down = _ALL_FLOAT16[np.searchsorted(_ALL_FLOAT16, lo, side="right") - 1]
    up = _ALL_FLOAT16[np.searchsorted(_ALL_FLOAT16, hi, side="left")]
    return down.astype(np.float32), up.astype(np.float32)


def spec_uint8_base(values: np.ndarray) -> tuple[np.float32, np.float32]:
    """Section 3.2, uint8: the start (the smallest value) and the step the writer takes."""
    start, end = np.float32(values.min()), np.float32(values.max())
    if end == start:
        return start, np.float32(0)
    step = np.float32((np.float64(end) - np.float64(start)) / 255)
    while np.float32(start + np.float32(step * np.float32(255))) < end:
        step = np.nextafter(step, np.float32(np.inf), dtype=np.float32)
    return start, step


def spec_uint8_params(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Section 3.2, uint8: (decoded min, decoded max, min codes, max codes, base); every one
    of the 256 levels is decoded and the covering code found by searching them."""
    m0, ms = spec_uint8_base(lo)
    top0, top_step = spec_uint8_base(hi)
    codes = np.arange(256, dtype=np.float32)
    low_levels = (m0 + (ms * codes).astype(np.float32)).astype(np.float32)
    high_levels = (top0 + (top_step * codes).astype(np.float32)).astype(np.float32)
    a = np.array([np.flatnonzero(low_levels <= v).max() for v in lo.reshape(-1)], dtype=np.uint8)
    b = np.array([np.flatnonzero(high_levels >= v).min() for v in hi.reshape(-1)], dtype=np.uint8)
    base = np.array([m0, ms, top0, top_step], dtype=np.float32)
    return low_levels[a], high_levels[b], a, b, base


def spec_uniform(values: np.ndarray, bits: int, channels: int, group: int = 0,
                 param_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray]:
    """Section 3.2: writer's choice of indices and the exact float32 reconstruction.

    Rows are channels, or groups of ``group`` elements (the short last group is padded with
    its last value for the arithmetic, then cut).
    """
    rebuilt, q, *_ = spec_uniform_params(values, bits, channels, group, param_dtype)
    return rebuilt, q


def spec_uniform_params(values: np.ndarray, bits: int, channels: int, group: int = 0,
                        param_dtype: str = "float32") -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``spec_uniform``, the per-row min and max it chose (float32 values) and those
    parameters as the writer stores them."""
    flat = values.astype(np.float32).reshape(-1)
    count = flat.size
    if group:
        flat = np.concatenate([flat, np.repeat(flat[-1:], channels * group - count)])
    rows = flat.reshape(channels, -1)
    lo, hi = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
    if param_dtype == "float16":
        lo, hi = float16_outward(lo, hi)
    stored = {}
    if param_dtype == "uint8":
        new_lo, new_hi, a, b, base = spec_uint8_params(lo.reshape(-1), hi.reshape(-1))
        lo, hi = new_lo.reshape(-1, 1), new_hi.reshape(-1, 1)
        stored = {"min": a.tobytes(), "max": b.tobytes(), "base": base.astype("<f4").tobytes()}
    else:
        code = "<f2" if param_dtype == "float16" else "<f4"
        stored = {"min": lo.reshape(-1).astype(code).tobytes(), "max": hi.reshape(-1).astype(code).tobytes()}
    levels = np.float32((1 << bits) - 1)
    step = np.float32(hi - lo) / levels
    safe = np.where(step > 0, step, np.float32(1))
    q = np.clip(np.rint((rows - lo) / safe), 0, levels)
    q = np.where(step > 0, q, 0).astype(np.int64)
    rebuilt = (lo + (step * q.astype(np.float32)).astype(np.float32)).astype(np.float32)
    return rebuilt.reshape(-1)[:count], q.reshape(-1)[:count], lo.reshape(-1), hi.reshape(-1), stored


def spec_kmeans_decode(codebook: np.ndarray, packed: bytes, bits: int, count: int, rows: int = 1,
                       size: int | None = None, group: int | None = None) -> np.ndarray:
    """Section 3.3: element k of row c is codebook[c*K + q] (rows: channels or groups)."""
    bits_array = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little")[: count * bits]
    q = (bits_array.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(1)
    row = np.arange(count) // (group or -(-count // rows))
    return codebook[row * (size or codebook.size) + q]


def spec_rans_decode(payload: bytes, count: int) -> np.ndarray:
    """Section 4.1, step by step: all lanes of a step at once, symbols found by searching
    the cumulative frequencies."""
    lanes, alphabet = (int(v) for v in np.frombuffer(payload, "<u4", count=2))
    freq = np.frombuffer(payload, "<u2", count=alphabet, offset=8).astype(np.int64)
    start = np.concatenate(([0], np.cumsum(freq)))
    x = np.frombuffer(payload, "<u4", count=lanes, offset=8 + 2 * alphabet).astype(np.int64)
    words = np.frombuffer(payload, "<u2", offset=8 + 2 * alphabet + 4 * lanes).astype(np.int64)
    out, read = np.empty(count, np.int64), 0
    for t in range(-(-count // lanes)):
        active = min(lanes, count - t * lanes)
        r = x[:active] % 32768
        s = np.searchsorted(start, r, side="right") - 1
        out[t * lanes: t * lanes + active] = s
        x[:active] = freq[s] * (x[:active] // 32768) + r - start[s]
        refill = np.flatnonzero(x[:active] < 65536)
        x[refill] = x[refill] * 65536 + words[read: read + refill.size]
        read += refill.size
    assert read == words.size and np.all(x == 65536), "rANS stream does not end at the start states"
    return out


#: section 2.4: what a version-3 entry leaves out (width's default is its bits)
_COMPACT_DEFAULTS = {"encoding": "raw", "bits": 0, "granularity": "tensor", "group_size": 0,
                     "param_dtype": "float32", "params": {}, "compression": "none", "stats": {}}


def _align64(n: int) -> int:
    return -(-n // 64) * 64


#: section 1.3, version 5: payloads at least this long start 64-byte aligned
ALIGNED_PAYLOAD = 65536


def spec_read(path: Path) -> tuple[int, bool, list[dict], list[bytes]]:
    """Sections 1 and 2.4: (version, header compressed?, entries with every key, stored payloads)."""
    data = path.read_bytes()
    magic, version, length, crc, field = struct.unpack("<8sIIII", data[:24])
    assert magic == b"\x89QPK\r\n\x1a\n" and zlib.crc32(data[24:24 + length]) == crc
    stored = data[24:24 + length]
    raw = stored
    if version >= 3 and field:  # U: the header is one zstd frame of U bytes
        raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=field)
        assert len(raw) == field
    doc = msgpack.unpackb(raw, raw=False)

    def aligned(entry: dict) -> bool:  # 1.3: every payload before version 5, long ones in 5
        return version < 5 or entry["length"] >= ALIGNED_PAYLOAD

    end, entries = 0, []
    for stored_entry in doc["tensors"]:
        entry = {**stored_entry, "param_dtype": "float32"}  # versions 1 and 2: float32 only
        offset = _align64(end) if aligned(entry) else end
        if version >= 3:
            entry = {**_COMPACT_DEFAULTS, "width": stored_entry.get("bits", 0), **stored_entry}
            entry["offset"] = offset
        assert entry["offset"] == offset
        end = entry["offset"] + entry["length"]
        entries.append(entry)
    start = _align64(24 + length) if any(aligned(e) for e in entries) or version < 5 else 24 + length
    assert data[24 + length:start] == bytes(start - 24 - length), "non-zero padding before the data"
    payloads = [data[start + e["offset"]: start + e["offset"] + e["length"]] for e in entries]
    assert start + end == len(data)
    return version, bool(version >= 3 and field), entries, payloads


def _rows(entry: dict) -> int:
    numel = int(np.prod(entry["shape"]))
    return {"tensor": 1, "channel": entry["shape"][0] if entry["shape"] else 1,
            "group": -(-numel // max(entry["group_size"], 1))}[entry["granularity"]]


def _params(entry: dict, key: str) -> np.ndarray:
    """Section 3: a parameter array as float32 (binary16 widened exactly, uint8 codes decoded)."""
    if entry["param_dtype"] == "uint8":
        m0, ms, top0, top_step = np.frombuffer(entry["params"]["base"], "<f4")
        start, step = (m0, ms) if key == "min" else (top0, top_step)
        codes = np.frombuffer(entry["params"][key], np.uint8).astype(np.float32)
        return (start + (step * codes).astype(np.float32)).astype(np.float32)
    return np.frombuffer(entry["params"][key], "<f2" if entry["param_dtype"] == "float16" else "<f4").astype(np.float32)


def _decompressed(entry: dict, stored: bytes) -> bytes:
    """Section 2.2: the raw_length bytes a zstd or zstd_planes payload holds (planes joined)."""
    if entry["compression"] == "none":
        return stored
    raw = zstandard.ZstdDecompressor().decompress(stored, max_output_size=1 << 24)
    if entry["compression"] == "zstd_planes":
        k = torch.empty(0, dtype=getattr(torch, entry["dtype"])).element_size()
        raw = np.frombuffer(raw, np.uint8).reshape(k, -1).T.tobytes()  # P[j*n + i] = B[i*k + j]
    return raw


def spec_derive(entry: dict, source: dict) -> bytes:
    """Section 3.5, rule "nonzero": 1 where the decoded source is not equal to 0 (IEEE: -0.0
    is 0, NaN is not), else 0, in the entry's dtype; from the source's expected bytes."""
    assert entry["params"]["rule"] == "nonzero" and source["encoding"] != "derived"
    assert list(entry["shape"]) == source["shape"]
    assert "value_bytes_hex" in source, "a derived tensor's source is given inline (VALUES_INLINE_BYTES)"
    raw = bytes.fromhex(source["value_bytes_hex"])
    kind = getattr(torch, source["dtype"])
    values = torch.frombuffer(bytearray(raw), dtype=kind) if raw else torch.empty(0, dtype=kind)
    ones = (values.to(torch.float64) != 0).numpy()
    target = getattr(torch, entry["dtype"])
    return torch.from_numpy(ones).to(target).contiguous().view(torch.uint8).numpy().tobytes()


def value_record(values: bytes) -> dict:
    """How ``expected.json`` gives a tensor's decoded bytes: in hex, or (longer than
    :data:`VALUES_INLINE_BYTES`) as their length, SHA-256 and first 64 bytes."""
    if len(values) <= VALUES_INLINE_BYTES:
        return {"value_bytes_hex": values.hex()}
    return {"value_bytes": len(values), "value_bytes_sha256": hashlib.sha256(values).hexdigest(),
            "value_bytes_head_hex": values[:64].hex()}


def compact(record: dict) -> dict:
    """A record with long inline values in :func:`value_record`'s form (older files' records)."""
    if "value_bytes_hex" not in record:
        return record
    rest = {k: v for k, v in record.items() if k != "value_bytes_hex"}
    return {**rest, **value_record(bytes.fromhex(record["value_bytes_hex"]))}


def expected_for(name: str, state: dict, path: Path) -> dict:
    version, compressed_header, entries, payloads = spec_read(path)
    out = {}
    for (key, tensor), entry, stored in zip(state.items(), entries, payloads):
        assert entry["name"] == key
        if entry["encoding"] == "derived":  # below, once every source is decoded
            out[key] = None
            continue
        shape, numel = entry["shape"], int(np.prod(entry["shape"]))
        record = {"dtype": entry["dtype"], "shape": list(shape), "encoding": entry["encoding"]}
        if version >= 3:
            record.update(version=version, header_compressed=compressed_header,
                          compression=entry["compression"], param_dtype=entry["param_dtype"])
        if entry["compression"] == "rans":
            q = spec_rans_decode(stored, numel)
            record["compression"] = "rans"
            record["rans_indices_packed_hex"] = spec_pack(q, entry["width"]).hex()
            packed = bytes.fromhex(record["rans_indices_packed_hex"])
        else:
            packed = _decompressed(entry, stored)
        if entry["encoding"] == "raw":
            values = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            assert packed == values, f"{name}/{key}: the spec's decoding of the payload is not the tensor"
            record.update(value_record(values))
        elif entry["encoding"] == "uniform":
            rebuilt, q, lo, hi, stored_params = spec_uniform_params(tensor.float().numpy(), entry["bits"], _rows(entry),
                                                     entry["group_size"] if entry["granularity"] == "group" else 0,
                                                     entry["param_dtype"])
            assert np.array_equal(_params(entry, "min"), lo) and np.array_equal(_params(entry, "max"), hi), \
                f"{name}/{key}: the writer's min/max are not the spec's choice"
            assert entry["params"] == stored_params, f"{name}/{key}: stored parameters differ from the spec's"
            final = torch.from_numpy(rebuilt.reshape(shape)).to(tensor.dtype)
            record["payload_hex"] = spec_pack(q, entry["width"]).hex()
            record.update(value_record(final.contiguous().view(torch.uint8).numpy().tobytes()))
            if version >= 3:
                record["params_hex"] = {k: v.hex() for k, v in entry["params"].items()}
        else:  # kmeans: the codebook is the writer's choice; decoding follows the spec
            book = _params(entry, "codebook")
            size = entry["params"]["codebook_size"]
            values = spec_kmeans_decode(book, packed, entry["width"], numel, _rows(entry), size,
                                        entry["group_size"] or None)
            record["codebook"] = book.tolist()
            record.update(value_record(torch.from_numpy(values.reshape(shape).astype(np.float32)).to(tensor.dtype)
                                        .view(torch.uint8).numpy().tobytes()))
        out[key] = record
    for (key, tensor), entry in zip(state.items(), entries):
        if entry["encoding"] == "derived":
            values = spec_derive(entry, out[entry["params"]["source"]])
            ours = tensor.contiguous().view(torch.uint8).numpy().tobytes()
            assert values == ours, f"{name}/{key}: the spec's derivation is not the mask"
            out[key] = {"dtype": entry["dtype"], "shape": list(entry["shape"]), "encoding": "derived",
                        "version": version, "header_compressed": compressed_header, "compression": "none",
                        "param_dtype": "float32", "source": entry["params"]["source"],
                        **value_record(values)}
    return out


def main() -> int:
    sys.path.insert(0, str(HERE.parents[1]))
    import qpack

    previous = json.loads((HERE / "expected.json").read_text())
    # older vectors' files are never rewritten; their records only take the compact form
    expected = {name: {**previous[name], "tensors": {key: compact(record) for key, record
                                                      in previous[name]["tensors"].items()}}
                for name in legacy_inputs()}
    for name, (state, options) in vector_inputs().items():
        path = HERE / f"{name}.qpk"
        qpack.pack(state, path, force=True, **options)
        expected[name] = {"options": options, "tensors": expected_for(name, state, path)}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {len(vector_inputs())} version-5 vectors to {HERE}, kept {len(legacy_inputs())} older ones")
    return 0


if __name__ == "__main__":
    sys.exit(main())
