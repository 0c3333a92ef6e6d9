"""rANS against zstd for index streams: size over n*H, and encode/decode speed.

For each case (n indices with a Laplace-shaped distribution over 2^b levels, the shape
k-means and uniform indices of trained weights take) it compares, in one run:

- qpack's rANS coder (``qpack.rans``), encoded and decoded;
- zstd level 3 (qpack's level) over the packed indices and over 8-bit containers, the
  forms qpack stored before rANS, decompressed and unpacked.

    python tests/benchmarks/bench_rans.py [--quick] [--json bench_rans.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qpack import rans  # noqa: E402
from qpack.bitpack import pack_bits, unpack_bits  # noqa: E402


def best_time(run, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def case(n: int, bits: int, spread: float, repeats: int) -> dict:
    rng = np.random.default_rng(n + bits)
    levels = 1 << bits
    indices = np.clip(np.rint(rng.laplace(levels / 2, spread * levels, n)), 0, levels - 1).astype(np.int64)
    counts = np.bincount(indices, minlength=levels)
    p = counts[counts > 0] / n
    entropy = float(-(p * np.log2(p)).sum() * n / 8)
    narrow = torch.from_numpy(indices.astype(np.uint8 if bits <= 8 else np.int16))
    row = {"n": n, "bits": bits, "spread": spread, "entropy_bytes": entropy, "bits_per_index": entropy * 8 / n}

    coded = rans.encode(indices, counts)
    row["rans_bytes"] = len(coded)
    row["rans_encode_s"] = best_time(lambda: rans.encode(indices, counts), repeats)
    row["rans_decode_s"] = best_time(lambda: rans.decode(coded, n, bits), repeats)

    cctx, dctx = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    for label, width in (("zstd_packed", bits), ("zstd_container", 8 if bits <= 8 else 16)):
        packed = pack_bits(narrow, width).numpy().tobytes()
        frame = cctx.compress(packed)
        row[f"{label}_bytes"] = len(frame)
        row[f"{label}_encode_s"] = best_time(lambda: cctx.compress(pack_bits(narrow, width).numpy().tobytes()), repeats)

        def decode() -> torch.Tensor:
            raw = bytearray(dctx.decompress(frame, max_output_size=len(packed)))
            return unpack_bits(torch.frombuffer(raw, dtype=torch.uint8), width, n)
        row[f"{label}_decode_s"] = best_time(decode, repeats)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench_rans.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = (100_000, 1_000_000) if args.quick else (100_000, 1_000_000, 10_000_000)
    # spread: the Laplace scale as a share of the levels (small = very skewed)
    shapes = [(3, 0.02), (4, 0.05), (5, 0.08), (8, 0.03), (8, 0.005)]
    rows = [case(n, bits, spread, args.repeats) for n in sizes for bits, spread in shapes]
    print(f"{'n':>10} {'b':>2} {'H b/idx':>7} | {'rANS/nH':>7} {'zstd/nH':>7} {'zstd8/nH':>8} | "
          f"{'rANS enc':>8} {'rANS dec':>8} {'zstd dec':>8} {'zstd8 dec':>9}  (M indices/s)")
    for r in rows:
        e = r["entropy_bytes"]
        speed = {k: r["n"] / r[k] / 1e6 for k in ("rans_encode_s", "rans_decode_s", "zstd_packed_decode_s",
                                                   "zstd_container_decode_s")}
        print(f"{r['n']:>10} {r['bits']:>2} {r['bits_per_index']:>7.3f} | {r['rans_bytes'] / e:>7.4f} "
              f"{r['zstd_packed_bytes'] / e:>7.3f} {r['zstd_container_bytes'] / e:>8.3f} | "
              f"{speed['rans_encode_s']:>8.1f} {speed['rans_decode_s']:>8.1f} "
              f"{speed['zstd_packed_decode_s']:>8.1f} {speed['zstd_container_decode_s']:>9.1f}")
    Path(args.json).write_text(json.dumps({"rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
