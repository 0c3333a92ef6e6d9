"""The demo's variants, report and plots.

:func:`run_demo` trains each chosen network (the seed CNN, LeNet-300-100, LeNet-5), writes
every variant to a file in the network's folder under the output folder (``fp32.pt``
through ``torch.save``, the rest through :func:`qpack.pack`), loads each file back
(:func:`qpack.load`) and evaluates what it loaded. Every size and accuracy in the table, in
``results.json`` and in the plots comes from those files.
"""

from __future__ import annotations

import json
import os
import platform
import time
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from .mnist import DemoData
from .net import MODEL_TITLES, MODELS
from .train import (
    ShuffledBatches,
    TrainConfig,
    evaluate,
    seed_everything,
    train,
)

__all__ = [
    "ALL_BITS",
    "DEEP_COMPRESSION",
    "GOAL_MAX_DROP_PP",
    "GOAL_MIN_RATIO",
    "QUICK_BITS",
    "DemoConfig",
    "TrainedSetting",
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

#: the goal the summary checks: at least this many times smaller than torch.save's file ...
GOAL_MIN_RATIO = 40.0
#: ... and at most this many percentage points below the fp32 accuracy
GOAL_MAX_DROP_PP = 0.1

RESULTS_FORMAT = 2


@dataclass(frozen=True)
class TrainedSetting:
    """A Deep Compression variant: pruning, k-means codebooks, trained centroids.

    Passed to :func:`qpack.finetune.finetune` (``method="kmeans"``) and packed with the
    ``pack_options`` it returns, which reproduce the trained weights exactly.

    Attributes:
        bits: index width of the weight tensors (2 to the bits levels, the zero level
            included when pruned).
        prune: ``(glob, fraction)`` pairs: the first pattern matching a weight's name sets
            the share of its smallest weights pruned (none: not pruned).
        bit_overrides: ``(glob, bits)`` pairs for weights that get other widths.
    """

    bits: int
    prune: tuple[tuple[str, float], ...] = ()
    bit_overrides: tuple[tuple[str, int], ...] = ()

    def label(self) -> str:
        """E.g. ``k-means w3``, or ``k-means w3 (fc1 w2)`` with bit overrides."""
        text = f"k-means w{self.bits}"
        if self.bit_overrides:
            text += " (" + ", ".join(f"{_short(p)} w{b}" for p, b in self.bit_overrides) + ")"
        return text

    def prune_text(self) -> str:
        """E.g. ``fc1 95%, fc2 85%, fc3 20%`` (empty when nothing is pruned)."""
        return ", ".join(f"{_short(p)} {100 * f:g}%" for p, f in self.prune)

    def filename(self) -> str:
        """E.g. ``pruned-kmeans-w3-trained.qpk``."""
        return ("pruned-" if self.prune else "") + f"kmeans-w{self.bits}" + (
            "-mixed" if self.bit_overrides else ""
        ) + "-trained.qpk"


def _short(pattern: str) -> str:
    return pattern.removesuffix(".*")


#: the Deep Compression variants of each network. The L1 term of the training (the seed's
#: recipe) leaves most weights of the large layers within 1e-3 of zero (fc1: 94-96 %); the
#: first setting of each network prunes about those, at 3 bits (the smallest files). The
#: LeNets' second setting uses the shares Han et al. prune (LeNet-300-100 keeps 8 / 9 / 26 %,
#: LeNet-5 66 / 12 / 8 / 19 %) at 4 bits: larger files, closer to the fp32 reference.
DEEP_COMPRESSION: dict[str, tuple[TrainedSetting, ...]] = {
    "seed": (
        TrainedSetting(3, (("layer1.*", 0.2), ("layer2.*", 0.5), ("layer3.*", 0.6), ("fc1.*", 0.99),
                           ("fc2.*", 0.5))),
    ),
    "lenet300": (
        TrainedSetting(3, (("fc1.*", 0.98), ("fc2.*", 0.9), ("fc3.*", 0.3))),
        TrainedSetting(4, (("fc1.*", 0.92), ("fc2.*", 0.91), ("fc3.*", 0.74))),
    ),
    "lenet5": (
        TrainedSetting(3, (("conv1.*", 0.3), ("conv2.*", 0.9), ("fc1.*", 0.98), ("fc2.*", 0.7))),
        TrainedSetting(4, (("conv1.*", 0.34), ("conv2.*", 0.88), ("fc1.*", 0.92), ("fc2.*", 0.81))),
    ),
}


@dataclass(frozen=True)
class DemoConfig:
    """What :func:`run_demo` does.

    Attributes:
        models: the networks, names of :data:`qpack.demo.net.MODELS`.
        epochs: training epochs of the fp32 models.
        retrain_epochs: epochs of retraining and of centroid training after quantization;
            the Deep Compression variants train this many epochs after pruning, then this
            many with their centroids.
        centroid_lr: Adam learning rate of the centroids in trained quantization. Lower
            than the training rate: Adam moves every centroid by about this much per step,
            whatever its number of members, and fc1's 3-bit centroids lie about 0.01 apart.
            The other parameters (and the pruned networks before clustering) train at
            ``train.lr``, without the L1 term: with the assignments fixed, sparsity gains
            nothing, and a centroid's L1 gradient (the weight times its member count) only
            drags it towards zero.
        bits: widths of the seed network's uniform and k-means sweeps.
        deep_compression: ``{model: settings}``, the pruned and trained variants.
        reference: also train each fp32 model as long as the Deep Compression variants
            train, without L1, and report it (``torch.save``): what the extra epochs alone
            give.
        seed: seeds numpy, torch and the shuffling.
        device: ``"cpu"`` or ``"cuda"``.
        train: the training recipe.
        eval_batch_size: images per forward pass when evaluating.
        plots: draw PNG plots when matplotlib imports.
    """

    models: tuple[str, ...] = ("seed",)
    epochs: int = 5
    retrain_epochs: int = 3
    centroid_lr: float = 1e-4
    bits: tuple[int, ...] = ALL_BITS
    deep_compression: Mapping[str, tuple[TrainedSetting, ...]] = field(
        default_factory=lambda: dict(DEEP_COMPRESSION)
    )
    reference: bool = True
    seed: int = 1337
    device: str = "cpu"
    train: TrainConfig = field(default_factory=TrainConfig)
    eval_batch_size: int = 2000
    plots: bool = True

    def __post_init__(self) -> None:
        unknown = [m for m in self.models if m not in MODELS]
        if unknown or not self.models:
            raise ValueError(f"unknown models {unknown}; choose from {', '.join(MODELS)}")

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
    model: str = "seed",
    batch_size: int = 2000,
) -> float:
    """Accuracy of the network loaded from ``path`` on ``x``, ``y``.

    Args:
        path: a ``.pt`` or ``.qpk`` file with a state dict of that network.
        x: images, on the device to evaluate on.
        y: labels.
        model: the network's name in :data:`qpack.demo.net.MODELS`.
        batch_size: images per forward pass.

    Returns:
        Accuracy in [0, 1].
    """
    net = MODELS[model]().to(x.device)
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
    """One network: its data, folder and rows while the variants are made."""

    def __init__(self, model: str, data: DemoData, root: Path, config: DemoConfig, log: Log) -> None:
        self.model = model
        self.root = root
        self.out = root / model
        self.out.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.log = log
        device = torch.device(config.device)
        self.x = data.train_x.to(device)
        self.y = data.train_y.to(device)
        self.ex = data.eval_x.to(device)
        self.ey = data.eval_y.to(device)
        self.device = device
        self.rows: list[dict[str, Any]] = []
        self.params = sum(p.numel() for p in MODELS[model]().parameters())
        self.fp32_bytes = 0
        self.fp32_accuracy = 0.0

    def evaluate(self, path: Path) -> float:
        return evaluate_file(path, self.ex, self.ey, model=self.model, batch_size=self.config.eval_batch_size)

    def add_row(self, path: Path, **row: Any) -> dict[str, Any]:
        size = path.stat().st_size
        accuracy = self.evaluate(path)
        if not self.rows:  # the fp32 reference comes first
            self.fp32_bytes, self.fp32_accuracy = size, accuracy
        entry = {
            "model": self.model,
            **row,
            "file": path.relative_to(self.root).as_posix(),
            "file_bytes": size,
            "bits_per_weight": size * 8 / self.params,
            "ratio": self.fp32_bytes / size,
            "accuracy": accuracy,
            "delta_pp": 100 * (accuracy - self.fp32_accuracy),
        }
        self.rows.append(entry)
        self.log(
            f"{entry['variant']:<52} {size:>10,} bytes  {entry['ratio']:6.1f}x  "
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
        filename: str | None = None,
        pack_options: dict[str, Any] | None = None,
        **extra: Any,
    ) -> tuple[dict[str, Any], Path]:
        path = self.out / (filename or _filename(method, bits, bias_bits, suffix))
        _pack(state, path, **(pack_options or {"bits": bits, "method": method, "bias_bits": bias_bits}))
        row = self.add_row(
            path, variant=variant, method=method, training=training, bits=bits, bias_bits=bias_bits, **extra
        )
        return row, path

    def seed_everything(self, offset: int) -> None:
        seed_everything(self.config.seed + offset)

    def net_from(self, state: dict[str, torch.Tensor]) -> torch.nn.Module:
        net = MODELS[self.model]().to(self.device)
        net.load_state_dict(state)
        return net

    def batches(self, offset: int, label: str) -> ShuffledBatches:
        cfg = self.config
        return ShuffledBatches(
            self.x, self.y, cfg.train.batch_size, cfg.seed + offset, label=label, progress_bar=cfg.train.progress_bar
        )

    def finetune(self, net: torch.nn.Module, offset: int, label: str, **options: Any) -> Any:
        """:func:`qpack.finetune.finetune` with the demo's rates, batches and progress lines."""
        from qpack.finetune import finetune

        cfg = self.config

        def progress(s: Any) -> None:
            phase = "retrain pruned" if s.phase == "prune" else "train centroids"
            self.log(
                f"  {label}: {phase} epoch {s.epoch}/{s.epochs}: loss {s.loss:.4f}, "
                f"train accuracy {100 * s.accuracy:.2f} %, {s.seconds:.1f} s"
            )

        self.seed_everything(offset)
        return finetune(
            net, self.batches(offset, label), method="kmeans", lr=cfg.centroid_lr, other_lr=cfg.train.lr,
            prune_lr=cfg.train.lr, device=self.device, progress=progress, **options,
        )

    def exact(self, row: dict[str, Any], path: Path, state: dict[str, torch.Tensor]) -> None:
        reloaded = load_file(path)
        row["exact_repack"] = all(torch.equal(reloaded[k], state[k]) for k in state)
        if not row["exact_repack"]:
            self.log(f"note: {path.name} does not reproduce the trained weights exactly")


def _seed_experiment(r: _Runner, fp32: dict[str, torch.Tensor], timings: dict[str, float]) -> None:
    """The seed's own variants: its uniform and k-means settings, retrained, trained centroids."""
    cfg, log = r.config, r.log
    t = time.perf_counter()
    _, seed_uniform_path = r.pack_row(
        fp32, "uniform", variant=f"{_label('uniform', **SEED_UNIFORM)} (seed)", **SEED_UNIFORM
    )
    _, seed_kmeans_path = r.pack_row(fp32, "kmeans", variant=f"{_label('kmeans', **SEED_KMEANS)} (seed)", **SEED_KMEANS)
    timings["seed_settings"] = time.perf_counter() - t

    # retraining, then quantizing and packing again
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

    # trained quantization of the seed's k-means setting (every parameter, 3 bits)
    t = time.perf_counter()
    net = r.net_from(fp32)
    label = f"{_label('kmeans', **SEED_KMEANS)}"
    result = r.finetune(net, 10, label, bits=SEED_KMEANS["bits"], bias_bits=SEED_KMEANS["bias_bits"],
                        epochs=cfg.retrain_epochs)
    trained = _cpu_state(net)
    row, path = r.pack_row(
        trained,
        "kmeans",
        variant=f"{_label('kmeans', **SEED_KMEANS)} centroids trained {cfg.retrain_epochs} ep",
        training="trained-centroids",
        suffix="-trained",
        pack_options=result.pack_options,
        training_epochs=cfg.retrain_epochs,
        centroid_tensors=len(result.tensors),
        **SEED_KMEANS,
    )
    r.exact(row, path, trained)
    timings["trained_quantization"] = time.perf_counter() - t


def _deep_compression(r: _Runner, fp32: dict[str, torch.Tensor], timings: dict[str, float]) -> None:
    """The pruned, k-means and trained variants of :data:`DEEP_COMPRESSION`, then the reference."""
    cfg = r.config
    t = time.perf_counter()
    settings = tuple(cfg.deep_compression.get(r.model, ()))
    for i, setting in enumerate(settings):
        net = r.net_from(fp32)
        label = ("pruned + " if setting.prune else "") + setting.label()
        result = r.finetune(
            net, 20 + i, label, bits=setting.bits, prune=dict(setting.prune) or None,
            bit_overrides=dict(setting.bit_overrides), prune_epochs=cfg.retrain_epochs if setting.prune else 0,
            epochs=cfg.retrain_epochs,
        )
        state = _cpu_state(net)
        pruned = sum(q.pruned for q in result.tensors.values())
        quantized = sum(q.numel for q in result.tensors.values())
        row, path = r.pack_row(
            state,
            "kmeans",
            setting.bits,
            None,
            variant=f"pruned {round(100 * pruned / quantized)}% + {setting.label()}, "
            f"trained {cfg.retrain_epochs}+{cfg.retrain_epochs} ep" if setting.prune
            else f"{label} centroids trained {cfg.retrain_epochs} ep",
            training="pruned+trained-centroids" if setting.prune else "trained-centroids",
            filename=setting.filename(),
            pack_options=result.pack_options,
            training_epochs=cfg.retrain_epochs * (2 if setting.prune else 1),
            prune={p: f for p, f in setting.prune},
            prune_text=setting.prune_text(),
            pruned_share=pruned / max(quantized, 1),
            zeros_share=sum(int((state[n] == 0).sum()) for n in result.tensors) / max(quantized, 1),
            centroid_tensors=len(result.tensors),
        )
        r.exact(row, path, state)
    timings["deep_compression"] = time.perf_counter() - t

    if cfg.reference and settings:
        t = time.perf_counter()
        epochs = max(cfg.retrain_epochs * (2 if any(s.prune for s in settings) else 1), 1)
        r.seed_everything(30)
        net = r.net_from(fp32)
        train(net, r.x, r.y, epochs=epochs, seed=cfg.seed + 30, config=replace(cfg.train, l1=0.0),
              label="reference", log=r.log)
        path = r.out / f"fp32-trained-{epochs}ep.pt"
        torch.save(_cpu_state(net), path)
        r.add_row(path, variant=f"fp32 trained {epochs} ep more, no L1 (reference)", method="fp32",
                  training="reference", bits=32, bias_bits=32, training_epochs=epochs)
        timings["reference"] = time.perf_counter() - t


def _run_model(name: str, data: DemoData, out: Path, cfg: DemoConfig, log: Log) -> dict[str, Any]:
    """Train one network and make, pack and evaluate its variants; its part of ``results.json``."""
    r = _Runner(name, data, out, cfg, log)
    timings: dict[str, float] = {}

    # fp32
    t = time.perf_counter()
    r.seed_everything(0)
    model = MODELS[name]().to(r.device)
    log("")
    log(f"{MODEL_TITLES[name]}: training ({r.params:,} parameters) for {cfg.epochs} epochs on {r.device}")
    train(model, r.x, r.y, epochs=cfg.epochs, seed=cfg.seed, config=cfg.train, label="train", log=log)
    timings["train"] = time.perf_counter() - t
    fp32 = _cpu_state(model)
    fp32_path = r.out / "fp32.pt"
    torch.save(fp32, fp32_path)
    r.add_row(fp32_path, variant="fp32 (torch.save)", method="fp32", training="none", bits=32, bias_bits=32)
    fp32_deflated = len(zlib.compress(fp32_path.read_bytes(), 9))

    if name == "seed":
        _seed_experiment(r, fp32, timings)
    _deep_compression(r, fp32, timings)

    # without retraining: the seed network's sweeps, the fixed settings of the others
    t = time.perf_counter()
    plan = ([(m, b) for m in ("uniform", "kmeans") for b in cfg.bits] if name == "seed"
            else [("uniform", 8), ("kmeans", 4), ("kmeans", 3)])
    for method, bits in plan:
        variant = _label(method, bits, None)
        if method == "uniform" and bits == 8:
            variant += " (qpack default)"
        r.pack_row(fp32, method, bits, None, variant=variant, sweep=True)
    timings["sweeps"] = time.perf_counter() - t

    part: dict[str, Any] = {
        "title": MODEL_TITLES[name],
        "parameters": r.params,
        "fp32": {
            "file": fp32_path.relative_to(out).as_posix(),
            "file_bytes": r.fp32_bytes,
            "accuracy": r.fp32_accuracy,
            "zlib9_bytes": fp32_deflated,
        },
        "best": _best(r.rows),
        "timings_s": timings,
    }
    return {"part": part, "rows": r.rows}


def _best(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The smallest .qpk row within :data:`GOAL_MAX_DROP_PP` of fp32, and whether it meets the goal."""
    fitting = [r for r in rows if r["method"] != "fp32" and r["delta_pp"] >= -GOAL_MAX_DROP_PP - 1e-9]
    if not fitting:
        return None
    best = max(fitting, key=lambda r: r["ratio"])
    return {
        "variant": best["variant"],
        "file": best["file"],
        "ratio": best["ratio"],
        "delta_pp": best["delta_pp"],
        "meets_goal": best["ratio"] >= GOAL_MIN_RATIO,
    }


def run_demo(
    data: DemoData,
    out_dir: str | os.PathLike[str],
    config: DemoConfig = DemoConfig(),
    *,
    log: Log | None = None,
) -> dict[str, Any]:
    """Train, pack every variant, evaluate every file, write ``results.json`` and plots.

    For every network in ``config.models`` (files in ``OUT/<model>/``):

    - fp32 (``torch.save``), trained with the seed's recipe;
    - the seed network only: the seed's uniform setting (8-bit weights, 1-bit biases and
      BatchNorm affine parameters) and k-means setting (3 bits, weights and biases);
      retraining from each (full-precision fine-tuning from the quantized weights, then
      quantized and packed again); trained quantization of the k-means setting
      (:func:`qpack.finetune.finetune`: centroids trained, assignments fixed);
    - Deep Compression (:data:`DEEP_COMPRESSION`): pruned, retrained, clustered with the
      zero level kept, centroids trained, packed with k-means (exactly);
    - the reference: fp32 trained as many more epochs without L1 (what the extra training
      alone gives);
    - without retraining and with qpack's default policy (1-D tensors raw): the seed
      network's uniform and k-means sweeps over ``config.bits``; for the others, 8-bit
      uniform (qpack's default) and 4- and 3-bit k-means.

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
    log(f"data: {data.info.get('description', '')}")
    parts: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for name in cfg.models:
        t = time.perf_counter()
        done = _run_model(name, data, out, cfg, log)
        parts[name] = {**done["part"], "wall_s": time.perf_counter() - t}
        rows += done["rows"]

    results: dict[str, Any] = {
        "format": RESULTS_FORMAT,
        "data": data.info,
        "models": parts,
        "goal": {"min_ratio": GOAL_MIN_RATIO, "max_drop_pp": GOAL_MAX_DROP_PP},
        "config": _config_json(cfg),
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "qpack": _qpack_version(),
        },
        "rows": rows,
    }
    log("")
    for line in format_table(results):
        log(line)
    if cfg.plots:
        written = write_plots(results, out, log=log)
        results["plots"] = [p.relative_to(out).as_posix() for p in written]
    results["wall_s"] = time.perf_counter() - started
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    log(f"wrote {out / 'results.json'} ({results['wall_s']:.0f} s in all)")
    return results


def _config_json(cfg: DemoConfig) -> dict[str, Any]:
    plain = asdict(cfg)
    plain["bits"] = list(cfg.bits)
    plain["models"] = list(cfg.models)
    plain["deep_compression"] = {
        model: [
            {"bits": s.bits, "prune": dict(s.prune), "bit_overrides": dict(s.bit_overrides)} for s in settings
        ]
        for model, settings in cfg.deep_compression.items()
        if model in cfg.models
    }
    return plain


def _qpack_version() -> str | None:
    try:
        import qpack

        return getattr(qpack, "__version__", None)
    except ImportError:  # pragma: no cover - qpack is the package we live in
        return None


def format_table(results: dict[str, Any]) -> list[str]:
    """The results as text: one table per network, one line per row, then a summary.

    Columns: variant, bits (weights/biases), bits per parameter (file bits / parameters),
    file bytes, ratio against ``torch.save``, accuracy, change against fp32 in percentage
    points.

    Args:
        results: as :func:`run_demo` returns them.

    Returns:
        The lines, without line ends.
    """
    header = ("variant", "bits", "bits/param", "file bytes", "ratio", "accuracy", "vs fp32")
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
                "" if row["method"] == "fp32" and row["training"] == "none" else f"{row['delta_pp']:+.2f} pp",
            )
        )
    widths = [max(len(h), *(len(b[i]) for b in body)) for i, h in enumerate(header)]

    def fmt(cells: Sequence[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = [c.rjust(w) for c, w in zip(cells[1:], widths[1:])]
        return "  ".join([first, *rest]).rstrip()

    data = results["data"]
    lines = [f"{data.get('description', data.get('source', ''))}"]
    current = None
    sweep_started = False
    for row, cells in zip(results["rows"], body):
        if row["model"] != current:
            current = row["model"]
            part = results["models"][current]
            lines += ["", f"{part['title']} ({current}): {part['parameters']:,} parameters"]
            lines += [fmt(header), fmt(["-" * w for w in widths])]
            sweep_started = False
        if row.get("sweep") and not sweep_started:
            lines.append(
                "sweep, qpack's default policy (1-D tensors raw):" if current == "seed"
                else "without retraining, qpack's default policy (1-D tensors raw):"
            )
            sweep_started = True
        lines.append(fmt(cells))
        if row is _last_of(results["rows"], current):
            pruned = [r for r in results["rows"] if r["model"] == current and r.get("prune_text")]
            if pruned:
                lines.append("pruned variants: the smallest weights set to zero (share of the quantized "
                             "weights), retrained, clustered, centroids trained; per layer:")
                lines += [f"  {r['variant'].split(',')[0]}: {r['prune_text']}" for r in pruned]
    goal = (f"goal: at least {GOAL_MIN_RATIO:.0f}x smaller than torch.save's file, "
            f"at most {GOAL_MAX_DROP_PP} pp below fp32 (from .qpk files):")
    lines += ["", goal]
    for part in results["models"].values():
        best = part["best"]
        fp32 = part["fp32"]
        if best is None:
            lines.append(f"  {part['title']}: no .qpk variant within {GOAL_MAX_DROP_PP} pp of fp32")
            continue
        verdict = "met" if best["meets_goal"] else "NOT met"
        lines.append(
            f"  {part['title']}: {verdict}: {best['variant']}, {best['ratio']:.1f}x, {best['delta_pp']:+.2f} pp "
            f"(torch.save + zlib -9: {fp32['file_bytes'] / fp32['zlib9_bytes']:.2f}x)"
        )
    return lines


def _last_of(rows: list[dict[str, Any]], model: str | None) -> dict[str, Any] | None:
    last = None
    for row in rows:
        if row["model"] == model:
            last = row
    return last


def write_plots(results: dict[str, Any], out: Path, *, log: Log | None = None) -> list[Path]:
    """Draw ``accuracy_vs_bits.png`` and ``fc1_histogram.png`` per network, when matplotlib imports.

    Each goes in the network's folder. The histogram shows the fp32 ``fc1.weight`` (from
    ``fp32.pt``) with the levels of the 3-bit uniform file and the centroids of the 3-bit
    k-means file marked (those present), read from those files.

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
    written = []
    for name, part in results["models"].items():
        rows = [r for r in results["rows"] if r["model"] == name]
        folder = out / Path(part["fp32"]["file"]).parent
        fp32 = rows[0]

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for method, style in (("uniform", "o-"), ("kmeans", "s-")):
            sweep = [r for r in rows if r.get("sweep") and r["method"] == method]
            if sweep:
                ax.plot(
                    [r["bits_per_weight"] for r in sweep],
                    [100 * r["accuracy"] for r in sweep],
                    style,
                    label=f"{'k-means' if method == 'kmeans' else method}, not retrained (1-D raw)",
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
        ax.set_title(f"{part['title']}: accuracy against file size")
        ax.legend(fontsize=6, loc="lower right")
        fig.tight_layout()
        path = folder / "accuracy_vs_bits.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)

        def three_bit_file(method: str, rows: list[dict[str, Any]]) -> Path | None:
            for r in rows:
                if r["method"] == method and r["bits"] == 3 and r["training"] == "none":
                    return out / r["file"]
            return None

        weights = load_file(out / fp32["file"])["fc1.weight"].flatten().numpy()
        fig, ax = plt.subplots(figsize=(7, 4.5))
        ax.hist(weights, bins=200, color="lightgrey", log=True)
        ax.set_yscale("log")
        marks = (("uniform", "tab:blue", "3-bit uniform levels"), ("kmeans", "tab:red", "3-bit k-means centroids"))
        for method, color, label in marks:
            file = three_bit_file(method, rows)
            if file is None:
                continue
            levels = torch.unique(load_file(file)["fc1.weight"]).numpy()
            for i, level in enumerate(levels):
                ax.axvline(level, color=color, linewidth=1, linestyle="-" if method == "kmeans" else ":",
                           label=f"{label} ({file.name})" if i == 0 else None)
        ax.set_xlabel("fc1.weight value")
        ax.set_ylabel("count (log)")
        ax.set_title(f"{part['title']}: fc1.weight ({weights.size:,} values) and the 3-bit levels")
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = folder / "fc1_histogram.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    log(f"plots: {', '.join(p.relative_to(out).as_posix() for p in written)}")
    return written
