"""CPU time of the costliest files under 64 KB that the spec allows (issue 14: "no file under
64 KB takes more than 0.2 s of CPU to open, verify or load").

The files come from tests/worst_case.py (rANS payloads at R19's 8,192 steps, rANS lanes and
zstd run-length frames up to R23's bound on decoded bytes). Each is opened, verified and
loaded on one thread; the table shows CPU seconds (process time, best of --repeats) and the
work the rules allow it (rANS steps, decoded bytes), for whichever rANS decoder this qpack has.

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_worst_case.py [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parents[1]), str(HERE.parent)]

import torch  # noqa: E402
import worst_case  # noqa: E402

import qpack  # noqa: E402


def cpu_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        started = time.process_time()
        run()
        best = min(best, time.process_time() - started)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name, build in worst_case.BUILDERS.items():
            data = build()
            path = Path(folder) / f"{name}.qpk"
            path.write_bytes(data)
            with qpack.QpkReader(path) as reader:
                tensors = len(reader)
                decoded = sum(e.numel * qpack.dtypes.itemsize(e.dtype) for e in reader.entries.values())
            row = {"file": name, "bytes": len(data), "tensors": tensors, "rans_steps": worst_case.rans_steps(data),
                   "decoded_bytes": decoded,
                   "open_s": cpu_seconds(lambda: qpack.QpkReader(path).close(), args.repeats),
                   "verify_s": cpu_seconds(lambda: qpack.verify(path), args.repeats),
                   "load_s": cpu_seconds(lambda: qpack.load(path, threads=1), args.repeats)}
            rows.append(row)
            print(f"{name:<15} {row['bytes']:>6} B {tensors:>4} tensors {row['rans_steps']:>9,} steps "
                  f"{decoded:>12,} decoded B   open {row['open_s']:.3f} s  verify {row['verify_s']:.3f} s  "
                  f"load {row['load_s']:.3f} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "torch_threads": 1}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
