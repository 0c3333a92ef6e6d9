"""Benchmark: balanced against nearest rounding of uniform grids, on trained networks (issue #11).

Every network of the zoo's cache (``bench_zoo.py --train-only`` trains it) and any seed CNN
checkpoints given (``--seed-checkpoint DIR/seed/fp32.pt``, as ``qpack demo --data DIR``
writes them) is packed at fixed widths with ``rounding="nearest"`` and with
``rounding="balanced"`` (the default), each file loaded back and scored on the full held-out
set: the 10,000 MNIST test images (accuracy), the transformer's held-out text (nats per
character). For MNIST networks each pair of files also gets McNemar's exact p on the images
the two disagree on. The table prints the drop against fp32, nearest -> balanced, per
setting; ``--json`` holds every row.

    python tests/benchmarks/bench_rounding.py --data ../shared/data/mnist
    python tests/benchmarks/bench_rounding.py --seed-checkpoint qpack-demo-out/seed/fp32.pt --only none
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
for path in (str(HERE.parents[2]), str(HERE.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import _zoo  # noqa: E402
import qpack  # noqa: E402
from qpack.demo.stats import mcnemar_exact_p  # noqa: E402

#: (label, pack options) of the fixed settings compared
SETTINGS = [("-b 3", {"bits": 3}), ("-b 4", {"bits": 4}), ("-b 5", {"bits": 5}), ("-b 6", {"bits": 6}),
            ("-b 3 -g channel", {"bits": 3, "granularity": "channel"}),
            ("-b 4 -g channel", {"bits": 4, "granularity": "channel"})]
ROUNDINGS = ("nearest", "balanced")


def _score(arch: str, state: dict[str, torch.Tensor], data: tuple) -> tuple[float, np.ndarray | None]:
    """(metric, right-or-wrong per image or None): accuracy for MNIST networks, loss for text."""
    if arch == "char_transformer":
        return _zoo.evaluate(arch, state, data), None
    if arch == "seed":
        from qpack.demo.net import SeedNet

        net = SeedNet()
        net.load_state_dict(state)
        net.eval()
        with torch.no_grad():
            right = _zoo.correct_images(net, *data)
    else:
        right = _zoo.evaluate_images(arch, state, data)
    return float(right.mean()), right


def bench_network(name: str, arch: str, state: dict[str, torch.Tensor], data: tuple, folder: Path,
                  log: Any) -> dict[str, Any]:
    """Every setting with both roundings on one network."""
    loss = arch == "char_transformer"
    fp32, _ = _score(arch, state, data)
    rows = []
    for label, options in SETTINGS:
        row: dict[str, Any] = {"setting": label}
        answers = {}
        for rounding in ROUNDINGS:
            path = folder / f"{name}-{label.replace(' ', '')}-{rounding}.qpk"
            start = time.perf_counter()
            qpack.pack(state, path, force=True, rounding=rounding, **options)
            seconds = time.perf_counter() - start
            metric, answers[rounding] = _score(arch, qpack.load(path), data)
            drop = metric - fp32 if loss else 100 * (fp32 - metric)
            row[rounding] = {"metric": metric, "drop": drop, "file_bytes": path.stat().st_size,
                             "pack_s": seconds}
        if not loss:
            near, bal = answers["nearest"], answers["balanced"]
            lost, gained = int((near & ~bal).sum()), int((bal & ~near).sum())
            row["images_lost"], row["images_gained"] = lost, gained
            row["mcnemar_p"] = mcnemar_exact_p(lost, gained)
        rows.append(row)
        log(f"  {name} {label}: {row['nearest']['drop']:+.3f} -> {row['balanced']['drop']:+.3f}")
    return {"name": name, "arch": arch, "metric": "loss" if loss else "accuracy", "fp32": fp32, "rows": rows}


def format_table(results: list[dict[str, Any]]) -> list[str]:
    """A row per network, a column per setting: drop nearest -> balanced (p when p < 0.05)."""
    lines = ["| network (fp32) | " + " | ".join(label for label, _ in SETTINGS) + " |",
             "| --- |" + " --- |" * len(SETTINGS)]
    sums = {label: [0.0, 0.0] for label, _ in SETTINGS}
    for res in results:
        loss = res["metric"] == "loss"
        digits = 3 if loss else 2
        cells = []
        for row in res["rows"]:
            a, b = row["nearest"]["drop"], row["balanced"]["drop"]
            cell = f"{a:+.{digits}f} -> {b:+.{digits}f}"
            if not loss and row["mcnemar_p"] < 0.05:
                cell += f" (p {row['mcnemar_p']:.2g})"
            cells.append(cell)
            if not loss and res["arch"] != "seed":
                sums[row["setting"]][0] += a
                sums[row["setting"]][1] += b
        ref = f"{res['fp32']:.3f} nats" if loss else f"{100 * res['fp32']:.2f} %"
        lines.append(f"| {res['name']} ({ref}) | " + " | ".join(cells) + " |")
    if any(res["metric"] == "accuracy" and res["arch"] != "seed" for res in results):
        lines.append("| sum over the zoo's MNIST networks | " +
                     " | ".join(f"{a:+.2f} -> {b:+.2f}" for a, b in sums.values()) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _zoo.add_cache_arguments(parser, "comma-separated zoo names, or 'none' for the seed checkpoints alone")
    parser.add_argument("--seed-checkpoint", action="append", default=[], metavar="FP32.PT",
                        help="a seed CNN state dict (qpack demo's seed/fp32.pt); repeatable")
    parser.add_argument("--json", default="bench_rounding.json", help="where to write the rows")
    args = parser.parse_args(argv)

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    found = _zoo.cached_entries(args.cache, None if args.only is None else set(args.only.split(",")) - {"none"})
    if found is None:
        return 2
    folder, entries = found
    mnist = _zoo.load_mnist(args.data)
    text = _zoo.load_text() if any(e.metric == "loss" for e in entries) else None
    results = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for entry in entries:
            state = torch.load(folder / f"{entry.name}.pt", map_location="cpu", weights_only=True)
            data = (text[1], None) if entry.metric == "loss" else (mnist[2], mnist[3])
            results.append(bench_network(entry.name, entry.arch, state, data, Path(tmp), log))
        for i, checkpoint in enumerate(args.seed_checkpoint):
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
            results.append(bench_network(f"seed CNN {i + 1}", "seed", state, (mnist[2], mnist[3]), Path(tmp), log))
    for line in format_table(results):
        print(line)
    wall = time.perf_counter() - started
    Path(args.json).write_text(json.dumps({"settings": [label for label, _ in SETTINGS], "networks": results,
                                           "seed_checkpoints": args.seed_checkpoint, "wall_s": wall}, indent=1))
    print(f"wrote {args.json} ({wall:.0f} s wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
