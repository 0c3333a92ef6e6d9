"""Benchmark: qpack.kmeans1d.fit_codebook against scikit-learn's KMeans on 1-D weights.

Side by side in one process, on the same data: ``sklearn.cluster.KMeans(n_clusters=k,
n_init=1, random_state=0)`` and ``fit_codebook(values, k)`` on Laplace-distributed float32
weights (scale 0.02), for each k. Both codebooks are scored by the same float64 SSE
(``kmeans1d.sse``). Prints a table and writes JSON.

Usage (from the repository root)::

    python tests/benchmarks/bench_kmeans1d.py [--n 1000000] [--k 8 16 256]
        [--repeats 3] [--sklearn-repeats 1] [--json bench_kmeans1d.json]

Times are wall-clock seconds, the best of the repeats ("speedup" is their ratio); "CPU
ratio" compares process CPU time (scikit-learn's counts all its threads), which shared-
machine load disturbs less. The load average is recorded too. Not collected by pytest
(the file name does not start with ``test_``).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

try:
    from qpack import kmeans1d
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    from qpack import kmeans1d


def _best_time(fn, repeats: int):  # type: ignore[no-untyped-def]
    """Best wall-clock and best process CPU time (all threads) of ``repeats`` calls."""
    best, best_cpu, out = float("inf"), float("inf"), None
    for _ in range(repeats):
        start, start_cpu = time.perf_counter(), time.process_time()
        out = fn()
        best = min(best, time.perf_counter() - start)
        best_cpu = min(best_cpu, time.process_time() - start_cpu)
    return best, best_cpu, out


def _sklearn_fit(values: np.ndarray, k: int):  # type: ignore[no-untyped-def]
    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return KMeans(n_clusters=k, n_init=1, random_state=0).fit(values.reshape(-1, 1))


def run(n: int, ks: list[int], repeats: int, sklearn_repeats: int, seed: int) -> dict:
    """Run the benchmark; returns the JSON-ready result."""
    import sklearn

    values = np.random.default_rng(seed).laplace(0.0, 0.02, n).astype(np.float32)
    rows = []
    for k in ks:
        t_sk, cpu_sk, km = _best_time(
            functools.partial(_sklearn_fit, values, k), sklearn_repeats
        )
        sk_book = np.sort(km.cluster_centers_.ravel()).astype(np.float32)
        t_q, cpu_q, book = _best_time(
            functools.partial(kmeans1d.fit_codebook, values, k), repeats
        )
        sse_sk = kmeans1d.sse(values, sk_book)
        sse_q = kmeans1d.sse(values, book)
        rows.append(
            {
                "k": k,
                "sklearn_s": t_sk,
                "sklearn_cpu_s": cpu_sk,
                "sklearn_sse": sse_sk,
                "sklearn_n_iter": int(km.n_iter_),
                "qpack_s": t_q,
                "qpack_cpu_s": cpu_q,
                "qpack_sse": sse_q,
                "qpack_centroids": int(book.size),
                "sse_ratio": sse_q / sse_sk,
                "speedup": t_sk / t_q,
                "cpu_ratio": cpu_sk / cpu_q,
            }
        )
    return {
        "benchmark": "kmeans1d.fit_codebook vs sklearn KMeans(n_init=1, random_state=0)",
        "data": {
            "distribution": "laplace",
            "scale": 0.02,
            "n": n,
            "dtype": "float32",
            "seed": seed,
        },
        "repeats": {
            "qpack": repeats,
            "sklearn": sklearn_repeats,
            "time": "best wall-clock s; cpu: best process CPU s (all threads)",
        },
        "machine": {
            "cpus": os.cpu_count(),
            "load_average_after": list(os.getloadavg())
            if hasattr(os, "getloadavg")
            else None,
            "python": platform.python_version(),
            "numpy": np.__version__,
            "sklearn": sklearn.__version__,
        },
        "results": rows,
    }


def format_table(result: dict) -> str:
    """The results as a fixed-width text table."""
    head = (
        f"{'k':>5} {'sklearn s':>10} {'qpack s':>9} {'speedup':>8} {'CPU ratio':>9} "
        f"{'sklearn SSE':>13} {'qpack SSE':>13} {'SSE ratio':>10}"
    )
    lines = [head, "-" * len(head)]
    for r in result["results"]:
        lines.append(
            f"{r['k']:>5} {r['sklearn_s']:>10.3f} {r['qpack_s']:>9.4f} {r['speedup']:>7.1f}x "
            f"{r['cpu_ratio']:>8.1f}x "
            f"{r['sklearn_sse']:>13.6g} {r['qpack_sse']:>13.6g} {r['sse_ratio']:>10.5f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="number of weights")
    parser.add_argument(
        "--k", type=int, nargs="+", default=[8, 16, 256], help="codebook sizes"
    )
    parser.add_argument(
        "--repeats", type=int, default=3, help="fit_codebook runs (best kept)"
    )
    parser.add_argument(
        "--sklearn-repeats", type=int, default=1, help="KMeans runs (best kept)"
    )
    parser.add_argument("--seed", type=int, default=0, help="data seed")
    parser.add_argument(
        "--json",
        type=Path,
        default=Path("bench_kmeans1d.json"),
        help="where to write JSON",
    )
    args = parser.parse_args(argv)
    result = run(args.n, args.k, args.repeats, args.sklearn_repeats, args.seed)
    load = result["machine"]["load_average_after"]
    print(
        f"{args.n:,} Laplace(0, 0.02) float32 weights; {os.cpu_count()} CPUs; load {load}"
    )
    print(format_table(result))
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
