"""Benchmark: how sensitive each layer of a trained network is to noise in its weights, by depth
(the evidence for the allocation's per-layer weights, ``qpack.allocate.layer_weights``).

For every network of the zoo's cache (``bench_zoo.py --train-only`` trains it), each tensor
qpack quantizes gets, alone, Gaussian noise of RMS ``--rel`` times its own RMS (relative error
``rel``, as ``info`` reports it), over ``--draws`` draws; the score is the mean KL divergence of
the noisy network's outputs from the fp32 network's, on held-out data (MNIST: the first
``--images`` test images; the transformer: its held-out text, every position), per unit rel^2.
The table prints each layer's score over the median of the layers between the first and the
last (1.0: a middle layer), in file order, beside the weight the default objective gives it;
``--json`` holds every score.

    python tests/benchmarks/bench_layer_noise.py --data ../shared/data/mnist
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
for path in (str(HERE.parents[2]), str(HERE.parent)):
    if path not in sys.path:
        sys.path.insert(0, path)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import _zoo  # noqa: E402
from qpack.allocate import layer_weights  # noqa: E402
from qpack.policy import Policy  # noqa: E402


@torch.no_grad()
def log_probs(net: torch.nn.Module, arch: str, data: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of every output (an image's class, or a character at each position)."""
    if arch != "char_transformer":
        return torch.cat([F.log_softmax(net(data[i:i + 1000]), 1) for i in range(0, len(data), 1000)])
    return torch.cat([F.log_softmax(net(data[i:i + 64]), -1).flatten(0, 1) for i in range(0, len(data), 64)])


def eval_inputs(arch: str, mnist: tuple, text: tuple | None, images: int, windows: int) -> torch.Tensor:
    if arch != "char_transformer":
        return mnist[2][:images]
    context = _zoo.build(arch).context
    ids = text[1][:windows * context]
    return ids.view(windows, context)


def bench_network(name: str, arch: str, state: dict[str, torch.Tensor], inputs: torch.Tensor, rel: float,
                  draws: int) -> dict[str, Any]:
    """Each quantized tensor's KL per unit rel^2, and its default weight."""
    policy = Policy()
    quantized = [n for n, t in state.items() if policy.decide(n, t).encoding != "raw"]
    net = _zoo.build(arch)
    net.load_state_dict(state)
    net.eval()
    reference = log_probs(net, arch, inputs)
    scores = []
    for name_ in quantized:
        weight = state[name_]
        kls = []
        for draw in range(draws):
            gen = torch.Generator().manual_seed(draw)
            noisy = dict(state)
            scale = float(weight.double().pow(2).mean().sqrt()) * rel
            noisy[name_] = weight + torch.randn(weight.shape, generator=gen) * scale
            net.load_state_dict(noisy)
            out = log_probs(net, arch, inputs)
            kls.append(float((reference.exp() * (reference - out)).sum(1).mean()))
        scores.append(float(np.mean(kls)) / rel ** 2)
    middle = scores[1:-1] if len(scores) > 2 else scores
    median = float(np.median(middle)) if middle else 1.0
    weights = layer_weights({n: tuple(state[n].shape) for n in quantized})
    return {"name": name, "arch": arch, "rel": rel, "draws": draws,
            "layers": [{"tensor": n, "numel": state[n].numel(), "kl_per_rel2": s, "relative": s / median,
                        "default_weight": weights[n]} for n, s in zip(quantized, scores)]}


def format_table(results: list[dict[str, Any]]) -> list[str]:
    """A row per network: each layer's sensitivity over the median middle layer (its default weight)."""
    lines = ["| network | first | second | third | last | every layer, in file order (default weight) |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for res in results:
        rel = [layer["relative"] for layer in res["layers"]]
        cells = [f"{rel[i]:.2f}" if i < len(rel) - 1 else "" for i in range(3)]
        every = ", ".join(f"{layer['relative']:.2f} ({layer['default_weight']:g})" for layer in res["layers"])
        lines.append(f"| {res['name']} | " + " | ".join(cells) + f" | {rel[-1]:.2f} | {every} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    _zoo.add_cache_arguments(parser)
    parser.add_argument("--rel", type=float, default=0.1, help="relative RMS of the noise (default 0.1)")
    parser.add_argument("--draws", type=int, default=3, help="noise draws per layer (default 3)")
    parser.add_argument("--images", type=int, default=2000, help="MNIST test images scored (default 2000)")
    parser.add_argument("--windows", type=int, default=64, help="transformer windows scored (default 64)")
    parser.add_argument("--json", default="bench_layer_noise.json", help="where to write the scores")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    found = _zoo.cached_entries(args.cache, None if args.only is None else set(args.only.split(",")))
    if found is None:
        return 2
    folder, entries = found
    mnist = _zoo.load_mnist(args.data) if any(e.metric != "loss" for e in entries) else None
    text = _zoo.load_text() if any(e.metric == "loss" for e in entries) else None
    started = time.perf_counter()
    results = []
    for entry in entries:
        state = torch.load(folder / f"{entry.name}.pt", map_location="cpu", weights_only=True)
        inputs = eval_inputs(entry.arch, mnist, text, args.images, args.windows)
        results.append(bench_network(entry.name, entry.arch, state, inputs, args.rel, args.draws))
        print(f"  {entry.name}: " + ", ".join(f"{layer['relative']:.2f}" for layer in results[-1]["layers"]),
              file=sys.stderr, flush=True)
    for line in format_table(results):
        print(line)
    wall = time.perf_counter() - started
    Path(args.json).write_text(json.dumps({"argv": sys.argv[1:], "networks": results, "wall_s": wall}, indent=1))
    print(f"wrote {args.json} ({wall:.0f} s wall)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
