"""What the masks of a pruned LeNet-300-100 cost in a .qpk: no exact path, exact codebooks, derived masks.

The network (784-300-100-10) is trained briefly on MNIST when ../shared holds it (else left
at its initial weights: the masks' statistics are the same) and pruned with
``torch.nn.utils.prune.l1_unstructured`` (90 % of each weight). Two checkpoints of it:

- "torch prune": its state dict as torch.nn.utils.prune leaves it (``weight_orig`` with the
  pruned values still in it, ``weight_mask``, ``bias``);
- "deep compression": as Deep Compression reproductions save it, ``weight`` already masked
  and a ``mask`` buffer (float32) beside it, equal to ``weight != 0``.

Each is packed at ``-b 8`` (``--bits``) three ways: "plain" (``exact_values=False,
derive_masks=False``: the code before exact codebooks), "codebook" (``derive_masks=False``:
masks as 1-bit exact codebooks, rANS-coded, the code before version 4) and "derived" (the
code as it is: masks derived from their weight, spec 3.5, where exact). For each mask: its
bytes in the file, bits per element, whether it comes back bit for bit, and n·H (its
elements' empirical entropy, the least an order-0 coder can spend).

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
CONFIGS = {"plain": {"exact_values": False, "derive_masks": False}, "codebook": {"derive_masks": False},
           "derived": {}}


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


def deep_compression(pruned: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same network as a Deep Compression reproduction saves it: masked weights, masks beside."""
    out = {}
    for name, tensor in pruned.items():
        if name.endswith(".weight_orig"):
            module = name.removesuffix(".weight_orig")
            mask = pruned[f"{module}.weight_mask"]
            out[f"{module}.weight"] = tensor * mask
            out[f"{module}.mask"] = mask.clone()
        elif not name.endswith(".weight_mask"):
            out[name] = tensor
    return out


def is_mask_name(name: str) -> bool:
    return name.endswith("_mask") or name.endswith(".mask")


def entropy_bytes(mask: torch.Tensor) -> float:
    p = float(mask.mean())
    if p in (0.0, 1.0):
        return 0.0
    return mask.numel() * -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) / 8


def measure(state: dict[str, torch.Tensor], folder: Path, label: str, bits: int) -> dict:
    path = folder / f"{label}.qpk"
    report = qpack.pack(state, path, bits=bits, force=True, **CONFIGS[label])
    back = qpack.load(path)
    rows = {}
    for row in report.tensors:
        if is_mask_name(row.name):
            mask = state[row.name]
            rows[row.name] = {"numel": mask.numel(), "bytes": row.stored_bytes, "encoding": row.encoding,
                              "bits": row.bits, "storage": row.storage,
                              "bits_per_element": row.stored_bytes * 8 / mask.numel(),
                              "exact": bool(torch.equal(back[row.name], mask)),
                              "entropy_bytes": round(entropy_bytes(mask), 1)}
    masks = sum(r["bytes"] for r in rows.values())
    with qpack.QpkReader(path) as reader:
        version = reader.version
    return {"file_bytes": report.file_bytes, "mask_bytes": masks, "version": version, "masks": rows,
            "all_exact": all(r["exact"] for r in rows.values())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--amount", type=float, default=0.9)
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--bits", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    pruned, how = lenet_300_100(args.amount, args.train_steps)
    checkpoints = {"torch prune": pruned, "deep compression": deep_compression(pruned)}
    results = {"network": "LeNet-300-100, l1_unstructured " + f"{args.amount:.0%}", "weights": how,
               "bits": args.bits, "checkpoints": {}}
    print(f"{results['network']}; {how}; packed at -b {args.bits}")
    with tempfile.TemporaryDirectory() as folder:
        for title, state in checkpoints.items():
            runs = {label: measure(state, Path(folder), label, args.bits) for label in CONFIGS}
            results["checkpoints"][title] = runs
            print(f"\n{title}: {', '.join(state)}")
            print(f"{'mask':<14} {'numel':>7} {'n*H':>7} | " + " | ".join(f"{label:>17}" for label in CONFIGS)
                  + "  encoding (derived run)")
            for name, first in runs["plain"]["masks"].items():
                cells = [f"{runs[label]['masks'][name]['bytes']:>7} {runs[label]['masks'][name]['bits_per_element']:>5.3f} "
                         f"{'ok' if runs[label]['masks'][name]['exact'] else 'LOST':>3}" for label in CONFIGS]
                last = runs["derived"]["masks"][name]
                print(f"{name:<14} {first['numel']:>7} {first['entropy_bytes']:>7.0f} | " + " | ".join(cells)
                      + f"  {last['encoding']} {last['storage']}")
            for label, r in runs.items():
                print(f"  {label:<9} file {r['file_bytes']:>7,} bytes (version {r['version']}), masks "
                      f"{r['mask_bytes']:>6,} ({r['mask_bytes'] / r['file_bytes']:.0%} of the file), "
                      f"all exact: {r['all_exact']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
