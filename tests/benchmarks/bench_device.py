"""Loading onto a device: qpack.load(device=...) against torch.load(...).to(device).

qpack moves only the packed indices and their parameters to the device and unpacks and
dequantizes there, so host-to-device traffic is about the packed size. This script measures,
side by side in one run, on a synthetic transformer-shaped fp32 state dict:

- the CPU load: torch.load of the fp32 file against qpack.load of 8- and 4-bit files;
- the device load (when CUDA is present): torch.load(fp32).to(device) and
  torch.load(map_location=device) against qpack.load(device=...);
- bytes that cross to the device, time, and GB/s of fp32-equivalent weights produced;
- that the device path gives exactly the CPU path's tensors.

    python tests/benchmarks/bench_device.py [--layers 12] [--d-model 1024] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import qpack  # noqa: E402


def synthetic_state(layers: int, d_model: int, vocab: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Transformer-shaped fp32 weights: Laplace attention, Gaussian MLP, realistic scales."""
    gen = torch.Generator().manual_seed(seed)
    laplace = torch.distributions.Laplace(0.0, 0.02)
    torch.manual_seed(seed)
    state = {"embed.weight": torch.randn(vocab, d_model, generator=gen) * 0.02}
    for i in range(layers):
        p = f"layers.{i}."
        state[p + "attn.qkv.weight"] = laplace.sample((3 * d_model, d_model))
        state[p + "attn.qkv.bias"] = torch.randn(3 * d_model, generator=gen) * 0.01
        state[p + "attn.out.weight"] = laplace.sample((d_model, d_model))
        state[p + "mlp.up.weight"] = torch.randn(4 * d_model, d_model, generator=gen) * 0.02
        state[p + "mlp.down.weight"] = torch.randn(d_model, 4 * d_model, generator=gen) * 0.01
        state[p + "ln.weight"] = torch.ones(d_model)
        state[p + "ln.bias"] = torch.zeros(d_model)
    return state


def best_of(fn, repeats: int, sync: bool = False) -> float:
    fn()  # warm-up: page cache, allocator, CUDA context
    if sync:
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best


def device_bytes(path: Path) -> int:
    """Bytes qpack.load sends to the device: decompressed payloads plus parameters."""
    with qpack.QpkReader(path) as reader:
        total = 0
        for entry in reader.entries.values():
            total += entry.raw_length
            total += sum(len(v) for v in entry.params.values() if isinstance(v, bytes))
        return total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--d-model", type=int, default=768)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="bench_device.json")
    parser.add_argument("--out", help="folder for the files (default: a temporary one)")
    args = parser.parse_args()

    folder = Path(args.out or tempfile.mkdtemp(prefix="qpack-bench-device-"))
    folder.mkdir(parents=True, exist_ok=True)
    state = synthetic_state(args.layers, args.d_model, args.vocab)
    params = sum(t.numel() for t in state.values())
    fp32 = folder / "model.pt"
    torch.save(state, fp32)
    fp32_bytes = sum(t.numel() * t.element_size() for t in state.values())
    files = {}
    for label, options in [("qpack uniform 8", {"bits": 8}), ("qpack uniform 4", {"bits": 4}),
                           ("qpack kmeans 4", {"bits": 4, "method": "kmeans"})]:
        path = folder / (label.replace(" ", "_") + ".qpk")
        start = time.perf_counter()
        qpack.pack(fp32, path, force=True, **options)
        files[label] = (path, time.perf_counter() - start)
    del state

    rows = []
    cpu_base = best_of(lambda: torch.load(fp32, weights_only=True), args.repeats)
    rows.append({"what": "torch.load fp32", "device": "cpu", "file_bytes": fp32.stat().st_size,
                 "seconds": cpu_base, "ratio_to_torch": 1.0})
    for label, (path, pack_seconds) in files.items():
        seconds = best_of(lambda p=path: qpack.load(p), args.repeats)
        rows.append({"what": label, "device": "cpu", "file_bytes": path.stat().st_size, "seconds": seconds,
                     "ratio_to_torch": seconds / cpu_base, "pack_seconds": pack_seconds})

    notes = []
    if torch.cuda.is_available():
        device = "cuda"
        to_dev = best_of(lambda: {k: v.to(device) for k, v in torch.load(fp32, weights_only=True).items()},
                         args.repeats, sync=True)
        mapped = best_of(lambda: torch.load(fp32, weights_only=True, map_location=device), args.repeats, sync=True)
        rows.append({"what": "torch.load fp32 .to(cuda)", "device": device, "file_bytes": fp32.stat().st_size,
                     "h2d_bytes": fp32_bytes, "seconds": to_dev, "ratio_to_torch": 1.0,
                     "weights_gb_per_s": fp32_bytes / to_dev / 1e9})
        rows.append({"what": "torch.load fp32 map_location=cuda", "device": device, "file_bytes": fp32.stat().st_size,
                     "h2d_bytes": fp32_bytes, "seconds": mapped, "ratio_to_torch": mapped / to_dev,
                     "weights_gb_per_s": fp32_bytes / mapped / 1e9})
        for label, (path, _) in files.items():
            seconds = best_of(lambda p=path: qpack.load(p, device=device), args.repeats, sync=True)
            on_gpu, on_cpu = qpack.load(path, device=device), qpack.load(path)
            same = all(torch.equal(on_gpu[k].cpu(), on_cpu[k]) for k in on_cpu)
            rows.append({"what": label, "device": device, "file_bytes": path.stat().st_size,
                         "h2d_bytes": device_bytes(path), "seconds": seconds, "ratio_to_torch": seconds / to_dev,
                         "weights_gb_per_s": fp32_bytes / seconds / 1e9, "same_as_cpu": same})
        notes.append(f"GPU: {torch.cuda.get_device_name()}")
    else:
        notes.append("no CUDA device: device rows skipped")

    print(f"{params:,} parameters, fp32 {fp32_bytes / 2**20:.1f} MiB; torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, {platform.machine()}; " + "; ".join(notes))
    header = f"{'what':<36} {'device':<6} {'file MiB':>9} {'to device MiB':>13} {'seconds':>8} {'x torch':>8} {'GB/s':>7} {'same':>5}"
    print(header)
    print("-" * len(header))
    for r in rows:
        h2d = f"{r['h2d_bytes'] / 2**20:.1f}" if "h2d_bytes" in r else "-"
        rate = f"{r['weights_gb_per_s']:.1f}" if "weights_gb_per_s" in r else "-"
        same = {True: "yes", False: "NO"}.get(r.get("same_as_cpu"), "-")
        print(f"{r['what']:<36} {r['device']:<6} {r['file_bytes'] / 2**20:>9.1f} {h2d:>13} {r['seconds']:>8.3f} "
              f"{r['ratio_to_torch']:>8.2f} {rate:>7} {same:>5}")
    Path(args.json).write_text(json.dumps({"parameters": params, "fp32_bytes": fp32_bytes, "notes": notes,
                                           "cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
