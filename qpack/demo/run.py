"""The demo's variants, report and plots.

:func:`run_demo` trains the seed network, writes every variant to a file in the output
folder (``fp32.pt`` through ``torch.save``, the rest through :func:`qpack.pack`), loads
each file back (:func:`qpack.load`) and evaluates what it loaded. Every size and accuracy
in the table, in ``results.json`` and in the plots comes from those files.
"""

from __future__ import annotations

import json
import os
import platform
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .mnist import DemoData
from .net import SeedNet
from .train import (
    TrainConfig,
    codebooks_from_state_dict,
    evaluate,
    seed_everything,
    train,
    train_centroids,
)

__all__ = [
    "ALL_BITS",
    "QUICK_BITS",
    "DemoConfig",
    "evaluate_file",
    "format_table",
    "load_file",
    "run_demo",
    "write_plots",
]

Log = Callable[[str], None]

ALL_BITS: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 7, 8)
QUICK_BITS: tuple[int, ...] = (1, 2, 3, 4, 8)

#: the seed's settings
SEED_UNIFORM = {"bits": 8, "bias_bits": 1}
SEED_KMEANS = {"bits": 3, "bias_bits": 3}

RESULTS_FORMAT = 1


@dataclass(frozen=True)
class DemoConfig:
    """What :func:`run_demo` does.

    Attributes:
        epochs: training epochs of the fp32 model.
        retrain_epochs: epochs of retraining and of centroid training after quantization.
        centroid_lr: Adam learning rate of the centroids in trained quantization. Lower
            than the training rate: Adam moves every centroid by about this much per step,
            whatever its number of members, and fc1's 3-bit centroids lie about 0.01 apart.
        centroid_l1: weight of the L1 term while training centroids. 0 by default: with the
            assignments fixed, sparsity gains nothing, and a centroid's L1 gradient (the
            weight times its member count) only drags it towards zero, epoch after epoch.
        bits: widths of the uniform and k-means sweeps.
        seed: seeds numpy, torch and the shuffling.
        device: ``"cpu"`` or ``"cuda"``.
        train: the training recipe.
        eval_batch_size: images per forward pass when evaluating.
        plots: draw PNG plots when matplotlib imports.
    """

    epochs: int = 5
    retrain_epochs: int = 3
    centroid_lr: float = 1e-4
    centroid_l1: float = 0.0
    bits: tuple[int, ...] = ALL_BITS
    seed: int = 1337
    device: str = "cpu"
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int = 2000
    plots: bool = True

    @classmethod
    def quick(cls, **overrides: Any) -> DemoConfig:
        """One epoch, bits {1, 2, 3, 4, 8}, one retraining epoch (a fast look)."""
        return replace(cls(epochs=1, retrain_epochs=1, bits=QUICK_BITS), **overrides)


def load_file(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Load a variant's file: ``.pt`` through ``torch.load`` (weights only), else ``qpack.load``.

    Args:
        path: the file.

    Returns:
        The state dict, on the CPU.
    """
    path = Path(path)
    if path.suffix == ".pt":
        return torch.load(path, map_location="cpu", weights_only=True)
    import qpack

    return qpack.load(path, device="cpu")


def evaluate_file(
    path: str | os.PathLike[str],
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 2000,
) -> float:
    """Accuracy of the seed network loaded from ``path`` on ``x``, ``y``.

    Args:
        path: a ``.pt`` or ``.qpk`` file with a :class:`SeedNet` state dict.
        x: images, on the device to evaluate on.
        y: labels.
        batch_size: images per forward pass.

    Returns:
        Accuracy in [0, 1].
    """
    net = SeedNet().to(x.device)
    net.load_state_dict(load_file(path))
    return evaluate(net, x, y, batch_size=batch_size)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()}


def _pack(state: dict[str, torch.Tensor], path: Path, **options: Any) -> None:
    import qpack

    qpack.pack(state, path, force=True, **options)


def _label(method: str, bits: int, bias_bits: int | None) -> str:
    name = "k-means" if method == "kmeans" else method
    return f"{name} w{bits}" + (f"/b{bias_bits}" if bias_bits is not None else "")


def _filename(method: str, bits: int, bias_bits: int | None, suffix: str = "") -> str:
    return f"{method}-w{bits}" + (f"-b{bias_bits}" if bias_bits is not None else "") + suffix + ".qpk"


class _Runner:
    """Holds the data, the output folder and the rows while the variants are made."""

    def __init__(self, data: DemoData, out: Path, config: DemoConfig, log: Log) -> None:
        self.out = out
        self.config = config
        self.log = log
        device = torch.device(config.device)
        self.x = data.train_x.to(device)
        self.y = data.train_y.to(device)
        self.ex = data.eval_x.to(device)
        self.ey = data.eval_y.to(device)
        self.device = device
        self.rows: list[dict[str, Any]] = []
        self.params = 0
        self.fp32_bytes = 0
        self.fp32_accuracy = 0.0

    def evaluate(self, path: Path) -> float:
        return evaluate_file(path, self.ex, self.ey, batch_size=self.config.eval_batch_size)

    def add_row(self, path: Path, **row: Any) -> dict[str, Any]:
        size = path.stat().st_size
        accuracy = self.evaluate(path)
        if not self.rows:  # the fp32 reference comes first
            self.fp32_bytes, self.fp32_accuracy = size, accuracy
        entry = {
            **row,
            "file": path.relative_to(self.out).as_posix(),
            "file_bytes": size,
            "bits_per_weight": size * 8 / self.params,
            "ratio": self.fp32_bytes / size,
            "accuracy": accuracy,
            "delta_pp": 100 * (accuracy - self.fp32_accuracy),
        }
        self.rows.append(entry)
        self.log(
            f"{entry['variant']:<44} {size:>10,} bytes  {entry['ratio']:5.1f}x  "
            f"{100 * accuracy:6.2f} %  ({entry['delta_pp']:+.2f} pp)"
        )
        return entry

    def pack_row(
        self,
        state: dict[str, torch.Tensor],
        method: str,
        bits: int,
        bias_bits: int | None,
        *,
        variant: str,
        training: str = "none",
        suffix: str = "",
        **extra: Any,
    ) -> tuple[dict[str, Any], Path]:
        path = self.out / _filename(method, bits, bias_bits, suffix)
        _pack(state, path, bits=bits, method=method, bias_bits=bias_bits)
        row = self.add_row(
            path, variant=variant, method=method, training=training, bits=bits, bias_bits=bias_bits, **extra
        )
        return row, path

    def seed_everything(self, offset: int) -> None:
        seed_everything(self.config.seed + offset)

    def net_from(self, state: dict[str, torch.Tensor]) -> SeedNet:
        net = SeedNet().to(self.device)
        net.load_state_dict(state)
        return net


def run_demo(
    data: DemoData,
    out_dir: str | os.PathLike[str],
    config: DemoConfig = DemoConfig(),
    *,
    log: Log | None = None,
) -> dict[str, Any]:
    """Train, pack every variant, evaluate every file, write ``results.json`` and plots.

    Variants: fp32 (``torch.save``); the seed's uniform setting (8-bit weights, 1-bit
    biases and BatchNorm affine parameters); the seed's k-means setting (3 bits, weights
    and biases); retraining from each of those (full-precision fine-tuning starting from
    the quantized weights, then quantized and packed again); trained quantization from the
    k-means file (centroids trained, assignments fixed, packed again at 3 bits, which
    reproduces the trained values exactly); and uniform and k-means sweeps over
    ``config.bits`` with qpack's default policy (1-D tensors raw; 8-bit uniform is qpack's
    default).

    Args:
        data: what to train and evaluate on.
        out_dir: the output folder (created; files in it are overwritten).
        config: the options.
        log: receives progress lines and the table; default: silent.

    Returns:
        The contents of ``results.json``.
    """
    log = log if log is not None else (lambda line: None)
    started = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = config
    r = _Runner(data, out, cfg, log)
    timings: dict[str, float] = {}
    log(f"data: {data.info.get('description', '')}")

    # fp32 ---------------------------------------------------------------------------
    t = time.perf_counter()
    r.seed_everything(0)
    model = SeedNet().to(r.device)
    r.params = sum(p.numel() for p in model.parameters())
    log(f"training the seed network ({r.params:,} parameters) for {cfg.epochs} epochs on {r.device}")
    train(model, r.x, r.y, epochs=cfg.epochs, seed=cfg.seed, config=cfg.train, label="train", log=log)
    timings["train"] = time.perf_counter() - t
    fp32 = _cpu_state(model)
    fp32_path = out / "fp32.pt"
    torch.save(fp32, fp32_path)
    r.add_row(fp32_path, variant="fp32 (torch.save)", method="fp32", training="none", bits=32, bias_bits=32)
    fp32_deflated = len(zlib.compress(fp32_path.read_bytes(), 9))

    # the seed's settings ------------------------------------------------------------
    t = time.perf_counter()
    _, seed_uniform_path = r.pack_row(
        fp32, "uniform", variant=f"{_label('uniform', **SEED_UNIFORM)} (seed)", **SEED_UNIFORM
    )
    _, seed_kmeans_path = r.pack_row(fp32, "kmeans", variant=f"{_label('kmeans', **SEED_KMEANS)} (seed)", **SEED_KMEANS)
    timings["seed_settings"] = time.perf_counter() - t

    # retraining, then quantizing and packing again ---------------------------------------
    t = time.perf_counter()
    for offset, (method, setting, start_path) in enumerate(
        (("kmeans", SEED_KMEANS, seed_kmeans_path), ("uniform", SEED_UNIFORM, seed_uniform_path)), start=1
    ):
        r.seed_everything(offset)
        net = r.net_from(load_file(start_path))
        label = f"retrain {_label(method, **setting)}"
        train(net, r.x, r.y, epochs=cfg.retrain_epochs, seed=cfg.seed + offset, config=cfg.train, label=label, log=log)
        r.pack_row(
            _cpu_state(net),
            method,
            variant=f"{_label(method, **setting)} retrained {cfg.retrain_epochs} ep",
            training="retrained",
            suffix="-retrained",
            training_epochs=cfg.retrain_epochs,
            **setting,
        )
    timings["retrain"] = time.perf_counter() - t

    # trained quantization (Deep Compression) ---------------------------------------
    t = time.perf_counter()
    r.seed_everything(10)
    start = load_file(seed_kmeans_path)
    net = r.net_from(start)
    books = codebooks_from_state_dict(net, start, 1 << SEED_KMEANS["bits"])
    train_centroids(
        net, books, r.x, r.y, epochs=cfg.retrain_epochs, seed=cfg.seed + 10, lr=cfg.centroid_lr,
        config=replace(cfg.train, l1=cfg.centroid_l1), log=log,
    )
    trained = _cpu_state(net)
    row, path = r.pack_row(
        trained,
        "kmeans",
        variant=f"{_label('kmeans', **SEED_KMEANS)} centroids trained {cfg.retrain_epochs} ep",
        training="trained-centroids",
        suffix="-trained",
        training_epochs=cfg.retrain_epochs,
        centroid_tensors=len(books),
        **SEED_KMEANS,
    )
    reloaded = load_file(path)
    row["exact_repack"] = all(torch.equal(reloaded[k], trained[k]) for k in trained)
    if not row["exact_repack"]:
        log("note: packing the trained centroids did not reproduce them exactly")
    timings["trained_quantization"] = time.perf_counter() - t

    # sweeps -------------------------------------------------------------------------
    t = time.perf_counter()
    for method in ("uniform", "kmeans"):
        for bits in cfg.bits:
            variant = _label(method, bits, None)
            if method == "uniform" and bits == 8:
                variant += " (qpack default)"
            r.pack_row(fp32, method, bits, None, variant=variant, sweep=True)
    timings["sweeps"] = time.perf_counter() - t

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "data": data.info,
        "parameters": r.params,
        "fp32": {"file": fp32_path.name, "file_bytes": r.fp32_bytes, "zlib9_bytes": fp32_deflated},
        "config": {**asdict(cfg), "bits": list(cfg.bits)},
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "qpack": _qpack_version(),
        },
        "rows": r.rows,
        "timings_s": timings,
    }
    log("")
    for line in format_table(results):
        log(line)
    log(
        f"torch.save + zlib -9 would give {fp32_deflated:,} bytes "
        f"({r.fp32_bytes / fp32_deflated:.2f}x): float weights barely compress."
    )
    if cfg.plots:
        written = write_plots(results, out, log=log)
        results["plots"] = [p.name for p in written]
    results["wall_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out / 'results.json'} ({results['wall_s']:.0f} s in all)")
    return results


def _qpack_version() -> str | None:
    try:
        import qpack

        return getattr(qpack, "__version__", None)
    except ImportError:  # pragma: no cover - qpack is the package we live in
        return None


def format_table(results: dict[str, Any]) -> list[str]:
    """The results as a text table, one line per row.

    Columns: variant, bits (weights/biases), bits per parameter (file bits / parameters),
    file bytes, ratio against ``torch.save``, accuracy, change against fp32 in percentage
    points.

    Args:
        results: as :func:`run_demo` returns them.

    Returns:
        The lines, without line ends.
    """
    header = ("variant", "bits", "bits/param", "file bytes", "ratio", "accuracy", "vs fp32")
    lines = []
    body = []
    for row in results["rows"]:
        if row["method"] == "fp32":
            bits = "32"
        else:
            bits = f"{row['bits']}/{'raw' if row['bias_bits'] is None else row['bias_bits']}"
        body.append(
            (
                row["variant"],
                bits,
                f"{row['bits_per_weight']:.2f}",
                f"{row['file_bytes']:,}",
                f"{row['ratio']:.1f}x",
                f"{100 * row['accuracy']:.2f} %",
                "" if row["method"] == "fp32" else f"{row['delta_pp']:+.2f} pp",
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    data = results["data"]
    lines.append(f"{data.get('description', data.get('source', ''))}; {results['parameters']:,} parameters")
    lines.append(fmt(header))
    lines.append(fmt(["-" * w for w in widths]))
    sweep_started = False
    for row, cells in zip(results["rows"], body):
        if row.get("sweep") and not sweep_started:
            lines.append("sweep, qpack's default policy (1-D tensors raw):")
            sweep_started = True
        lines.append(fmt(cells))
    return lines


def write_plots(results: dict[str, Any], out: Path, *, log: Log | None = None) -> list[Path]:
    """Draw ``accuracy_vs_bits.png`` and ``fc1_histogram.png`` when matplotlib imports.

    The histogram shows the fp32 ``fc1.weight`` (from ``fp32.pt``) with the levels of the
    3-bit uniform file and the centroids of the 3-bit k-means file marked, both read from
    those files.

    Args:
        results: as :func:`run_demo` builds them.
        out: the output folder holding the files the rows name.
        log: receives a line about what was written or skipped.

    Returns:
        The PNG files written (none without matplotlib).
    """
    log = log if log is not None else (lambda line: None)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log("matplotlib is not installed: skipped the plots (pip install 'qpack[plots]')")
        return []
    rows = results["rows"]
    fp32 = rows[0]
    written = []

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, style in (("uniform", "o-"), ("kmeans", "s-")):
        sweep = [r for r in rows if r.get("sweep") and r["method"] == method]
        if sweep:
            ax.plot(
                [r["bits_per_weight"] for r in sweep],
                [100 * r["accuracy"] for r in sweep],
                style,
                label=f"{'k-means' if method == 'kmeans' else method} sweep (1-D raw)",
            )
            for r in sweep:
                ax.annotate(f"{r['bits']}", (r["bits_per_weight"], 100 * r["accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(3, -9))
    for r in rows[1:]:
        if not r.get("sweep"):
            ax.plot(r["bits_per_weight"], 100 * r["accuracy"], "x", markersize=8, label=r["variant"])
    ax.axhline(100 * fp32["accuracy"], color="grey", linestyle="--", linewidth=1,
               label=f"fp32 ({fp32['bits_per_weight']:.1f} bits/param)")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("bits per parameter (file bytes x 8 / parameters)")
    ax.set_ylabel("accuracy (%)")
    low = min(100 * r["accuracy"] for r in rows)
    ax.set_ylim(max(low - 2, 0), 100)
    ax.set_title("Seed network: accuracy against .qpk file size")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path = out / "accuracy_vs_bits.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    def three_bit_file(method: str) -> Path | None:
        for r in rows:
            if r["method"] == method and r["bits"] == 3 and r["training"] == "none":
                return out / r["file"]
        return None

    weights = load_file(out / fp32["file"])["fc1.weight"].flatten().numpy()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.hist(weights, bins=200, color="lightgrey", log=True)
    ax.set_yscale("log")
    marks = (("uniform", "tab:blue", "3-bit uniform levels"), ("kmeans", "tab:red", "3-bit k-means centroids"))
    for method, color, name in marks:
        file = three_bit_file(method)
        if file is None:
            continue
        levels = torch.unique(load_file(file)["fc1.weight"]).numpy()
        for i, level in enumerate(levels):
            ax.axvline(level, color=color, linewidth=1, linestyle="-" if method == "kmeans" else ":",
                       label=f"{name} ({file.name})" if i == 0 else None)
    ax.set_xlabel("fc1.weight value")
    ax.set_ylabel("count (log)")
    ax.set_title(f"fc1.weight ({weights.size:,} values) and the 3-bit levels")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = out / "fc1_histogram.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    log(f"plots: {', '.join(p.name for p in written)}")
    return written
