"""Benchmark: qpack against torch.save, safetensors and GGUF quantization, side by side.

Run it as a script (pytest does not collect it):

    python tests/benchmarks/bench_formats.py                 # seed net + ~25M synthetic
    python tests/benchmarks/bench_formats.py --size full     # ~100M synthetic (slow to pack)
    python tests/benchmarks/bench_formats.py --quick         # small sizes, for development
    python tests/benchmarks/bench_formats.py --models seed --json out.json --out DIR
    python tests/benchmarks/bench_formats.py --big           # also the 2 GB streaming check

For every model it prints one table row per format and writes everything to ``--json``
(default ``bench_formats.json`` in the current folder):

- file size and bits per weight (file bytes * 8 / elements in the state dict);
- SNR in dB over all quantized weights, computed here from the loaded tensors:
  ``10 log10(sum w^2 / sum (w - w_hat)^2)`` over every float tensor with >= 2 dims and
  >= 64 elements (the tensors qpack's default policy quantizes), the same set for every
  format, so a tensor that a format keeps in f32 counts with zero error;
- pack time: from the fp32 checkpoint file on disk to the output file, in a fresh
  subprocess (torch/safetensors/GGUF read the checkpoint with ``torch.load(mmap=True)``,
  qpack with ``qpack.pack(path)`` which does the same), one run unless ``--pack-runs``;
- load time: best of ``--repeats`` runs after one warm-up round, all formats round-robin in
  this one process (so the page cache is warm for all alike), up to the point where every
  page of every returned tensor is resident (lazily memory-mapped results are touched once
  per page; an in-memory result costs nothing extra); and the ratio to ``torch.load``;
  also the CPU time of the same best runs (all threads of this process), the fairer figure
  on a machine shared with other jobs; rows marked "(numpy)" load a file written for
  another row with ``QPACK_NO_JIT=1`` (qpack's numpy/torch reference code, no numba);
- peak resident memory of the pack step: peak ``RssAnon`` (anonymous memory, so not the
  pages of the memory-mapped input) sampled every 2 ms from a thread in the worker, and the
  kernel's ``VmHWM`` (total RSS, file pages included) reset just before the step.

GGUF rows use gguf-py (``pip install gguf``): ``gguf.quants.quantize`` on the 2-D float
weights whose row length is a multiple of the block size (32); every other tensor is stored
as F32 (I64 for integer buffers, 0-d as 1-element) in a real .gguf file written with
``GGUFWriter``; loading is ``GGUFReader`` + ``gguf.quants.dequantize``. Peers that are not
installed are skipped with a note.

Threads: by default every library runs with its own defaults (torch: one intra-op thread
per core; qpack.load: up to 8 decoding threads; gguf-py and numpy: one). ``--threads N``
sets ``torch.set_num_threads(N)`` in this process and every worker and passes
``threads=N`` to ``qpack.load``. On a machine shared with other jobs, multi-threaded torch
code can slow down several-fold, so compare runs made with the same setting.
"""

from __future__ import annotations

import argparse
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # this checkout's qpack, not an installed one
from _measure import PeakSampler, interleaved_best  # after the sys.path change, on purpose

HERE = Path(__file__).resolve()
REPO = HERE.parents[2]
MB = 1e6

#: quantized weights for the SNR: float, >= 2 dims, >= this many elements (qpack's default)
MIN_NUMEL = 64


# ---------------------------------------------------------------------------------- formats

@dataclass(frozen=True)
class Format:
    """One contender: how to write it (in a worker) and how to read it (here)."""

    key: str
    label: str
    family: str  # "torch", "safetensors", "gguf", "qpack"
    suffix: str
    options: dict[str, Any] = field(default_factory=dict)
    lossless: bool = False
    #: load this other row's file (nothing is packed for this row) ...
    file_of: str | None = None
    #: ... with these environment variables set during the load
    load_env: dict[str, str] = field(default_factory=dict)


FORMATS = [
    Format("torch-fp32", "torch.save fp32", "torch", ".pt", lossless=True),
    Format("safetensors-fp32", "safetensors fp32", "safetensors", ".safetensors", lossless=True),
    Format("gguf-q8_0", "gguf Q8_0", "gguf", ".gguf", {"qtype": "Q8_0"}),
    Format("gguf-q4_0", "gguf Q4_0", "gguf", ".gguf", {"qtype": "Q4_0"}),
    Format("gguf-q4_1", "gguf Q4_1", "gguf", ".gguf", {"qtype": "Q4_1"}),
    Format("qpack-u8", "qpack uniform 8b", "qpack", ".qpk", {"bits": 8, "method": "uniform"}),
    Format("qpack-u8-numpy", "qpack uniform 8b (numpy)", "qpack", ".qpk", file_of="qpack-u8",
           load_env={"QPACK_NO_JIT": "1"}),
    Format("qpack-u4", "qpack uniform 4b", "qpack", ".qpk", {"bits": 4, "method": "uniform"}),
    # the same with nearest rounding: what balanced rounding (the default) costs in pack time and SNR
    Format("qpack-u4-nearest", "qpack uniform 4b, nearest", "qpack", ".qpk",
           {"bits": 4, "method": "uniform", "rounding": "nearest"}),
    Format("qpack-u4-ch", "qpack uniform 4b/ch", "qpack", ".qpk",
           {"bits": 4, "method": "uniform", "granularity": "channel"}),
    Format("qpack-k4", "qpack kmeans 4b", "qpack", ".qpk", {"bits": 4, "method": "kmeans"}),
    Format("qpack-k3", "qpack kmeans 3b", "qpack", ".qpk", {"bits": 3, "method": "kmeans"}),
    Format("qpack-u4-g64", "qpack uniform 4b/g64", "qpack", ".qpk",
           {"bits": 4, "method": "uniform", "granularity": "group:64"}),
    Format("qpack-u3-g64", "qpack uniform 3b/g64", "qpack", ".qpk",
           {"bits": 3, "method": "uniform", "granularity": "group:64"}),
    # per-channel grids with rANS-coded indices, at GGUF Q4_0's and Q4_1's bits per weight
    Format("qpack-u5-ch", "qpack uniform 5b/ch", "qpack", ".qpk",
           {"bits": 5, "method": "uniform", "granularity": "channel"}),
    Format("qpack-t4.53-ch", "qpack target 4.53/ch", "qpack", ".qpk",
           {"target_bpw": 4.53, "method": "uniform", "granularity": "channel", "allocate_granularity": "channel"}),
    Format("qpack-t4.53-ch-numpy", "qpack target 4.53/ch (numpy)", "qpack", ".qpk", file_of="qpack-t4.53-ch",
           load_env={"QPACK_NO_JIT": "1"}),
    Format("qpack-t5.03-ch", "qpack target 5.03/ch", "qpack", ".qpk",
           {"target_bpw": 5.03, "method": "uniform", "granularity": "channel", "allocate_granularity": "channel"}),
    # the same targets with each tensor's granularity chosen too (channel or tensor)
    Format("qpack-t4.53", "qpack target 4.53", "qpack", ".qpk", {"target_bpw": 4.53, "method": "uniform"}),
    Format("qpack-t5.03", "qpack target 5.03", "qpack", ".qpk", {"target_bpw": 5.03, "method": "uniform"}),
]
FORMATS_BY_KEY = {f.key: f for f in FORMATS}
_MODULE_OF_FAMILY = {"torch": "torch", "safetensors": "safetensors", "gguf": "gguf", "qpack": "qpack"}


def missing_module(fmt: Format) -> str | None:
    """The module a format needs that is not installed, or None."""
    module = _MODULE_OF_FAMILY[fmt.family]
    return None if importlib.util.find_spec(module) is not None else module


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


# ------------------------------------------------------------------------------ gguf helpers

def gguf_plan(state: dict[str, Any], qtype_name: str) -> dict[str, str]:
    """Which tensors a GGUF file gets quantized: name -> "quantized" or why it stays F32/I64."""
    import gguf

    qtype = gguf.GGMLQuantizationType[qtype_name]
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    plan = {}
    for name, tensor in state.items():
        if not tensor.is_floating_point():
            plan[name] = "integer: I64/I32 as stored"
        elif tensor.dim() != 2:
            plan[name] = f"{tensor.dim()}-D: F32"
        elif tensor.shape[-1] % block:
            plan[name] = f"row length {tensor.shape[-1]} not a multiple of {block}: F32"
        else:
            plan[name] = "quantized"
    return plan


def gguf_write(state: dict[str, Any], path: str, qtype_name: str) -> dict[str, Any]:
    """Quantize the 2-D weights with gguf-py and write a .gguf file. Returns timings."""
    import gguf
    import numpy as np
    import torch
    from gguf.quants import quantize

    qtype = gguf.GGMLQuantizationType[qtype_name]
    plan = gguf_plan(state, qtype_name)
    writer = gguf.GGUFWriter(path, arch="qpack-bench")
    quantize_s = 0.0
    for name, tensor in state.items():
        array = tensor.detach().cpu().numpy()
        if array.ndim == 0:
            array = array.reshape(1)
        if plan[name] == "quantized":
            started = time.perf_counter()
            data = quantize(array.astype(np.float32, copy=False), qtype)
            quantize_s += time.perf_counter() - started
            writer.add_tensor(name, data, raw_dtype=qtype)
        else:
            if tensor.is_floating_point() and tensor.dtype != torch.float32:
                array = array.astype(np.float32)
            writer.add_tensor(name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return {"quantize_s": quantize_s}


def gguf_read(path: str, timings: dict[str, list[float]]) -> dict[str, Any]:
    """Read a .gguf file back into float32/int torch tensors (dequantizing with gguf-py)."""
    import torch
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize

    plain = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.I8,
             GGMLQuantizationType.I16, GGMLQuantizationType.I32, GGMLQuantizationType.I64}
    reader = GGUFReader(path, "c")  # copy-on-write map: writable arrays, nothing copied yet
    out = {}
    dequantize_s = 0.0
    for tensor in reader.tensors:
        data = tensor.data
        if tensor.tensor_type not in plain:
            started = time.perf_counter()
            data = dequantize(data, tensor.tensor_type)
            dequantize_s += time.perf_counter() - started
        out[tensor.name] = torch.from_numpy(data)
    timings.setdefault("dequantize_s", []).append(dequantize_s)
    return out


# --------------------------------------------------------------------------------- workers

def _read_source(src: str) -> dict[str, Any]:
    import torch

    return torch.load(src, map_location="cpu", weights_only=True, mmap=True)


def worker_pack(fmt: Format, src: str, dst: str) -> dict[str, Any]:
    """The pack step of one format, measured: source checkpoint file -> output file."""
    import torch  # imported before the baseline, like every peer's library

    if fmt.family == "qpack":
        import qpack
    elif fmt.family == "safetensors":
        from safetensors.torch import save_file
    elif fmt.family == "gguf":
        import gguf  # noqa: F401
    extra: dict[str, Any] = {}
    with PeakSampler() as sampler:
        started = time.perf_counter()
        if fmt.family == "torch":
            torch.save(_read_source(src), dst)
        elif fmt.family == "safetensors":
            save_file(_read_source(src), dst)
        elif fmt.family == "gguf":
            extra = gguf_write(_read_source(src), dst, fmt.options["qtype"])
        else:
            report = qpack.pack(src, dst, force=True, **fmt.options)
            extra = {"report_seconds": report.seconds}
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "memory": sampler.result.to_dict(), **extra}


def worker_make_big(dst: str, layers: int, rows: int, cols: int, seed: int) -> dict[str, Any]:
    """Write a large fp32 checkpoint of ``layers`` Gaussian matrices with torch.save."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    state = {}
    for i in range(layers):
        state[f"layers.{i}.weight"] = torch.randn(rows, cols, generator=gen).mul_(0.02)
    started = time.perf_counter()
    torch.save(state, dst)
    return {"seconds": time.perf_counter() - started, "bytes": os.path.getsize(dst),
            "elements": layers * rows * cols}


def run_worker(args: list[str], timeout: float | None = None) -> dict[str, Any]:
    """Run this script in worker mode in a fresh interpreter; its JSON result, or an error."""
    with tempfile.NamedTemporaryFile("r", suffix=".json", delete=False) as handle:
        result_path = handle.name
    try:
        proc = subprocess.run([sys.executable, str(HERE), "--worker", *args, "--result", result_path],
                              capture_output=True, text=True, timeout=timeout, check=False)
        text = Path(result_path).read_text()
        result = json.loads(text) if text.strip() else {}
        if proc.returncode != 0 and "error" not in result:
            result["error"] = f"worker exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"
        return result
    except subprocess.TimeoutExpired:
        return {"error": f"worker timed out after {timeout} s"}
    finally:
        os.unlink(result_path)


# ---------------------------------------------------------------------------------- models

@dataclass(frozen=True)
class TransformerShape:
    """A GPT-style decoder: token and position embeddings, pre-LN blocks, tied output head."""

    layers: int
    d_model: int
    d_ff: int
    vocab: int
    positions: int

    def numel(self) -> int:
        d, f = self.d_model, self.d_ff
        block = 3 * d * d + 3 * d + d * d + d + 2 * d * f + f + d + 4 * d
        return self.layers * block + (self.vocab + self.positions) * d + 2 * d


#: ~100M parameters (99,998,208): 12 layers of d_model 768, MLP 3072, vocabulary 18432
SYNTHETIC_FULL = TransformerShape(layers=12, d_model=768, d_ff=3072, vocab=18432, positions=1024)
#: ~25M parameters (25,468,928), the default: packs and loads in a few minutes on 2 cores
SYNTHETIC_MEDIUM = TransformerShape(layers=6, d_model=512, d_ff=2048, vocab=12288, positions=512)
#: ~2.6M parameters for --quick
SYNTHETIC_QUICK = TransformerShape(layers=2, d_model=256, d_ff=1024, vocab=4096, positions=512)


def synthetic_state(shape: TransformerShape, seed: int = 0) -> dict[str, Any]:
    """A transformer-shaped fp32 state dict with weight-like values, from a fixed seed.

    Scales follow GPT-2-style initialisation after some training: embeddings and q/k/v
    Gaussian with std 0.02, the residual-branch projections (attention out, MLP down) std
    0.02 / sqrt(2 * layers), MLP weights Laplace-distributed (heavier tails), every matrix
    row scaled by a log-normal factor (sigma 0.25) so that rows differ in range as trained
    rows do; biases N(0, 0.02^2); layer-norm weights 1 + N(0, 0.05^2).
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    d, f, n = shape.d_model, shape.d_ff, shape.layers
    small = 0.02 / math.sqrt(2 * n)

    def gauss(*size: int, std: float) -> torch.Tensor:
        return torch.randn(*size, generator=gen).mul_(std)

    def laplace(*size: int, std: float) -> torch.Tensor:
        u = torch.rand(*size, generator=gen).sub_(0.5)  # inverse CDF, scale b = std / sqrt 2
        return u.sign().mul_(torch.log1p(u.abs().mul_(-2).clamp_(min=-1 + 1e-7))).mul_(-std / math.sqrt(2))

    def rows(w: torch.Tensor) -> torch.Tensor:
        return w.mul_(torch.randn(w.shape[0], 1, generator=gen).mul_(0.25).exp_())

    state: dict[str, torch.Tensor] = {
        "tok_emb.weight": gauss(shape.vocab, d, std=0.02),
        "pos_emb.weight": gauss(shape.positions, d, std=0.01),
    }
    for i in range(n):
        p = f"blocks.{i}."
        state[p + "ln1.weight"] = gauss(d, std=0.05).add_(1)
        state[p + "ln1.bias"] = gauss(d, std=0.02)
        state[p + "attn.qkv.weight"] = rows(gauss(3 * d, d, std=0.02))
        state[p + "attn.qkv.bias"] = gauss(3 * d, std=0.02)
        state[p + "attn.out.weight"] = rows(gauss(d, d, std=small))
        state[p + "attn.out.bias"] = gauss(d, std=0.02)
        state[p + "ln2.weight"] = gauss(d, std=0.05).add_(1)
        state[p + "ln2.bias"] = gauss(d, std=0.02)
        state[p + "mlp.up.weight"] = rows(laplace(f, d, std=0.02))
        state[p + "mlp.up.bias"] = gauss(f, std=0.02)
        state[p + "mlp.down.weight"] = rows(laplace(d, f, std=small))
        state[p + "mlp.down.bias"] = gauss(d, std=0.02)
    state["ln_f.weight"] = gauss(d, std=0.05).add_(1)
    state["ln_f.bias"] = gauss(d, std=0.02)
    assert sum(t.numel() for t in state.values()) == shape.numel()
    return state


def seed_state() -> dict[str, Any]:
    """The seed network's state dict (random init, seed 0; BatchNorm buffers included)."""
    import torch
    from qpack.demo.net import SeedNet

    torch.manual_seed(0)
    return SeedNet().state_dict()


# ------------------------------------------------------------------------------- measuring

def quantized_set(state: dict[str, Any]) -> list[str]:
    """The weights the SNR is computed over (same set for every format)."""
    return [name for name, t in state.items()
            if t.is_floating_point() and t.dim() >= 2 and t.numel() >= MIN_NUMEL]


def snr_db(reference: dict[str, Any], loaded: dict[str, Any], names: list[str]) -> tuple[float, float]:
    """10 log10(sum w^2 / sum (w - w_hat)^2) over ``names``; also the noise/signal sums ratio.

    Returns:
        (SNR in dB (inf when lossless), relative RMS error).
    """
    import torch

    signal = noise = 0.0
    for name in names:
        w = reference[name].reshape(-1)
        w_hat = loaded[name].reshape(-1)
        if w_hat.numel() != w.numel():
            raise ValueError(f"{name}: loaded {w_hat.numel()} elements, expected {w.numel()}")
        for start in range(0, w.numel(), 1 << 22):  # bounded float64 temporaries
            a = w[start:start + (1 << 22)].to(torch.float64)
            e = w_hat[start:start + (1 << 22)].to(torch.float64).sub_(a)
            signal += float(torch.dot(a, a))
            noise += float(torch.dot(e, e))
    if noise == 0.0:
        return math.inf, 0.0
    return 10 * math.log10(signal / noise), math.sqrt(noise / signal)


def touch(state: dict[str, Any]) -> float:
    """Read one value per 4 KiB page of every tensor, so lazily mapped results get resident."""
    import torch

    total = 0.0
    for tensor in state.values():
        if tensor.numel():
            step = max(1, 4096 // tensor.element_size())
            total += float(tensor.reshape(-1)[::step].to(torch.float64).sum())
    return total


def loader(fmt: Format, path: str, timings: dict[str, list[float]],
           threads: int | None) -> Callable[[], dict[str, Any]]:
    """A function that loads ``path`` as ``fmt`` and makes every tensor resident."""
    import torch

    if fmt.family == "torch":
        def load() -> dict[str, Any]:
            return torch.load(path, map_location="cpu", weights_only=True)
    elif fmt.family == "safetensors":
        from safetensors.torch import load_file

        def load() -> dict[str, Any]:
            return load_file(path)
    elif fmt.family == "gguf":
        def load() -> dict[str, Any]:
            return gguf_read(path, timings)
    else:
        import qpack

        def load() -> dict[str, Any]:
            return qpack.load(path, threads=threads)

    def load_and_touch() -> dict[str, Any]:
        saved = {k: os.environ.get(k) for k in fmt.load_env}
        os.environ.update(fmt.load_env)
        started = time.process_time()
        try:
            state = load()
            touch(state)
        finally:
            timings.setdefault("cpu_s", []).append(time.process_time() - started)
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return state
    return load_and_touch


@dataclass
class Row:
    """One format's results on one model (the JSON row)."""

    format: str
    label: str
    available: bool = True
    notes: list[str] = field(default_factory=list)
    file_bytes: int | None = None
    bits_per_weight: float | None = None
    snr_db: float | None = None
    lossless: bool = False
    rel_rms: float | None = None
    snr_db_own: float | None = None
    pack_s: float | None = None
    pack_runs_s: list[float] = field(default_factory=list)
    pack_peak_anon_bytes: int | None = None
    pack_baseline_anon_bytes: int | None = None
    pack_peak_rss_bytes: int | None = None
    load_s: float | None = None
    load_runs_s: list[float] = field(default_factory=list)
    load_vs_torch: float | None = None
    load_cpu_s: float | None = None
    load_cpu_vs_torch: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


def bench_model(name: str, state: dict[str, Any], formats: list[Format], out_dir: Path, repeats: int,
                pack_runs: int, threads: int | None, log: Callable[[str], None]) -> dict[str, Any]:
    """Pack (in workers), load (round-robin here) and score every format on one model."""
    import torch

    src = out_dir / f"{name}-source.pt"
    torch.save(state, src)
    elements = sum(t.numel() for t in state.values())
    names = quantized_set(state)
    shapes = {k: tuple(t.shape) for k, t in state.items()}
    del state
    gc.collect()
    reference = torch.load(src, map_location="cpu", weights_only=True, mmap=True)
    model = {"name": name, "elements": elements, "tensors": len(shapes),
             "source_bytes": os.path.getsize(src),
             "snr_set": {"tensors": len(names), "elements": sum(reference[n].numel() for n in names)},
             "rows": []}
    rows: dict[str, Row] = {}
    paths: dict[str, Path] = {}
    for fmt in formats:
        row = rows[fmt.key] = Row(fmt.key, fmt.label, lossless=fmt.lossless)
        missing = missing_module(fmt)
        if missing:
            row.available = False
            row.notes.append(f"skipped: {missing} is not installed")
            log(f"  {name}: {fmt.label}: skipped ({missing} not installed)")
            continue
        if fmt.file_of is not None:
            if fmt.file_of in paths:
                source = rows[fmt.file_of]
                paths[fmt.key] = paths[fmt.file_of]
                row.file_bytes, row.bits_per_weight = source.file_bytes, source.bits_per_weight
                row.notes.append(f"the file of {source.label}, loaded with {fmt.load_env}")
            else:
                row.notes.append(f"skipped: needs the row {fmt.file_of}")
            continue
        dst = paths[fmt.key] = out_dir / f"{name}-{fmt.key}{fmt.suffix}"
        if fmt.family == "gguf":
            plan = gguf_plan(reference, fmt.options["qtype"])
            kept = {k: v for k, v in plan.items() if v != "quantized" and k in names}
            row.extra["gguf_quantized_tensors"] = sum(v == "quantized" for v in plan.values())
            row.extra["gguf_f32_weights"] = kept
            if kept:
                row.notes.append(f"{len(kept)} of {len(names)} weights stay F32 in GGUF: "
                                 + ", ".join(f"{k} ({v.split(':')[0]})" for k, v in list(kept.items())[:6])
                                 + (" ..." if len(kept) > 6 else ""))
        for run in range(pack_runs):
            log(f"  {name}: pack {fmt.label} (run {run + 1}/{pack_runs})")
            result = run_worker(["pack", "--format", fmt.key, "--src", str(src), "--dst", str(dst)]
                                + (["--threads", str(threads)] if threads else []))
            if "error" in result:
                row.notes.append(f"pack failed: {result['error']}")
                log(f"    FAILED: {result['error'][-500:]}")
                break
            memory = result["memory"]
            row.pack_runs_s.append(result["seconds"])
            row.pack_peak_anon_bytes = max(row.pack_peak_anon_bytes or 0, memory["peak_anon"])
            row.pack_peak_rss_bytes = max(row.pack_peak_rss_bytes or 0, memory["peak_rss"])
            row.pack_baseline_anon_bytes = memory["baseline_anon"]
            for key in ("quantize_s", "report_seconds"):
                if key in result:
                    row.extra.setdefault(key + "_runs", []).append(result[key])
        if not row.pack_runs_s:
            paths.pop(fmt.key)
            continue
        row.pack_s = min(row.pack_runs_s)
        row.file_bytes = os.path.getsize(dst)
        row.bits_per_weight = row.file_bytes * 8 / elements

    timings: dict[str, dict[str, list[float]]] = {key: {} for key in paths}
    loaders = {key: loader(FORMATS_BY_KEY[key], str(path), timings[key], threads) for key, path in paths.items()}

    def score(key: str, loaded: dict[str, Any]) -> None:
        row = rows[key]
        missing = [k for k in shapes if k not in loaded]
        if missing:
            row.notes.append(f"loaded file lacks {len(missing)} tensors: {missing[:4]}")
            return
        row.snr_db, row.rel_rms = snr_db(reference, loaded, names)
        fmt = FORMATS_BY_KEY[key]
        if fmt.family == "gguf":
            own = [n for n in names if n not in row.extra.get("gguf_f32_weights", {})]
            row.snr_db_own = snr_db(reference, loaded, own)[0] if own else None
        if row.snr_db == math.inf:
            row.lossless = True
        elif fmt.lossless:
            row.notes.append("expected lossless but is not")

    log(f"  {name}: load {len(loaders)} formats, 1 warm-up + {repeats} rounds, round-robin")
    times = interleaved_best(loaders, repeats, warmup=1, after=score)
    for key, runs in times.items():
        row = rows[key]
        row.load_runs_s = runs
        row.load_s = min(runs)
        cpu_runs = timings[key].get("cpu_s", [])[1:]  # the warm-up round left out
        row.load_cpu_s = cpu_runs[runs.index(row.load_s)] if len(cpu_runs) == len(runs) else None
        dequantize_runs = timings[key].get("dequantize_s", [])[1:]  # the warm-up round left out
        if dequantize_runs:
            row.extra["dequantize_s_runs"] = dequantize_runs
            row.extra["dequantize_s_of_best_load"] = dequantize_runs[runs.index(row.load_s)]
    base = rows.get("torch-fp32")
    if base is not None and base.load_s:
        for row in rows.values():
            if row.load_s is not None:
                row.load_vs_torch = row.load_s / base.load_s
            if row.load_cpu_s is not None and base.load_cpu_s:
                row.load_cpu_vs_torch = row.load_cpu_s / base.load_cpu_s
    model["rows"] = [_json_row(row) for row in rows.values()]
    return model


def _json_row(row: Row) -> dict[str, Any]:
    out = dict(row.__dict__)
    for key, value in out.items():
        if isinstance(value, float) and not math.isfinite(value):
            out[key] = None
    return out


def bench_big(out_dir: Path, layers: int, rows: int, cols: int, threads: int | None,
              log: Callable[[str], None]) -> dict[str, Any]:
    """The streaming check: pack a large fp32 checkpoint in a worker; peak anonymous memory."""
    src = out_dir / "big-source.pt"
    dst = out_dir / "big-qpack-u8.qpk"
    result: dict[str, Any] = {"layers": layers, "shape": [rows, cols]}
    try:
        log(f"big: writing {layers} x {rows}x{cols} fp32 with torch.save")
        made = run_worker(["make-big", "--dst", str(src), "--layers", str(layers), "--rows", str(rows),
                           "--cols", str(cols)])
        if "error" in made:
            result["error"] = made["error"]
            return result
        result["source_bytes"] = made["bytes"]
        result["elements"] = made["elements"]
        log(f"big: pack {made['bytes'] / 1e9:.2f} GB with qpack uniform 8b")
        packed = run_worker(["pack", "--format", "qpack-u8", "--src", str(src), "--dst", str(dst)]
                            + (["--threads", str(threads)] if threads else []))
        if "error" in packed:
            result["error"] = packed["error"]
            return result
        memory = packed["memory"]
        result.update({
            "format": "qpack-u8", "pack_s": packed["seconds"], "file_bytes": os.path.getsize(dst),
            "peak_anon_bytes": memory["peak_anon"], "baseline_anon_bytes": memory["baseline_anon"],
            "peak_rss_bytes": memory["peak_rss"], "samples": memory["samples"],
            "goal_peak_anon_bytes": 1 << 30, "meets_goal": memory["peak_anon"] < (1 << 30),
        })
        return result
    finally:
        for path in (src, dst):
            path.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------- output

def _fmt(value: float | None, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def table(models: list[dict[str, Any]]) -> str:
    """The results as one plain-text table."""
    head = ["model", "format", "file MB", "bits/w", "SNR dB", "pack s", "load s", "load/torch",
            "load CPU s", "CPU/torch", "pack anon MB", "pack RSS MB"]
    lines = []
    for model in models:
        for row in model["rows"]:
            if not row["available"] or row["file_bytes"] is None:
                lines.append([model["name"], row["label"], "skipped"] + [""] * 9)
                continue
            snr = "lossless" if row["lossless"] else _fmt(row["snr_db"], ".2f")
            lines.append([
                model["name"], row["label"], _fmt(row["file_bytes"] / MB, ".2f"), _fmt(row["bits_per_weight"], ".3f"),
                snr, _fmt(row["pack_s"], ".3f"), _fmt(row["load_s"], ".4f"), _fmt(row["load_vs_torch"], ".2f"),
                _fmt(row.get("load_cpu_s"), ".4f"), _fmt(row.get("load_cpu_vs_torch"), ".2f"),
                _fmt(row["pack_peak_anon_bytes"] and row["pack_peak_anon_bytes"] / MB, ".0f"),
                _fmt(row["pack_peak_rss_bytes"] and row["pack_peak_rss_bytes"] / MB, ".0f"),
            ])
    widths = [max(len(str(x)) for x in col) for col in zip(head, *lines)]
    right = [False, False] + [True] * (len(head) - 2)

    def render(cells: list[str]) -> str:
        return "  ".join(c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right)).rstrip()

    out = [render(head), render(["-" * w for w in widths])]
    previous = None
    for cells in lines:
        if previous is not None and cells[0] != previous:
            out.append("")
        out.append(render(cells))
        previous = cells[0]
    return "\n".join(out)


def notes_text(models: list[dict[str, Any]], big: dict[str, Any] | None) -> str:
    """Per-model notes (skips, GGUF F32 fallbacks, baselines) and the streaming check."""
    out = []
    for model in models:
        base = [r["pack_baseline_anon_bytes"] / MB for r in model["rows"] if r["pack_baseline_anon_bytes"]]
        out.append(f"{model['name']}: {model['elements']:,} elements in {model['tensors']} tensors; "
                   f"SNR over {model['snr_set']['tensors']} weights ({model['snr_set']['elements']:,} elements)"
                   + (f"; pack workers' RssAnon before the step (imports) {min(base):.0f}-{max(base):.0f} MB"
                      if base else ""))
        for row in model["rows"]:
            for note in row["notes"]:
                out.append(f"  {row['label']}: {note}")
            extra = row["extra"]
            bits = []
            if "quantize_s_runs" in extra:
                bits.append(f"quantize {min(extra['quantize_s_runs']):.3f} s")
            if "dequantize_s_of_best_load" in extra:
                bits.append(f"dequantize {extra['dequantize_s_of_best_load']:.3f} s (of the best load)")
            if row.get("snr_db_own") is not None and row["snr_db_own"] != row["snr_db"]:
                bits.append(f"SNR over the tensors it quantized {row['snr_db_own']:.2f} dB")
            if bits and row["file_bytes"] is not None:
                out.append(f"  {row['label']}: " + "; ".join(bits))
    if big is not None:
        if "error" in big:
            out.append(f"big: FAILED: {big['error']}")
        else:
            out.append(
                f"big (streaming): qpack uniform 8b on a {big['source_bytes'] / 1e9:.2f} GB torch.save checkpoint "
                f"({big['layers']} x {big['shape'][0]}x{big['shape'][1]} fp32): pack {big['pack_s']:.1f} s, "
                f"peak RssAnon {big['peak_anon_bytes'] / MB:.0f} MB (before the step {big['baseline_anon_bytes'] / MB:.0f} MB), "
                f"peak RSS incl. mapped input {big['peak_rss_bytes'] / MB:.0f} MB, file {big['file_bytes'] / MB:.0f} MB; "
                f"goal peak anon < 1 GiB: {'met' if big['meets_goal'] else 'NOT met'}")
    return "\n".join(out)


# ------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small synthetic model (~2.8M elements), same as --size quick")
    parser.add_argument("--size", choices=["quick", "medium", "full"], default="medium",
                        help="synthetic model: ~2.8M, ~25M (default) or ~100M elements")
    parser.add_argument("--models", default="seed,synthetic", help="comma-separated: seed, synthetic")
    parser.add_argument("--formats", default=",".join(f.key for f in FORMATS),
                        help="comma-separated subset of: " + ", ".join(f.key for f in FORMATS))
    parser.add_argument("--json", default="bench_formats.json", help="where to write the results")
    parser.add_argument("--out", help="folder for the files written (default: a temporary folder, removed)")
    parser.add_argument("--repeats", type=int, help="timed load rounds after the warm-up (default 3, seed 10)")
    parser.add_argument("--pack-runs", type=int, default=1, help="pack each format this many times (best time)")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads in every process, and qpack.load(threads=N) "
                             "(default: each library's own default)")
    parser.add_argument("--big", action="store_true", help="also the ~2 GB streaming check")
    parser.add_argument("--big-layers", type=int, default=24, help=argparse.SUPPRESS)
    parser.add_argument("--big-shape", default="4096x5120", help=argparse.SUPPRESS)
    # worker mode (internal)
    parser.add_argument("--worker", choices=["pack", "make-big"], help=argparse.SUPPRESS)
    parser.add_argument("--format", help=argparse.SUPPRESS)
    parser.add_argument("--src", help=argparse.SUPPRESS)
    parser.add_argument("--dst", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--rows", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--cols", type=int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def worker_main(args: argparse.Namespace) -> int:
    try:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        if args.worker == "pack":
            result = worker_pack(FORMATS_BY_KEY[args.format], args.src, args.dst)
        else:
            result = worker_make_big(args.dst, args.layers, args.rows, args.cols, seed=1)
        code = 0
    except Exception as exc:  # reported to the parent, which records it as a note
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
        code = 1
    Path(args.result).write_text(json.dumps(result))
    return code


def environment() -> dict[str, Any]:
    import torch

    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                            check=False)
    dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "qpack"], capture_output=True, text=True,
                           check=False)
    return {
        "python": platform.python_version(), "platform": platform.platform(), "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "versions": {d: _version(d) for d in ("torch", "numpy", "qpack", "safetensors", "gguf", "zstandard")},
        "git_commit": commit.stdout.strip() or None, "qpack_tree_dirty": bool(dirty.stdout.strip()),
        "qpack_path": str(Path(importlib.util.find_spec("qpack").origin).parent)
        if importlib.util.find_spec("qpack") else None,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        return worker_main(args)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = [m for m in models if m not in ("seed", "synthetic")]
    keys = [k.strip() for k in args.formats.split(",") if k.strip()]
    bad = [k for k in keys if k not in FORMATS_BY_KEY]
    if unknown or bad:
        log(f"unknown model(s) {unknown} or format(s) {bad}")
        return 2
    formats = [FORMATS_BY_KEY[k] for k in keys]
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    size = "quick" if args.quick else args.size
    shape = {"quick": SYNTHETIC_QUICK, "medium": SYNTHETIC_MEDIUM, "full": SYNTHETIC_FULL}[size]
    own_dir = args.out is None
    out_dir = Path(tempfile.mkdtemp(prefix="bench_formats-")) if own_dir else Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: list[dict[str, Any]] = []
    big = None
    try:
        for name in models:
            log(f"{name}: building the state dict")
            state = seed_state() if name == "seed" else synthetic_state(shape)
            repeats = args.repeats or (10 if name == "seed" else 3)
            results.append(bench_model(name, state, formats, out_dir, repeats, args.pack_runs, args.threads, log))
            del state
        if args.big:
            rows, cols = (int(x) for x in args.big_shape.split("x"))
            big = bench_big(out_dir, args.big_layers, rows, cols, args.threads, log)
    finally:
        if own_dir:
            shutil.rmtree(out_dir, ignore_errors=True)
    report = {
        "schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": time.perf_counter() - started,
        "options": {"quick": args.quick, "size": size, "models": models, "formats": keys, "pack_runs": args.pack_runs, "threads": args.threads,
                    "repeats": args.repeats, "synthetic_shape": shape.__dict__ if "synthetic" in models else None,
                    "out": None if own_dir else str(out_dir), "snr_min_numel": MIN_NUMEL},
        "environment": environment(),
        "models": results, "big": big,
    }
    Path(args.json).write_text(json.dumps(report, indent=1))
    if results:
        print(table(results))
        print()
    print(notes_text(results, big))
    print(f"\nJSON: {Path(args.json).resolve()}  ({time.perf_counter() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
