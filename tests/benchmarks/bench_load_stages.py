"""Where a qpack load's time goes, stage by stage, against torch.load and the memory's speed.

    python tests/benchmarks/bench_load_stages.py [--size medium] [--repeats 7] [--json bench_load_stages.json]

It writes bench_formats' synthetic transformer (25 M parameters by default) with torch.save,
packs it at uniform 8 bits and at ``--target-bpw 4.53`` per channel (rANS where it pays),
and times, best of ``--repeats`` after a warm-up, every round interleaving all contenders:

- torch.load of the fp32 file (warm page cache), and the loads of both .qpk files three ways:
  ``qpack.load`` (its default threads), every tensor in turn on this thread
  (``QpkReader.tensor``), and whole tensors on two worker threads (``qpack.load(threads=2)``);
  each with its CPU time and the minor page faults of that run;
- each stage alone over all tensors, on one thread: pread of the stored bytes, the CRC-32,
  zstd, rANS decoding, unpacking with the R20 checks, and dequantization;
- the floor: copying and filling the fp32 output's bytes with numpy (memory bandwidth),
  and allocating and filling fresh output (page faults included).

numba is imported first (as any process that decoded a rANS payload has it), so the compiled
dequantization runs. Numbers on a machine shared with other jobs move by 2x from run to run:
read the load average printed at the end.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's qpack

import numba  # noqa: E402,F401  (the compiled dequantization runs once numba is loaded)
import numpy as np  # noqa: E402
import torch  # noqa: E402
import zstandard  # noqa: E402

import qpack  # noqa: E402
from bench_formats import SYNTHETIC_FULL, SYNTHETIC_MEDIUM, SYNTHETIC_QUICK, synthetic_state  # noqa: E402
from qpack import reader as R  # noqa: E402
try:  # noqa: E402
    from qpack.format import crc32  # ISA-L's where installed
except ImportError:  # an older qpack, for a before/after comparison
    from zlib import crc32
from qpack.reader import QpkReader  # noqa: E402


def faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Best wall time of each (one warm-up round, then ``repeats`` rounds), with the CPU time
    and page faults of that best run."""
    runs: dict[str, list[tuple[float, float, int]]] = {k: [] for k in fns}
    for round_no in range(repeats + 1):
        for name, fn in fns.items():
            gc.collect()
            f0, c0, t0 = faults(), time.process_time(), time.perf_counter()
            result = fn()
            wall, cpu, fl = time.perf_counter() - t0, time.process_time() - c0, faults() - f0
            del result
            if round_no:
                runs[name].append((wall, cpu, fl))
    out = {}
    for name, rows in runs.items():
        wall, cpu, fl = min(rows)
        out[name] = {"s": wall, "cpu_s": cpu, "faults": fl, "median_s": sorted(r[0] for r in rows)[len(rows) // 2]}
    return out


def stages(path: str, repeats: int) -> dict[str, float]:
    """Each stage of decoding every tensor of ``path``, alone, best of ``repeats``."""
    reader = QpkReader(path)
    entries = list(reader.entries.values())
    stored = {e.name: os.pread(reader._fd, e.length, reader.data_start + e.offset) for e in entries}
    dctx = zstandard.ZstdDecompressor()
    raw = {e.name: dctx.decompress(stored[e.name], max_output_size=e.raw_length)
           for e in entries if e.compression in ("zstd", "zstd_planes")}
    indices: dict[str, torch.Tensor] = {}

    def s_read() -> None:
        for e in entries:
            os.pread(reader._fd, e.length, reader.data_start + e.offset)

    def s_crc() -> None:
        for e in entries:
            crc32(stored[e.name])

    def s_zstd() -> None:
        for e in entries:
            if e.name in raw:
                dctx.decompress(stored[e.name], max_output_size=e.raw_length)

    def s_rans() -> None:
        for e in entries:
            if e.compression == "rans":
                indices[e.name] = R._rans_indices(e, stored[e.name], None)

    def s_unpack() -> None:
        for e in entries:
            if e.compression == "zstd" and e.encoding != "raw":
                indices[e.name] = R.decode_indices(e, torch.frombuffer(raw[e.name], dtype=torch.uint8))

    def s_dequant() -> None:
        for e in entries:
            if e.name in indices:
                R.dequantize_indices(e, indices[e.name])

    def s_raw() -> None:
        for e in entries:
            if e.encoding == "raw":
                R.decode_payload(e, reader._read_payload(e.name, writable=True))

    out = {}
    for name, fn in [("read (pread)", s_read), ("crc32", s_crc), ("zstd", s_zstd), ("rans", s_rans),
                     ("unpack + R20", s_unpack), ("dequantize", s_dequant), ("raw tensors (all stages)", s_raw)]:
        fn()
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            best = min(best, time.perf_counter() - t0)
        out[name] = best
    reader.close()
    out["stored MB"] = sum(e.length for e in entries) / 1e6
    out["payload MB"] = sum(e.raw_length for e in entries) / 1e6
    out["output MB"] = sum(e.numel * 4 for e in entries) / 1e6
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=["quick", "medium", "full"], default="medium")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="bench_load_stages.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    shape = {"quick": SYNTHETIC_QUICK, "medium": SYNTHETIC_MEDIUM, "full": SYNTHETIC_FULL}[args.size]
    with tempfile.TemporaryDirectory(prefix="bench_load_stages-") as tmp:
        src = os.path.join(tmp, "src.pt")
        torch.save(synthetic_state(shape), src)
        files = {"u8": os.path.join(tmp, "u8.qpk"), "t4.53/ch": os.path.join(tmp, "t453.qpk")}
        qpack.pack(src, files["u8"], bits=8, method="uniform")
        qpack.pack(src, files["t4.53/ch"], target_bpw=4.53, method="uniform", granularity="channel",
                   allocate_granularity="channel")

        def sequential(path: str) -> dict[str, torch.Tensor]:
            with QpkReader(path) as reader:
                return {name: reader.tensor(name) for name in reader.keys()}

        fns: dict[str, Callable[[], Any]] = {
            "torch.load fp32": lambda: torch.load(src, map_location="cpu", weights_only=True)}
        for label, path in files.items():
            fns[f"qpack.load {label}"] = lambda p=path: qpack.load(p)
            fns[f"{label} one thread"] = lambda p=path: sequential(p)
            fns[f"{label} threads=2"] = lambda p=path: qpack.load(p, threads=2)
        loads = interleaved(fns, args.repeats)
        per_stage = {label: stages(path, args.repeats) for label, path in files.items()}
        out_bytes = int(per_stage["u8"]["output MB"] * 1e6) // 4
        a, b = np.ones(out_bytes, np.float32), np.empty(out_bytes, np.float32)
        floor = interleaved({"numpy copy (warm output)": lambda: np.copyto(b, a),
                             "numpy fill (warm output)": lambda: b.fill(2.0),
                             "fresh output + fill": lambda: torch.empty(out_bytes).fill_(2.0)}, args.repeats)
    base = loads["torch.load fp32"]["s"]
    print(f"{'load':28s} {'best ms':>8s} {'x torch':>7s} {'CPU ms':>7s} {'median ms':>9s} {'faults':>7s}")
    for name, row in loads.items():
        print(f"{name:28s} {row['s'] * 1e3:8.1f} {row['s'] / base:7.2f} {row['cpu_s'] * 1e3:7.1f} "
              f"{row['median_s'] * 1e3:9.1f} {row['faults']:7d}")
    print()
    print(f"{'stage (one thread, ms)':28s} " + " ".join(f"{k:>9s}" for k in per_stage))
    for stage in per_stage["u8"]:
        scale = 1 if stage.endswith("MB") else 1e3
        print(f"{stage:28s} " + " ".join(f"{per_stage[k][stage] * scale:9.2f}" for k in per_stage))
    print()
    for name, row in floor.items():
        print(f"{name:28s} {row['s'] * 1e3:8.1f} ms  ({out_bytes * 4 / row['s'] / 1e9:.1f} GB/s, faults {row['faults']})")
    load_average = os.getloadavg()
    print(f"\nload average {load_average[0]:.2f} {load_average[1]:.2f}; {os.cpu_count()} CPUs")
    Path(args.json).write_text(json.dumps({"size": args.size, "loads": loads, "stages": per_stage, "floor": floor,
                                           "load_average": load_average, "cpus": os.cpu_count()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
