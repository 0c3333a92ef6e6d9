"""Benchmark: the allocation's pack time, predicted (the default) against exhaustive, beside -b 8.

Run it as a script (pytest does not collect it):

    python tests/benchmarks/bench_allocate.py                  # the zoo checkpoints
    python tests/benchmarks/bench_allocate.py --synthetic      # also a ~25M transformer (slow: exhaustive)
    python tests/benchmarks/bench_allocate.py --target 3 --json out.json

For each state dict it packs, in this one process, single-threaded (``torch.set_num_threads(1)``,
``threads=1``; set ``OMP_NUM_THREADS=1`` too), after one warm-up pack (so numba's kernels
are loaded for every row alike):

- ``-b 8``: a plain 8-bit pack;
- exhaustive ``--target-bpw T``: every candidate encoded in full (``allocate.PREDICT = False``);
- predicted ``--target-bpw T``: candidates predicted from histograms, the chosen ones encoded.

It prints, per state dict, the pack times (CPU seconds of this process, the fairer figure on a
machine shared with other jobs; wall seconds are in the JSON) and their ratio to ``-b 8``, each allocation's
objective (``predicted_error``, the weighted RMS of per-layer relative errors, and it in dB,
``-20 log10``), the SNR over all quantized weights from the loaded files
(``10 log10(sum w^2 / sum (w - w_hat)^2)``), the file sizes, and how many candidates the
predicted run encoded. Everything goes to ``--json`` (default ``bench_allocate.json``).
Pack times are the best of ``--repeats`` runs (the exhaustive one runs once).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[1]))
sys.path.insert(0, str(HERE))

import qpack  # noqa: E402
import qpack.allocate as allocate  # noqa: E402

ZOO = Path("/work/zoo-cache")
CHECKPOINTS = ("mlp_sgd.pt", "caffe_lenet_sgd.pt", "resnet14_sgd.pt", "char_transformer_adamw.pt")


def timed_pack(state: dict[str, Any], path: Path, repeats: int, **options: Any) -> tuple[float, float, Any]:
    """(CPU seconds, wall seconds, report): the least of ``repeats`` packs, each single-threaded."""
    cpu = wall = math.inf
    report = None
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.process_time()
        report = qpack.pack(state, path, force=True, threads=1, **options)
        cpu, wall = min(cpu, time.process_time() - started_cpu), min(wall, time.perf_counter() - started)
    return cpu, wall, report


def weight_snr(state: dict[str, Any], path: Path) -> float:
    """SNR in dB over every tensor the file quantized, from the loaded values."""
    loaded = qpack.load(path)
    names = [t.name for t in qpack.info(path).tensors if t.encoding != "raw"]
    signal = sum(float(state[n].double().pow(2).sum()) for n in names)
    noise = sum(float((loaded[n].double() - state[n].double()).pow(2).sum()) for n in names)
    return 10 * math.log10(signal / noise) if noise > 0 else math.inf


def bench(name: str, state: dict[str, Any], target: float, repeats: int, out: Path,
          exhaustive: bool = True) -> dict[str, Any]:
    elements = sum(t.numel() for t in state.values())
    plain_s, plain_wall, plain = timed_pack(state, out / "b8.qpk", repeats, bits=8)
    row: dict[str, Any] = {"name": name, "elements": elements, "b8_s": plain_s, "b8_wall_s": plain_wall,
                           "b8_bytes": plain.file_bytes}
    for mode, predict in (("exhaustive", False), ("predicted", True)):
        if mode == "exhaustive" and not exhaustive:
            row[mode] = None
            continue
        allocate.PREDICT = predict
        counted: list[int] = []
        original = allocate._Measured.confirm

        def confirm(self: Any, columns: Any) -> bool:  # counts the encodes the prediction needed
            done = original(self, columns)
            counted.append(self.confirmed)
            return done

        allocate._Measured.confirm = confirm  # type: ignore[method-assign]
        try:
            seconds, wall, report = timed_pack(state, out / f"{mode}.qpk", repeats if predict else 1,
                                               target_bpw=target)
        finally:
            allocate._Measured.confirm = original  # type: ignore[method-assign]
            allocate.PREDICT = True
        error = report.allocation["predicted_error"]
        row[mode] = {"seconds": seconds, "wall_s": wall, "ratio_to_b8": seconds / plain_s, "file_bytes": report.file_bytes,
                     "bpw": report.file_bytes * 8 / elements, "predicted_error": error,
                     "predicted_error_db": -20 * math.log10(error) if error > 0 else math.inf,
                     "weight_snr_db": weight_snr(state, out / f"{mode}.qpk"),
                     "encodes": max(counted, default=0) if predict else None}
    return row


def table(rows: list[dict[str, Any]], target: float) -> str:
    head = (f"{'state dict':<26} {'params':>11} {'-b 8 s':>7} {'exh s':>7} {'pred s':>7} {'exh/b8':>7} "
            f"{'pred/b8':>7} {'exh err dB':>10} {'pred err dB':>11} {'exh SNR':>8} {'pred SNR':>8} "
            f"{'exh bpw':>7} {'pred bpw':>8} {'encodes':>7}")
    lines = [f"--target-bpw {target:g}; CPU seconds of one process, single-threaded (OMP_NUM_THREADS=1, "
             "torch.set_num_threads(1), threads=1); err dB = -20 log10(predicted_error), SNR over the quantized "
             "weights", head, "-" * len(head)]
    for r in rows:
        e, p = r["exhaustive"] or {}, r["predicted"]
        cell = lambda d, key, spec: format(d[key], spec) if key in d else "-"  # noqa: E731
        lines.append(f"{r['name']:<26} {r['elements']:>11,} {r['b8_s']:>7.3f} {cell(e, 'seconds', '>7.2f')} "
                     f"{p['seconds']:>7.3f} {cell(e, 'ratio_to_b8', '>7.1f')} {p['ratio_to_b8']:>7.1f} "
                     f"{cell(e, 'predicted_error_db', '>10.2f')} {p['predicted_error_db']:>11.2f} "
                     f"{cell(e, 'weight_snr_db', '>8.2f')} {p['weight_snr_db']:>8.2f} {cell(e, 'bpw', '>7.3f')} "
                     f"{p['bpw']:>8.3f} {p['encodes']:>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", type=float, default=4.0, help="--target-bpw (default 4)")
    parser.add_argument("--repeats", type=int, default=1, help="pack runs per row, best kept (default 1)")
    parser.add_argument("--synthetic", action="store_true", help="also a ~25M-parameter transformer-shaped state "
                        "dict (bench_formats.py's; its exhaustive run takes minutes)")
    parser.add_argument("--models", default=",".join(CHECKPOINTS), help="zoo checkpoints, comma-separated")
    parser.add_argument("--no-exhaustive-synthetic", action="store_true",
                        help="skip the exhaustive run on the synthetic state dict")
    parser.add_argument("--json", default="bench_allocate.json", help="where to write the results")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print("note: OMP_NUM_THREADS is not 1; timings may include OpenMP spinning", file=sys.stderr)
    states: list[tuple[str, Any]] = []
    for name in filter(None, args.models.split(",")):
        if (ZOO / name).exists():
            states.append((name, lambda name=name: torch.load(ZOO / name, weights_only=True)))
        else:
            print(f"skipped {name}: not in {ZOO}", file=sys.stderr)
    if args.synthetic:
        from bench_formats import SYNTHETIC_MEDIUM, synthetic_state

        states.append((f"synthetic {SYNTHETIC_MEDIUM.numel() / 1e6:.1f}M", lambda: synthetic_state(SYNTHETIC_MEDIUM)))
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder)
        warm = {"w": torch.randn(256, 256)}
        qpack.pack(warm, out / "warm.qpk", target_bpw=4.0, force=True, threads=1)  # loads numba's kernels
        for name, load in states:
            synthetic = name.startswith("synthetic")
            rows.append(bench(name, load(), args.target, args.repeats, out,
                              exhaustive=not (synthetic and args.no_exhaustive_synthetic)))
            print(f"done {name}", file=sys.stderr)
    print(table(rows, args.target))
    Path(args.json).write_text(json.dumps({"target_bpw": args.target, "threads": 1, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
