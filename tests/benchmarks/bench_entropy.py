"""How close qpack's stored indices come to their empirical entropy.

For each quantized tensor: n·H (n indices, H the entropy of their empirical distribution,
in bits) against the payload bytes actually stored: qpack's choice (packed, a byte-friendly
container, each with zstd, or rANS), the zstd forms alone (rANS switched off, as before
file version 2), and the packed form alone with zstd. "body/nH" is, over the rANS-coded
tensors only, the coded words (payload less its header, frequency table and lane states)
against those tensors' n·H: the coder's own efficiency, the fixed overhead aside.

    python tests/benchmarks/bench_entropy.py [CHECKPOINT] [--bits 2,3,4,5,6,8] [--prune ,0.5,0.9] [--json out.json]

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
from qpack.bitpack import unpack_bits  # noqa: E402
from qpack.encoder import _pack, compress  # noqa: E402


def entropy_bytes(indices: np.ndarray) -> float:
    counts = np.bincount(indices)
    p = counts[counts > 0] / indices.size
    return float(-(p * np.log2(p)).sum() * indices.size / 8)


def rans_fixed_bytes(reader: qpack.QpkReader, name: str) -> int:
    """Header, frequency table and lane states of a rANS payload (spec 4.1)."""
    entry = reader.entry(name)
    with open(reader.path, "rb") as f:
        f.seek(reader.data_start + entry.offset)
        lanes, alphabet = np.frombuffer(f.read(8), "<u4")
    return 8 + 2 * int(alphabet) + 4 * int(lanes)


def measure(state: dict, path: Path, method: str, bits: int, prune: float | None) -> dict:
    """One packing: n*H of every quantized tensor's indices against what qpack stores (rANS
    allowed), what the zstd forms alone give (rANS switched off) and plain packing + zstd."""
    sizes = {}
    for label, mode in (("stored", "auto"), ("zstd", "never")):
        qpack.pack(state, path, bits=bits, method=method, prune=prune, rans=mode, force=True)
        total_h = stored = packed_only = coded_h = coded_body = 0.0
        coded = tensors = 0
        with qpack.QpkReader(path) as reader:
            for name in reader.keys():
                entry = reader.entry(name)
                if entry.encoding == "raw":
                    continue
                idx = unpack_bits(reader.read_payload(name), entry.width, entry.numel).to(torch.int64)
                h = entropy_bytes(idx.numpy())
                total_h += h
                stored += entry.length
                if entry.compression == "rans":  # the coded words alone: no header, table or lane states
                    coded_h += h
                    coded_body += entry.length - rans_fixed_bytes(reader, name)
                packed_only += len(compress(memoryview(_pack(idx, bits)))[1])
                coded += entry.compression == "rans"
                tensors += 1
        sizes[label] = stored
        if label == "stored":
            row = {"method": method, "bits": bits, "prune": prune, "entropy_bytes": total_h,
                   "rans_body_over_entropy": coded_body / coded_h if coded_h else None,
                   "packed_only_bytes": packed_only, "tensors": tensors, "rans_tensors": coded}
    row.update(stored_bytes=sizes["stored"], zstd_bytes=sizes["zstd"],
               stored_over_entropy=sizes["stored"] / row["entropy_bytes"],
               zstd_over_entropy=sizes["zstd"] / row["entropy_bytes"],
               packed_over_entropy=row["packed_only_bytes"] / row["entropy_bytes"])
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?")
    parser.add_argument("--bits", default="2,3,4,5,6,8")
    parser.add_argument("--methods", default="kmeans,uniform")
    parser.add_argument("--prune", default=",0.5,0.9", help="comma-separated fractions; empty: no pruning")
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
    prunes = [float(p) if p else None for p in args.prune.split(",")]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "e.qpk"
        for method in args.methods.split(","):
            for bits in map(int, args.bits.split(",")):
                for prune in prunes:
                    rows.append(measure(state, path, method, bits, prune))
    print(f"indices of every quantized tensor of {label}: stored bytes against n*H")
    print(f"{'method':<8} {'bits':>4} {'prune':>5} {'n*H bytes':>11} {'stored':>9} {'stored/nH':>10} "
          f"{'rANS':>5} {'body/nH':>8} {'zstd only/nH':>13} {'packed only/nH':>15}")
    for r in rows:
        print(f"{r['method']:<8} {r['bits']:>4} {r['prune'] or 0:>5.2f} {r['entropy_bytes']:>11.0f} "
              f"{r['stored_bytes']:>9.0f} {r['stored_over_entropy']:>10.4f} {r['rans_tensors']:>2}/{r['tensors']:<2} "
              f"{'-' if r['rans_body_over_entropy'] is None else format(r['rans_body_over_entropy'], '.4f'):>8} "
              f"{r['zstd_over_entropy']:>13.3f} {r['packed_over_entropy']:>15.3f}")
    Path(args.json).write_text(json.dumps({"source": label, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
