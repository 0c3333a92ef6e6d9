"""rANS against zstd for index streams: size over n*H, and encode/decode speed.

For each case (n indices with a Laplace-shaped distribution over 2^b levels, the shape
k-means and uniform indices of trained weights take) it compares, in one run:

- qpack's rANS coder (``qpack.rans``), encoded and decoded by the compiled kernels
  (``qpack.rans_jit``, numba), by the numpy reference (``QPACK_NO_JIT=1``; up to 1 M
  indices) and, decoding only, by the torch decoder on a CPU tensor (the code that runs on
  a GPU; 100 k indices only, it is launch-bound on a CPU);
- zstd level 3 (qpack's level) over the packed indices and over 8-bit containers, the
  forms qpack stored before rANS, decompressed and unpacked.

Times are the best of ``--repeats`` runs, as wall time and as the thread's CPU time (on a
shared machine the CPU time is the fairer per-core figure). The header lines give the import
time of qpack, of numba, and the first call's compile time with an empty and a warm numba
cache (each in a fresh interpreter).

    python tests/benchmarks/bench_rans.py [--quick] [--json bench_rans.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from qpack import rans  # noqa: E402
from qpack.bitpack import pack_bits, unpack_bits  # noqa: E402


def best_time(run, repeats: int) -> tuple[float, float]:
    """(best wall time, best thread CPU time) of ``repeats`` runs."""
    wall, cpu = [], []
    for _ in range(repeats):
        started, started_cpu = time.perf_counter(), time.thread_time()
        run()
        cpu.append(time.thread_time() - started_cpu)
        wall.append(time.perf_counter() - started)
    return min(wall), min(cpu)


def numpy_path(run):
    def wrapped():
        os.environ["QPACK_NO_JIT"] = "1"
        try:
            return run()
        finally:
            del os.environ["QPACK_NO_JIT"]
    return wrapped


def case(n: int, bits: int, spread: float, repeats: int) -> dict:
    rng = np.random.default_rng(n + bits)
    levels = 1 << bits
    indices = np.clip(np.rint(rng.laplace(levels / 2, spread * levels, n)), 0, levels - 1).astype(np.int64)
    counts = np.bincount(indices, minlength=levels)
    p = counts[counts > 0] / n
    entropy = float(-(p * np.log2(p)).sum() * n / 8)
    narrow = torch.from_numpy(indices.astype(np.uint8 if bits <= 8 else np.int16))
    row = {"n": n, "bits": bits, "spread": spread, "entropy_bytes": entropy, "bits_per_index": entropy * 8 / n}

    coded = rans.encode(indices, counts)
    assert np.array_equal(rans.decode(coded, n, bits), indices)
    row["rans_bytes"] = len(coded)
    row["lanes"] = int(np.frombuffer(coded, "<u4", count=1)[0])
    row["rans_encode_s"], row["rans_encode_cpu_s"] = best_time(lambda: rans.encode(indices, counts), repeats)
    row["rans_decode_s"], row["rans_decode_cpu_s"] = best_time(lambda: rans.decode(coded, n, bits), repeats)
    if n <= 1_000_000:
        assert numpy_path(lambda: rans.encode(indices, counts))() == coded
        row["numpy_encode_s"], row["numpy_encode_cpu_s"] = best_time(numpy_path(lambda: rans.encode(indices, counts)),
                                                                     repeats)
        row["numpy_decode_s"], row["numpy_decode_cpu_s"] = best_time(numpy_path(lambda: rans.decode(coded, n, bits)),
                                                                     repeats)
    if n <= 100_000:
        assert np.array_equal(rans.decode_torch(coded, n, bits).numpy(), indices)
        row["torch_decode_s"], row["torch_decode_cpu_s"] = best_time(lambda: rans.decode_torch(coded, n, bits), 1)

    cctx, dctx = zstandard.ZstdCompressor(level=3), zstandard.ZstdDecompressor()
    for label, width in (("zstd_packed", bits), ("zstd_container", 8 if bits <= 8 else 16)):
        packed = pack_bits(narrow, width).numpy().tobytes()
        frame = cctx.compress(packed)
        row[f"{label}_bytes"] = len(frame)
        row[f"{label}_encode_s"], _ = best_time(lambda: cctx.compress(pack_bits(narrow, width).numpy().tobytes()),
                                                repeats)

        def decode() -> torch.Tensor:
            raw = bytearray(dctx.decompress(frame, max_output_size=len(packed)))
            return unpack_bits(torch.frombuffer(raw, dtype=torch.uint8), width, n)
        row[f"{label}_decode_s"], row[f"{label}_decode_cpu_s"] = best_time(decode, repeats)
    return row


_STARTUP = """
import sys, time
def clock():
    return time.perf_counter(), time.process_time()
def since(start):
    now = clock()
    return f"{now[0] - start[0]:.4f},{now[1] - start[1]:.4f}"
start = clock(); import qpack; imported = since(start)
assert "numba" not in sys.modules
import os
import numpy as np
from qpack import rans
indices = np.arange(100_000) % 7
start = clock(); kernels = rans._kernels(); numba_import = since(start)
os.environ["QPACK_NO_JIT"] = "1"; coded = rans.encode(indices); del os.environ["QPACK_NO_JIT"]
start = clock(); rans.decode(coded, indices.size, 3); first_decode = since(start)
start = clock(); rans.encode(indices); first_encode = since(start)
print(imported, numba_import, first_decode, first_encode, kernels is not None)
"""


def startup() -> dict:
    """Import and first-call times (wall, CPU) in fresh interpreters: numba cache empty, then warm."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        for label in ("cold", "warm"):
            proc = subprocess.run([sys.executable, "-c", _STARTUP], capture_output=True, text=True, env=env, check=True)
            *times, jit = proc.stdout.split()
            keys = ("import_qpack", "import_kernels", "first_decode", "first_encode")
            out[label] = {"jit": jit == "True"}
            for key, pair in zip(keys, times):
                wall, cpu = (float(v) for v in pair.split(","))
                out[label][key + "_s"], out[label][key + "_cpu_s"] = wall, cpu
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes only")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", default="bench_rans.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    sizes = (100_000, 1_000_000) if args.quick else (100_000, 1_000_000, 10_000_000)
    # spread: the Laplace scale as a share of the levels (small = very skewed)
    shapes = [(3, 0.02), (4, 0.05), (5, 0.08), (8, 0.03), (8, 0.005)]
    first = startup()
    for label, r in first.items():
        print(f"{label} numba cache, wall (CPU) s: import qpack {r['import_qpack_s']:.2f} ({r['import_qpack_cpu_s']:.2f}), "
              f"numba not imported; import numba + kernels {r['import_kernels_s']:.2f} ({r['import_kernels_cpu_s']:.2f}); "
              f"first decode {r['first_decode_s']:.2f} ({r['first_decode_cpu_s']:.2f}); "
              f"first encode {r['first_encode_s']:.2f} ({r['first_encode_cpu_s']:.2f})")
    rows = [case(n, bits, spread, args.repeats) for n in sizes for bits, spread in shapes]
    print("rANS: compiled kernels (jit), numpy reference (np, <= 1 M), torch decoder on CPU (torch, 100 k); "
          "M indices/s by CPU time (wall in brackets)")
    print(f"{'n':>10} {'b':>2} {'H b/idx':>7} | {'rANS/nH':>7} {'zstd/nH':>7} {'zstd8/nH':>8} | "
          f"{'jit enc':>13} {'jit dec':>13} {'np dec':>11} {'torch dec':>9} {'zstd dec':>9} {'zstd8 dec':>9}")

    def speed(r: dict, key: str, width: int, wall: bool = True) -> str:
        if key + "_s" not in r:
            return f"{'-':>{width}}"
        cpu = r["n"] / max(r[key + "_cpu_s"], 1e-9) / 1e6
        text = f"{cpu:.0f} ({r['n'] / r[key + '_s'] / 1e6:.0f})" if wall else f"{cpu:.0f}"
        return f"{text:>{width}}"
    for r in rows:
        e = r["entropy_bytes"]
        print(f"{r['n']:>10} {r['bits']:>2} {r['bits_per_index']:>7.3f} | {r['rans_bytes'] / e:>7.4f} "
              f"{r['zstd_packed_bytes'] / e:>7.3f} {r['zstd_container_bytes'] / e:>8.3f} | "
              f"{speed(r, 'rans_encode', 13)} {speed(r, 'rans_decode', 13)} {speed(r, 'numpy_decode', 11)} "
              f"{speed(r, 'torch_decode', 9, False)} {speed(r, 'zstd_packed_decode', 9, False)} "
              f"{speed(r, 'zstd_container_decode', 9, False)}")
    Path(args.json).write_text(json.dumps({"startup": first, "rows": rows}, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
