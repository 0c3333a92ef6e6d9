"""How close qpack's stored indices come to their empirical entropy.

For each quantized tensor: n·H (n indices, H the entropy of their empirical distribution,
in bits) against the payload bytes actually stored, for the packed form alone, and for
qpack's choice between the packed form and a byte-friendly container (both zstd).

    python tests/benchmarks/bench_entropy.py [CHECKPOINT] [--bits 2,3,4,5,6,8] [--json out.json]

Without a checkpoint it uses synthetic Laplace weights; give a trained one (for instance the
demo's fp32.pt) for real weights.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import qpack  # noqa: E402
from qpack.encoder import _pack, compress  # noqa: E402


def entropy_bytes(indices: np.ndarray) -> float:
    counts = np.bincount(indices)
    p = counts[counts > 0] / indices.size
    return float(-(p * np.log2(p)).sum() * indices.size / 8)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--bits", default="2,3,4,5,6,8")
    parser.add_argument("--methods", default="kmeans,uniform")
    parser.add_argument("--json", default="bench_entropy.json")
    args = parser.parse_args()
    if args.checkpoint:
        state = qpack.api.load_state(args.checkpoint)
        label = args.checkpoint
    else:
        gen = torch.Generator().manual_seed(0)
        state = {f"w{i}": torch.distributions.Laplace(0.0, 0.02).sample((512, 512)) for i in range(3)}
        del gen
        label = "synthetic Laplace 3 x 512x512"
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "e.qpk"
        for method in args.methods.split(","):
            for bits in map(int, args.bits.split(",")):
                qpack.pack(state, path, bits=bits, method=method, force=True)
                total_h = stored = packed_only = 0.0
                with qpack.QpkReader(path) as reader:
                    for name in reader.keys():
                        entry = reader.entry(name)
                        if entry.encoding == "raw":
                            continue
                        from qpack.bitpack import unpack_bits

                        idx = unpack_bits(reader.read_payload(name), entry.width, entry.numel).to(torch.int64)
                        total_h += entropy_bytes(idx.numpy())
                        stored += entry.length
                        packed_only += len(compress(memoryview(_pack(idx, bits)))[1])
                rows.append({"method": method, "bits": bits, "entropy_bytes": total_h, "stored_bytes": stored,
                             "packed_only_bytes": packed_only, "stored_over_entropy": stored / total_h,
                             "packed_over_entropy": packed_only / total_h})
    print(f"indices of every quantized tensor of {label}")
    print(f"{'method':<8} {'bits':>4} {'n*H bytes':>11} {'stored':>9} {'stored/nH':>10} {'packed only/nH':>15}")
    for r in rows:
        print(f"{r['method']:<8} {r['bits']:>4} {r['entropy_bytes']:>11.0f} {r['stored_bytes']:>9.0f} "
              f"{r['stored_over_entropy']:>10.3f} {r['packed_over_entropy']:>15.3f}")
    Path(args.json).write_text(json.dumps({"source": label, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
