"""Inference from packed weights (``load_into(..., packed=True)``) against dequantized and fp32.

Side by side in one run, on this machine's CPU:

1. memory of a transformer-shaped model (``--layers`` blocks of d x 4d): bytes of the tensors
   the model holds and the peak RSS of a fresh process that builds and loads it, for fp32,
   dequantized (``qpack.load_into``) and packed, for an 8-bit, a 4-bit and a k-means file;
   and the packed bytes against the bound of the issue: quantized payloads in byte
   containers (1 byte per index, half a byte at <= 4 bits) plus their parameters plus the
   lossless tensors;
2. forward latency of that model at batch 1 and 32 (rows of activations);
3. one 4096 x 4096 linear layer at batch 1 and 32: fp32, ``torch._weight_int8pack_mm`` with
   fp32 and bf16 activations, dequantize-then-linear, and each packed path.

    OMP_NUM_THREADS=2 python tests/benchmarks/bench_packed.py [--layers 12] [--threads 2] [--json out.json]

The peak-memory children build the model on the meta device and allocate it with
``to_empty`` (storage the loader then fills or drops), so the fp32 initialisation of a layer
that ends up packed never touches memory: the recipe the README gives for models larger than
memory at fp32.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
import qpack  # noqa: E402
import qpack.packed as packed_mod  # noqa: E402
from _measure import interleaved_best, read_status  # noqa: E402
from qpack.dtypes import itemsize  # noqa: E402
from qpack.packed import packed_bytes, summary  # noqa: E402
from qpack.reader import QpkReader  # noqa: E402

FILES = {"8-bit uniform, per channel": dict(bits=8, granularity="channel"),
         "4-bit uniform, per channel": dict(bits=4, granularity="channel"),
         "4-bit k-means, per tensor": dict(bits=4, method="kmeans")}


class Block(nn.Module):
    """The dense layers of a transformer block (attention's mixing left out: it holds no weights)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(self.norm1(x)).chunk(3, dim=-1)
        x = x + self.out(v * torch.sigmoid(q * k))
        return x + self.down(nn.functional.gelu(self.up(self.norm2(x))))


class Model(nn.Module):
    def __init__(self, layers: int, d: int, vocab: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[Block(d) for _ in range(layers)])
        self.head = nn.Linear(d, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(ids)))


def baseline_bytes(path: Path) -> int:
    """Quantized payloads in byte containers plus their stored parameters, plus lossless tensors."""
    total = 0
    with QpkReader(path) as reader:
        for entry in reader.entries.values():
            if entry.encoding == "raw":
                total += entry.numel * itemsize(entry.dtype)
            else:
                total += math.ceil(entry.numel / 2) if entry.bits <= 4 else entry.numel
                total += sum(len(v) for v in entry.params.values() if isinstance(v, bytes))
    return total


def child(mode: str, path: str, layers: int, d: int, vocab: int) -> None:
    """Build and load one model in this fresh process; print its peak memory as JSON."""
    torch.set_num_threads(1)
    start = read_status()
    with torch.device("meta"):
        model = Model(layers, d, vocab)
    model = model.to_empty(device="cpu")
    if mode == "fp32":
        with torch.no_grad():
            for p in model.parameters():
                p.normal_(0, 0.02)
    else:
        qpack.load_into(model, path, packed=mode == "packed")
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    end = read_status()
    print(json.dumps({"held_bytes": packed_bytes(model), "peak_rss": end["VmHWM"] - start["VmRSS"],
                      "rss_after": end["VmRSS"] - start["VmRSS"]}))


def measure_child(mode: str, path: Path | str, args: argparse.Namespace) -> dict[str, int]:
    out = subprocess.run([sys.executable, __file__, "--child", mode, str(path), "--layers", str(args.layers),
                          "--d-model", str(args.d_model), "--vocab", str(args.vocab)],
                         check=True, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def median_ms(times: list[float]) -> float:
    return statistics.median(times) * 1e3


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", default="bench_packed.json")
    parser.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.layers, args.d_model, args.vocab)
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": args.threads,
                                 "torch": torch.__version__, "fused_kernel": packed_mod.fused_rows() > 0,
                                 "load_average": os.getloadavg()},
                     "model": {"layers": args.layers, "d_model": args.d_model, "vocab": args.vocab}}
    fp32 = Model(args.layers, args.d_model, args.vocab)
    for p in fp32.parameters():
        nn.init.normal_(p, 0, 0.02) if p.dim() > 1 else None
    tmp = Path(tempfile.mkdtemp(prefix="bench_packed_"))

    # 1. memory --------------------------------------------------------------------------
    print(f"model: {args.layers} blocks of {args.d_model} x {4 * args.d_model}, vocab {args.vocab}, "
          f"{sum(p.numel() for p in fp32.parameters()) / 1e6:.1f} M parameters; {args.threads} threads")
    memory = {"fp32": {"held_bytes": packed_bytes(fp32), **measure_child("fp32", "-", args)}}
    models: dict[str, nn.Module] = {}
    print(f"\n{'file':28} {'model':12} {'held MB':>9} {'peak RSS MB':>12} {'bound MB':>9} {'held/bound':>10}")
    print(f"{'(none)':28} {'fp32':12} {memory['fp32']['held_bytes'] / 1e6:9.1f} {memory['fp32']['peak_rss'] / 1e6:12.1f}")
    for label, options in FILES.items():
        path = tmp / f"{options.get('method', 'uniform')}{options['bits']}.qpk"
        qpack.pack(fp32.state_dict(), path, **options)
        bound = baseline_bytes(path)
        rows = {}
        for mode in ("dequantized", "packed"):
            row = measure_child(mode, path, args)
            rows[mode] = row
            ratio = row["held_bytes"] / bound
            print(f"{label:28} {mode:12} {row['held_bytes'] / 1e6:9.1f} {row['peak_rss'] / 1e6:12.1f} "
                  f"{bound / 1e6:9.1f} {ratio:10.3f}")
        model = Model(args.layers, args.d_model, args.vocab)
        qpack.load_into(model, path, packed=True)
        rows["paths"] = summary(model)
        rows["bound_bytes"] = bound
        rows["packed_over_bound"] = rows["packed"]["held_bytes"] / bound
        rows["file_bytes"] = path.stat().st_size
        memory[label] = rows
        models[label] = model
    results["memory"] = memory

    # 2. model latency ---------------------------------------------------------------------
    latency = {}
    print(f"\nforward of the whole model, median ms of {args.repeats} ({args.threads} threads)")
    print(f"{'model':42} {'batch 1':>9} {'batch 32':>9}")
    contenders = {"fp32 (= dequantized)": fp32, **{f"packed {k}": m for k, m in models.items()}}
    for batch in (1, 32):
        ids = torch.randint(0, args.vocab, (batch, 1))
        with torch.no_grad():
            times = interleaved_best({name: (lambda m=m: m(ids)) for name, m in contenders.items()}, args.repeats)
        for name, runs in times.items():
            latency.setdefault(name, {})[f"batch_{batch}_ms"] = median_ms(runs)
    for name, row in latency.items():
        print(f"{name:42} {row['batch_1_ms']:9.2f} {row['batch_32_ms']:9.2f}")
    results["model_latency"] = latency

    # 3. one 4096 x 4096 linear ------------------------------------------------------------
    n = 4096
    layer = nn.Sequential(nn.Linear(n, n, bias=False))
    nn.init.normal_(layer[0].weight, 0, 0.02)
    single = {}
    loaded = {}
    for label, options in FILES.items():
        path = tmp / f"linear_{options.get('method', 'uniform')}{options['bits']}.qpk"
        qpack.pack(layer.state_dict(), path, **options)
        net = nn.Sequential(nn.Linear(n, n, bias=False))
        qpack.load_into(net, path, packed=True)
        loaded[label] = (path, net)

    def forced(label: str, kernel: str) -> nn.Module:
        net = nn.Sequential(nn.Linear(n, n, bias=False))
        with QpkReader(loaded[label][0]) as reader:
            packed_mod.pack_modules(net, reader, torch.device("cpu"), kernels=(kernel,))
        assert net[0].kernel == kernel, (label, kernel, net[0].kernel)
        return net

    path8, net8 = loaded["8-bit uniform, per channel"]
    net4, netk = loaded["4-bit uniform, per channel"][1], loaded["4-bit k-means, per tensor"][1]
    weight8 = qpack.load(path8)["0.weight"]
    s8, scales8 = net8[0].packed.container, net8[0].packed.scales
    rebuild8 = forced("8-bit uniform, per channel", "dequantize")
    int4 = forced("4-bit uniform, per channel", "int4mm")
    rebuild4 = forced("4-bit uniform, per channel", "dequantize")
    lookup = forced("4-bit k-means, per tensor", "lookup")
    print(f"\none {n} x {n} linear, median ms of {args.repeats * 2} ({args.threads} threads)")
    print(f"{'path':52} {'batch 1':>9} {'batch 32':>9} {'x fp32 (b1)':>11}")
    for batch in (1, 32):
        x = torch.randn(batch, n)
        xb = x.bfloat16()
        scalesb = scales8.bfloat16()
        fns = {"fp32 F.linear": lambda x=x: nn.functional.linear(x, weight8),
               "torch._weight_int8pack_mm, fp32 activations": lambda x=x: torch._weight_int8pack_mm(x, s8, scales8),
               "torch._weight_int8pack_mm, bf16 activations": lambda: torch._weight_int8pack_mm(xb, s8, scalesb),
               "packed 8-bit: fused int8 kernel (numba)": lambda x=x: net8(x),
               "packed 8-bit: int8pack_mm + min term": lambda x=x: net8[0]._torch_kernel(x),
               "packed 8-bit: rebuild, then F.linear": lambda x=x: rebuild8(x),
               "packed 4-bit: fused row-rebuild kernel (numba)": lambda x=x: net4(x),
               "packed 4-bit: int4pack_mm": lambda x=x: int4[0]._torch_kernel(x),
               "packed 4-bit: rebuild, then F.linear": lambda x=x: rebuild4(x),
               "packed 4-bit k-means: fused (numba)": lambda x=x: netk(x),
               "packed 4-bit k-means: lookup, then F.linear": lambda x=x: lookup(x)}
        if packed_mod.fused_rows() < batch:
            for name in [k for k in fns if "numba" in k]:
                fns.pop(name)
        with torch.no_grad():
            times = interleaved_best(fns, args.repeats * 2)
        for name, runs in times.items():
            single.setdefault(name, {})[f"batch_{batch}_ms"] = median_ms(runs)
    base = single["fp32 F.linear"]["batch_1_ms"]
    for name, row in single.items():
        b1, b32 = row.get("batch_1_ms", float("nan")), row.get("batch_32_ms", float("nan"))
        row["over_fp32_batch_1"] = b1 / base
        print(f"{name:52} {b1:9.2f} {b32:9.2f} {b1 / base:11.2f}")
    results["linear_4096"] = single
    results["machine"]["load_average_end"] = os.getloadavg()
    Path(args.json).write_text(json.dumps(results, indent=2))
    print(f"\nload average {results['machine']['load_average']} -> {results['machine']['load_average_end']}")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
