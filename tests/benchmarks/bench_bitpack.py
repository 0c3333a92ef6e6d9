"""Bit packing and unpacking speed for every width, on one core.

Side by side with the obvious alternatives a user would write: numpy's packbits on a bit
matrix (the usual hand-written packer) and, for reference, a plain copy of the indices.

    python tests/benchmarks/bench_bitpack.py [--count 20000000] [--json bench_bitpack.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qpack.bitpack import pack_bits, unpack_bits  # noqa: E402


def best_of(fn, repeats: int = 5) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def numpy_bitmatrix_pack(indices: np.ndarray, bits: int) -> np.ndarray:
    """What people write by hand: expand to a bit matrix, then np.packbits."""
    matrix = (indices[:, None] >> np.arange(bits, dtype=indices.dtype)) & 1
    return np.packbits(matrix.astype(np.uint8).reshape(-1), bitorder="little")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=20_000_000)
    parser.add_argument("--json", default="bench_bitpack.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    gen = torch.Generator().manual_seed(0)
    copy_s = best_of(lambda: torch.empty(args.count, dtype=torch.int32).copy_(torch.zeros(args.count, dtype=torch.int32)))
    for bits in range(1, 17):
        indices = torch.randint(0, 1 << bits, (args.count,), generator=gen, dtype=torch.int32)
        packed = pack_bits(indices, bits)
        assert torch.equal(unpack_bits(packed, bits, args.count).to(torch.int32), indices)
        pack_s = best_of(lambda: pack_bits(indices, bits))
        zero_copy = unpack_bits(packed, bits, args.count).data_ptr() == packed.data_ptr()
        unpack_s = best_of(lambda: unpack_bits(packed, bits, args.count))
        as_numpy = indices.numpy()
        hand_s = best_of(lambda: numpy_bitmatrix_pack(as_numpy, bits), repeats=2)
        rows.append({"bits": bits, "pack_m_per_s": args.count / pack_s / 1e6,
                     "unpack_m_per_s": None if zero_copy else args.count / unpack_s / 1e6,
                     "numpy_bitmatrix_pack_m_per_s": args.count / hand_s / 1e6})
    print(f"{args.count:,} indices, 1 thread, torch {torch.__version__}; int32 copy: "
          f"{args.count / copy_s / 1e6:.0f} M/s")
    print(f"{'bits':>4} {'pack M/s':>9} {'unpack M/s':>11} {'np bit-matrix pack M/s':>23} {'speedup':>8}")
    for r in rows:
        unpack = "view" if r["unpack_m_per_s"] is None else f"{r['unpack_m_per_s']:.0f}"
        print(f"{r['bits']:>4} {r['pack_m_per_s']:>9.0f} {unpack:>11} "
              f"{r['numpy_bitmatrix_pack_m_per_s']:>23.0f} {r['pack_m_per_s'] / r['numpy_bitmatrix_pack_m_per_s']:>7.1f}x")
    Path(args.json).write_text(json.dumps({"count": args.count, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
