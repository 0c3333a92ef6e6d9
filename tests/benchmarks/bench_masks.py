"""What the masks of a pruned LeNet-300-100 cost in a .qpk, with and without exact codebooks.

The network (784-300-100-10) is trained briefly on MNIST when ../shared holds it (else left
at its initial weights: the masks' statistics are the same), pruned with
``torch.nn.utils.prune.l1_unstructured`` (90 % of each weight), and its state dict
(``weight_orig``, ``weight_mask``, ``bias``) packed at ``-b 8`` (``--bits``). "before" switches the exact
path off (``exact_values=False``, the code as it was); "after" is the code as it
is. For each mask: its bytes in the file, bits per element, whether it comes back bit for
bit, and n·H (its elements' empirical entropy, the least an order-0 coder can spend).

    OMP_NUM_THREADS=1 python tests/benchmarks/bench_masks.py [--amount 0.9] [--bits 8] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.utils.prune

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import qpack  # noqa: E402

MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"


def lenet_300_100(amount: float, train_steps: int) -> tuple[dict[str, torch.Tensor], str]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 300), torch.nn.ReLU(),
                              torch.nn.Linear(300, 100), torch.nn.ReLU(), torch.nn.Linear(100, 10))
    how = "initial weights (no MNIST found)"
    if train_steps and (MNIST / "train-images-idx3-ubyte").is_file():
        from qpack.demo.mnist import read_idx

        images = torch.from_numpy(read_idx(MNIST / "train-images-idx3-ubyte")).float().div_(255)
        labels = torch.from_numpy(read_idx(MNIST / "train-labels-idx1-ubyte")).long()
        opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
        for step in range(train_steps):
            batch = torch.randint(0, images.shape[0], (128,))
            loss = torch.nn.functional.cross_entropy(net(images[batch]), labels[batch])
            opt.zero_grad()
            loss.backward()
            opt.step()
        how = f"trained {train_steps} steps of 128 on MNIST (last loss {loss.item():.3f})"
    for layer in (net[1], net[3], net[5]):
        torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=amount)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}, how


def entropy_bytes(mask: torch.Tensor) -> float:
    p = float(mask.mean())
    if p in (0.0, 1.0):
        return 0.0
    return mask.numel() * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


def measure(state: dict[str, torch.Tensor], folder: Path, label: str, bits: int) -> dict:
    path = folder / f"{label}.qpk"
    report = qpack.pack(state, path, bits=bits, force=True, exact_values=label == "after")
    back = qpack.load(path)
    rows = {}
    for row in report.tensors:
        if row.name.endswith("_mask"):
            mask = state[row.name]
            rows[row.name] = {"numel": mask.numel(), "bytes": row.stored_bytes, "encoding": row.encoding,
                              "bits": row.bits, "storage": row.storage,
                              "bits_per_element": row.stored_bytes * 8 / mask.numel(),
                              "exact": bool(torch.equal(back[row.name], mask)),
                              "entropy_bytes": round(entropy_bytes(mask), 1)}
    masks = sum(r["bytes"] for r in rows.values())
    return {"file_bytes": report.file_bytes, "mask_bytes": masks, "masks": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amount", type=float, default=0.9)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    state, how = lenet_300_100(args.amount, args.train_steps)
    results = {"network": "LeNet-300-100, l1_unstructured " + f"{args.amount:.0%}", "weights": how, "bits": args.bits}
    with tempfile.TemporaryDirectory() as folder:
        results["before"] = measure(state, Path(folder), "before", args.bits)
        results["after"] = measure(state, Path(folder), "after", args.bits)
    print(f"{results['network']}; {how}; packed at -b {args.bits}")
    print(f"{'mask':<14} {'numel':>7} {'n*H':>8} | {'before':>7} {'b/el':>5} {'exact':>5} | "
          f"{'after':>7} {'b/el':>5} {'exact':>5}  encoding after")
    for name, before in results["before"]["masks"].items():
        after = results["after"]["masks"][name]
        print(f"{name:<14} {before['numel']:>7} {before['entropy_bytes']:>8.0f} | {before['bytes']:>7} "
              f"{before['bits_per_element']:>5.3f} {str(before['exact']):>5} | {after['bytes']:>7} "
              f"{after['bits_per_element']:>5.3f} {str(after['exact']):>5}  {after['encoding']} "
              f"{after['bits']}-bit {after['storage']}")
    for label in ("before", "after"):
        r = results[label]
        print(f"{label}: file {r['file_bytes']:,} bytes, masks {r['mask_bytes']:,} "
              f"({r['mask_bytes'] / r['file_bytes']:.0%} of the file)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
