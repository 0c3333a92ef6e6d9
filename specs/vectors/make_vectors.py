"""Write the spec's test vectors: tiny .qpk files and expected.json.

The expected values come from a second, independent reading of the spec: the quantization
rule, the reconstruction formulas and the bit order are re-implemented here in plain numpy
(not with qpack's codecs), and the files themselves are written by qpack. tests/
test_spec_vectors.py checks that qpack decodes each file to exactly these values and that
the writer still produces the same bytes.

    python specs/vectors/make_vectors.py            # rewrite the vectors
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent


def vector_inputs() -> dict[str, dict]:
    """name -> (state dict, pack options). Everything is deterministic."""
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


def spec_uniform(values: np.ndarray, bits: int, channels: int, group: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Section 3.2: writer's choice of indices and the exact float32 reconstruction.

    Rows are channels, or groups of ``group`` elements (the short last group is padded with
    its last value for the arithmetic, then cut).
    """
    flat = values.astype(np.float32).reshape(-1)
    count = flat.size
    if group:
        flat = np.concatenate([flat, np.repeat(flat[-1:], channels * group - count)])
    rows = flat.reshape(channels, -1)
    lo, hi = rows.min(1, keepdims=True), rows.max(1, keepdims=True)
    levels = np.float32((1 << bits) - 1)
    step = np.float32(hi - lo) / levels
    safe = np.where(step > 0, step, np.float32(1))
    q = np.clip(np.rint((rows - lo) / safe), 0, levels)
    q = np.where(step > 0, q, 0).astype(np.int64)
    rebuilt = (lo + (step * q.astype(np.float32)).astype(np.float32)).astype(np.float32)
    return rebuilt.reshape(-1)[:count], q.reshape(-1)[:count]


def spec_kmeans_decode(codebook: np.ndarray, packed: bytes, bits: int, count: int) -> np.ndarray:
    bits_array = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little")[: count * bits]
    q = (bits_array.reshape(count, bits).astype(np.int64) << np.arange(bits)).sum(1)
    return codebook[q]


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


def stored_payload(reader, key: str) -> bytes:
    entry = reader.entry(key)
    with open(reader.path, "rb") as f:
        f.seek(reader.data_start + entry.offset)
        return f.read(entry.length)


def expected_for(name: str, state: dict, reader) -> dict:
    out = {}
    for key, tensor in state.items():
        entry = reader.entry(key)
        record = {"dtype": entry.dtype, "shape": list(entry.shape), "encoding": entry.encoding}
        if entry.compression == "rans":
            q = spec_rans_decode(stored_payload(reader, key), int(np.prod(entry.shape)))
            record["compression"] = "rans"
            record["rans_indices_packed_hex"] = spec_pack(q, entry.width).hex()
        if entry.encoding == "raw":
            values = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            record["value_bytes_hex"] = values.hex()
        elif entry.encoding == "uniform":
            rebuilt, q = spec_uniform(tensor.float().numpy(), entry.bits, entry.channels, entry.group_size)
            packed = spec_pack(q, entry.width)
            final = torch.from_numpy(rebuilt.reshape(entry.shape)).to(tensor.dtype)
            record["payload_hex"] = packed.hex()
            record["value_bytes_hex"] = final.contiguous().view(torch.uint8).numpy().tobytes().hex()
        else:  # kmeans: the codebook is the writer's choice; decoding follows the spec
            book = np.frombuffer(entry.params["codebook"], "<f4")
            payload = (bytes.fromhex(record["rans_indices_packed_hex"]) if entry.compression == "rans"
                       else reader.read_payload(key).numpy().tobytes())
            values = spec_kmeans_decode(book, payload, entry.width, int(np.prod(entry.shape)))
            record["codebook"] = book.tolist()
            record["value_bytes_hex"] = torch.from_numpy(values.reshape(entry.shape).astype(np.float32)).to(tensor.dtype).view(torch.uint8).numpy().tobytes().hex()
        out[key] = record
    return out


def main() -> int:
    sys.path.insert(0, str(HERE.parents[1]))
    import qpack

    expected = {}
    for name, (state, options) in vector_inputs().items():
        path = HERE / f"{name}.qpk"
        qpack.pack(state, path, force=True, **options)
        with qpack.QpkReader(path) as reader:
            expected[name] = {"options": options, "tensors": expected_for(name, state, reader)}
    (HERE / "expected.json").write_text(json.dumps(expected, indent=1) + "\n")
    print(f"wrote {len(expected)} vectors to {HERE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
