"""Benchmark: the demo networks' closing table (issue #6): qpack, the seed's settings and GGUF.

For each demo network (the seed CNN, LeNet-300-100, LeNet-5) it lists, one row per file:

- every variant ``qpack demo`` made (its ``results.json``: ``fp32.pt`` from ``torch.save``,
  the seed's settings, retrained and trained variants, Deep Compression, the sweeps);
- qpack settings the demo does not make, for comparisons at equal bits per weight, packed
  here from the demo's ``fp32.pt``: uniform with groups of 32 (GGUF's block size) at 8, 5 and
  4 bits, and ``target_bpw`` 4.5, 1.0 and 0.5 with uniform and k-means (the label shows the
  widths the allocation chose; the demo already has k-means 4 and 3 bits);
- GGUF: gguf-py (``pip install gguf``) quantizes, from the same ``fp32.pt``, every tensor
  qpack's default policy quantizes (float, >= 2 dims, >= 64 elements) to Q8_0, Q5_1, Q5_0,
  Q4_1, Q4_0 and MXFP4 (those this gguf-py can quantize) and writes a real ``.gguf`` file
  with ``GGUFWriter``; the other tensors stay F32 (I64 for ``num_batches_tracked``), as
  llama.cpp keeps 1-D tensors F32. GGUF blocks hold 32 consecutive values along the last
  dimension, and these convolutions' rows have 3 or 5 values, so each quantized tensor is
  flattened to 1-D and zero-padded to a multiple of 32 first; the file is read back with
  ``GGUFReader``, dequantized, cropped to the tensor's element count and reshaped to its
  shape in the network (the file does not store that shape).

Every size is a file's size on disk; every accuracy is that file loaded back into the
network and evaluated on the demo's evaluation images, with the demo's own functions
(``qpack.demo``: the model constructors, ``load_demo_data``, ``evaluate``/``evaluate_file``).
Columns: file bytes; bits per weight = file bytes * 8 / the network's parameters (buffers
are stored but not counted, as in the demo); ratio = ``fp32.pt``'s bytes / file bytes;
accuracy; change against ``fp32.pt`` in percentage points.

Run it as a script (pytest does not collect it), from the repository root:

    python tests/benchmarks/bench_demo_table.py --data ../shared/data/mnist --split-test 8000
    python tests/benchmarks/bench_demo_table.py --from DIR     # reuse a `qpack demo` folder
    python tests/benchmarks/bench_demo_table.py --models lenet300 --quick   # a fast look

Without ``--from`` it first runs the demo (as ``qpack demo --model all --no-plots``: about
4 minutes for the three networks on 2 CPU cores) into ``--out``. The extra qpack and GGUF
files go to ``<demo folder>/<model>/table/``. All rows go to ``--json`` (default
``bench_demo_table.json`` in the current folder), with the git commit and whether
``qpack/`` had uncommitted changes (sizes move when the encoder does).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import qpack
from qpack.demo.cli import choose_threads
from qpack.demo.mnist import DemoData, load_demo_data
from qpack.demo.net import MODEL_TITLES, MODELS
from qpack.demo.run import DemoConfig, evaluate_file, load_file, run_demo
from qpack.demo.train import evaluate
from qpack.errors import QpkError
from qpack.policy import Policy

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
JSON_FORMAT = 1

Log = Callable[[str], None]

#: GGUF types tried, largest first (those gguf-py cannot quantize are skipped with a note)
GGUF_TYPES = ("Q8_0", "Q5_1", "Q5_0", "Q4_1", "Q4_0", "MXFP4")


@dataclass(frozen=True)
class QpackSetting:
    """A qpack setting the demo does not make: a label, ``qpack.pack`` options, a file name."""

    label: str
    options: dict[str, Any]
    filename: str


#: GGUF-like groups of 32 at GGUF's widths, and bit allocation at a target size: 4.5 bits
#: per weight (Q4_0's) does not bind on these networks (8-bit indices after zstd take less),
#: 1.0 and 0.5 do. The demo already has k-means 4 and 3 bits for every network. Then
#: uniform grids with an exact zero (``--exact-zero``) at the widths where plain min/max fails.
QPACK_SETTINGS = (
    QpackSetting("uniform w8 group:32 (cf. Q8_0)", {"bits": 8, "granularity": "group:32"}, "uniform-w8-g32.qpk"),
    QpackSetting("uniform w5 group:32 (cf. Q5_x)", {"bits": 5, "granularity": "group:32"}, "uniform-w5-g32.qpk"),
    QpackSetting("uniform w4 group:32 (cf. Q4_x)", {"bits": 4, "granularity": "group:32"}, "uniform-w4-g32.qpk"),
    *(
        QpackSetting(f"{label}, target {target} bpw", {"target_bpw": target, "method": method},
                     f"{method}-target{target}.qpk")
        for target in (4.5, 1.0, 0.5)
        for method, label in (("uniform", "uniform"), ("kmeans", "k-means"))
    ),
    # min/max grids with an exact 0 level: what --exact-zero does for L1-trained weights
    *(
        QpackSetting(f"uniform w{bits} --exact-zero", {"bits": bits, "exact_zero": True},
                     f"uniform-w{bits}-exact-zero.qpk")
        for bits in (2, 3, 4, 5, 8)
    ),
    QpackSetting("uniform, target 0.5 bpw --exact-zero", {"target_bpw": 0.5, "exact_zero": True},
                 "uniform-target0.5-exact-zero.qpk"),
)


class BenchError(Exception):
    """A problem the user can fix (missing data, a demo folder that does not fit): one line."""


# ------------------------------------------------------------------------------------ GGUF

def gguf_types(log: Log) -> list[str]:
    """The names in :data:`GGUF_TYPES` that this gguf-py can quantize (none without gguf)."""
    try:
        import gguf
        from gguf.quants import quantize
    except ImportError as exc:
        log(f"note: gguf is not importable ({exc}; pip install gguf): the GGUF rows are skipped")
        return []

    usable = []
    for name in GGUF_TYPES:
        qtype = getattr(gguf.GGMLQuantizationType, name, None)
        if qtype is None:
            log(f"note: this gguf-py has no {name}: skipped")
            continue
        block, _ = gguf.GGML_QUANT_SIZES[qtype]
        try:
            quantize(np.zeros(block, dtype=np.float32), qtype)
        except NotImplementedError:
            log(f"note: gguf-py cannot quantize {name}: skipped")
            continue
        usable.append(name)
    return usable


def gguf_quantized(state: dict[str, torch.Tensor]) -> list[str]:
    """The tensors qpack's default policy quantizes; GGUF quantizes the same ones."""
    policy = Policy()
    return [name for name, tensor in state.items() if policy.decide(name, tensor).encoding != "raw"]


def write_gguf(state: dict[str, torch.Tensor], path: Path, qtype_name: str, quantized: Sequence[str]) -> int:
    """Write ``state`` as a .gguf file, the ``quantized`` tensors flattened, zero-padded, quantized.

    Args:
        state: the fp32 state dict.
        path: the file to write (overwritten).
        qtype_name: a :class:`gguf.GGMLQuantizationType` name.
        quantized: the tensors to quantize; the rest are stored as F32 (integers as I64).

    Returns:
        The zero elements added to fill the last block of each quantized tensor.
    """
    import gguf
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    writer = gguf.GGUFWriter(str(path), arch="qpack-demo")
    padded = 0
    for name, tensor in state.items():
        array = tensor.detach().cpu().reshape(-1).numpy()
        if name in quantized:
            pad = -array.size % block
            padded += pad
            data = quantize(np.pad(array.astype(np.float32), (0, pad)), qtype)
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            writer.add_tensor(name, array.astype(np.float32) if tensor.is_floating_point() else array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return padded


def read_gguf(path: Path, reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Read a file :func:`write_gguf` wrote: dequantize, crop and reshape to ``reference``'s tensors.

    Args:
        path: the .gguf file.
        reference: tensors with the shapes and dtypes to restore (the network's state dict).

    Returns:
        The state dict.
    """
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.I64}
    out = {}
    for tensor in GGUFReader(str(path)).tensors:
        like = reference[tensor.name]
        data = np.asarray(tensor.data if tensor.tensor_type in plain else dequantize(tensor.data, tensor.tensor_type))
        flat = torch.from_numpy(data.reshape(-1)[: like.numel()].copy())
        out[tensor.name] = flat.reshape(like.shape).to(like.dtype)
    return out


def row_wise_elements(state: dict[str, torch.Tensor], names: Sequence[str], block: int = 32) -> int:
    """Elements the ``names`` tensors would take with each last-dim row padded to ``block``."""
    total = 0
    for name in names:
        shape = state[name].shape
        total += math.ceil(shape[-1] / block) * block * (state[name].numel() // shape[-1])
    return total


# ------------------------------------------------------------------------------------ rows

class Table:
    """One network's rows: sizes against ``fp32.pt``, accuracies against its accuracy."""

    def __init__(self, model: str, demo_dir: Path, parameters: int, fp32: dict[str, Any]) -> None:
        self.model = model
        self.demo_dir = demo_dir
        self.parameters = parameters
        self.fp32_bytes = fp32["file_bytes"]
        self.fp32_accuracy = fp32["accuracy"]
        self.rows: list[dict[str, Any]] = []
        self.notes: list[str] = []

    def add(self, section: str, label: str, path: Path, accuracy: float, **settings: Any) -> dict[str, Any]:
        """Add a row for the file at ``path``; sizes from the file, ``accuracy`` as measured from it."""
        size = path.stat().st_size
        row = {
            "model": self.model,
            "section": section,
            "method": label,
            "file": path.relative_to(self.demo_dir).as_posix(),
            "file_bytes": size,
            "bits_per_weight": size * 8 / self.parameters,
            "ratio": self.fp32_bytes / size,
            "accuracy": accuracy,
            "delta_pp": 100 * (accuracy - self.fp32_accuracy),
            "settings": settings,
        }
        self.rows.append(row)
        return row


SECTION_TITLES = {
    "demo": "qpack demo's files (results.json)",
    "qpack": "qpack, settings the demo does not make (packed here from fp32.pt)",
    "gguf": "GGUF via gguf-py, from fp32.pt (quantized tensors flattened, zero-padded to 32)",
}


def format_table(table: Table, title: str) -> list[str]:
    """The table's lines: a heading, the column names, a line per row by section, its notes."""
    header = ("method", "file bytes", "bits/weight", "ratio", "accuracy %", "vs fp32 (pp)")
    cells = [
        (r["method"], f"{r['file_bytes']:,}", f"{r['bits_per_weight']:.3f}", f"{r['ratio']:.1f}x",
         f"{100 * r['accuracy']:.2f}", "" if i == 0 else f"{r['delta_pp']:+.2f}")
        for i, r in enumerate(table.rows)
    ]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]

    def line(parts: Sequence[str]) -> str:
        return "  ".join([parts[0].ljust(widths[0]), *(p.rjust(w) for p, w in zip(parts[1:], widths[1:]))]).rstrip()

    lines = [f"{title} ({table.model}): {table.parameters:,} parameters", line(header), line(["-" * w for w in widths])]
    section = None
    for row, parts in zip(table.rows, cells):
        if row["section"] != section:
            section = row["section"]
            lines.append(f"[{SECTION_TITLES[section]}]")
        lines.append(line(parts))
    lines += [f"  {note}" for note in table.notes]
    return lines


# ---------------------------------------------------------------------------------- steps

def git_state() -> dict[str, Any]:
    """The commit, ``git status --short qpack`` and a hash of ``git diff HEAD -- qpack``."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout if done.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "--short", "HEAD").strip() or None,
        "qpack_status": git("status", "--short", "qpack").splitlines(),
        "qpack_diff_sha256": hashlib.sha256(git("diff", "HEAD", "--", "qpack").encode()).hexdigest(),
    }


def demo_results(args: argparse.Namespace, data: DemoData, models: tuple[str, ...], log: Log) -> tuple[Path, dict]:
    """The demo folder and its ``results.json``: read from ``--from``, else made by running the demo."""
    if args.from_dir is None:
        config = DemoConfig(models=models, plots=False)
        if args.quick:
            config = DemoConfig.quick(models=models, plots=False)
        run_demo(data, args.out, config, log=log)
        return Path(args.out), json.loads((Path(args.out) / "results.json").read_text())
    folder = Path(args.from_dir)
    try:
        results = json.loads((folder / "results.json").read_text())
    except (OSError, ValueError) as exc:
        raise BenchError(f"--from {folder}: cannot read results.json ({exc})") from None
    missing = [m for m in models if m not in results.get("models", {})]
    if missing:
        raise BenchError(f"--from {folder}: no {', '.join(missing)} in its results.json (run the demo with --model all)")
    for part in ("source", "train", "eval"):
        if results["data"].get(part) != data.info.get(part):
            raise BenchError(f"--from {folder}: the demo used other images ({part}: {results['data'].get(part)}, "
                             f"here {data.info.get(part)}); give the same --data and --split-test")
    return folder, results


def bench_model(model: str, folder: Path, results: dict, data: DemoData, qtypes: list[str], log: Log) -> Table:
    """One network's table: the demo's rows, then the extra qpack and GGUF files, evaluated here.

    The demo's accuracies come from its ``results.json``; its ``fp32.pt`` is evaluated again
    to check that the evaluation images are the same.
    """
    part = results["models"][model]
    table = Table(model, folder, part["parameters"], part["fp32"])
    ex, ey = data.eval_x, data.eval_y
    fp32_path = folder / part["fp32"]["file"]
    again = evaluate_file(fp32_path, ex, ey, model=model)
    if again != part["fp32"]["accuracy"]:
        raise BenchError(f"{fp32_path}: {100 * again:.2f} % here, {100 * part['fp32']['accuracy']:.2f} % in "
                         "results.json: not the demo's evaluation images")
    demo_rows = [r for r in results["rows"] if r["model"] == model]
    for r in demo_rows:
        table.add("demo", r["variant"], folder / r["file"], r["accuracy"], method=r["method"],
                  training=r["training"], bits=r["bits"], bias_bits=r["bias_bits"])
    fp32 = load_file(fp32_path)
    out = folder / model / "table"
    out.mkdir(parents=True, exist_ok=True)
    for setting in QPACK_SETTINGS:
        path = out / setting.filename
        started = time.perf_counter()
        report = qpack.pack(fp32, path, force=True, **setting.options)
        label, options = setting.label, dict(setting.options)
        if "target_bpw" in options:  # say what the allocation chose
            chosen = {t.name: t.bits for t in report.tensors if t.encoding != "raw"}
            low, high = min(chosen.values()), max(chosen.values())
            label += f" [w{low}]" if low == high else f" [w{low}..w{high}]"
            options["chosen_bits"] = chosen
        row = table.add("qpack", label, path, evaluate_file(path, ex, ey, model=model), **options)
        log(f"  {model}: {label}: {row['file_bytes']:,} bytes, {100 * row['accuracy']:.2f} % "
            f"({time.perf_counter() - started:.1f} s)")

    quantized = gguf_quantized(fp32)
    padded = 0
    for name in qtypes:
        path = out / f"{name.lower()}.gguf"
        padded = write_gguf(fp32, path, name, quantized)
        net = MODELS[model]()
        net.load_state_dict(read_gguf(path, fp32))
        row = table.add("gguf", f"GGUF {name}", path, evaluate(net, ex, ey, batch_size=2000), qtype=name,
                        padded_elements=padded)
        log(f"  {model}: GGUF {name}: {row['file_bytes']:,} bytes, {100 * row['accuracy']:.2f} %")
    if qtypes:
        count = sum(fp32[n].numel() for n in quantized)
        shapes = ", ".join(f"{n} {tuple(fp32[n].shape)}" for n in quantized)
        rows = row_wise_elements(fp32, quantized)
        table.notes += [
            f"GGUF quantizes {shapes} ({count:,} elements); the rest is F32 (I64 for integers).",
            (f"Flattened and zero-padded to a multiple of 32: {padded} padding elements "
             f"(+{100 * padded / count:.2f} %); padding each last-dim row to 32, as 2-D GGUF blocks would, "
             f"needs {rows:,} elements (+{100 * (rows - count) / count:.1f} %)."),
            ("Bits per weight = file bytes * 8 / parameters; the file does not store the unpadded shapes "
             "(the reader takes them from the network)."),
        ]
    return table


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", metavar="DIR", default=str(REPO.parent / "shared" / "data" / "mnist"),
                        help="folder with the MNIST IDX files (default ../shared/data/mnist from the repository)")
    parser.add_argument("--split-test", metavar="N", type=int, default=8000,
                        help="train on the first N test images, evaluate on the rest (default 8000)")
    parser.add_argument("--models", default="seed,lenet300,lenet5",
                        help="comma-separated networks (default seed,lenet300,lenet5)")
    parser.add_argument("--from", dest="from_dir", metavar="DIR", help="reuse this `qpack demo` output folder")
    parser.add_argument("--out", metavar="DIR", default="bench_demo_table_out",
                        help="where to run the demo without --from (default bench_demo_table_out)")
    parser.add_argument("--quick", action="store_true", help="run the demo with --quick (one epoch): a fast look")
    parser.add_argument("--json", metavar="PATH", default="bench_demo_table.json",
                        help="write all rows here (default bench_demo_table.json)")
    args = parser.parse_args(argv)
    models = tuple(m for m in args.models.split(",") if m)
    unknown = [m for m in models if m not in MODELS]
    if unknown or not models:
        parser.error(f"--models: unknown {unknown}; choose from {', '.join(MODELS)}")
    args.models = models
    return args


def main(argv: Sequence[str] | None = None) -> int:
    started = time.perf_counter()
    args = parse_args(argv)

    def log(line: str) -> None:
        print(line, flush=True)

    git_before = git_state()
    if "OMP_NUM_THREADS" not in os.environ:
        threads, why = choose_threads()
        torch.set_num_threads(threads)
        log(f"torch threads: {threads} ({why})")
    try:
        data = load_demo_data(args.data, split_test=args.split_test, log=log)
        folder, results = demo_results(args, data, args.models, log)
        qtypes = gguf_types(log)
        tables = [bench_model(m, folder, results, data, qtypes, log) for m in args.models]
    except (BenchError, QpkError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    git_after = git_state()

    log("")
    log(data.info["description"])
    for table in tables:
        log("")
        for line in format_table(table, MODEL_TITLES[table.model]):
            log(line)
    log("")
    log(f"git {git_before['commit']}; qpack/ uncommitted: {', '.join(git_before['qpack_status']) or 'none'}")
    if git_after != git_before:
        log(f"note: qpack/ changed on disk during the run (now {git_after['commit']}, "
            f"uncommitted: {', '.join(git_after['qpack_status']) or 'none'}; another diff): "
            "the rows come from the code imported at the start")
    wall = time.perf_counter() - started
    report = {
        "format": JSON_FORMAT,
        "argv": sys.argv[1:] if argv is None else list(argv),
        "demo_dir": str(folder),
        "data": data.info,
        "git": git_before,
        "git_after": git_after,
        "environment": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "gguf": importlib.metadata.version("gguf") if qtypes else None,
        },
        "models": {t.model: {"title": MODEL_TITLES[t.model], "parameters": t.parameters, "fp32_bytes": t.fp32_bytes,
                             "fp32_accuracy": t.fp32_accuracy, "notes": t.notes} for t in tables},
        "rows": [row for t in tables for row in t.rows],
        "wall_s": wall,
    }
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    log(f"wrote {args.json} ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
