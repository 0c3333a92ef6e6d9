"""What the container costs on small real-shaped models: header bytes, group parameters,
lossless tensors.

For each model (a 23 k-parameter BatchNorm CNN, LeNet-5 and the demo's SeedNet, each trained
briefly on MNIST, or left at their seeded initialisation without ../shared) it packs:

- `-b 8` (the default) and reports the header: stored bytes H, what the preamble, header and
  padding cost (the bytes before the data section), all the file spends besides its
  payloads (that and the padding between payloads: "fixed"), per tensor entry, what the same
  entries would cost as version 3 (every payload 64-byte aligned), and the
  `qpack.options` metadata length;
- `-b 4 -g group:32` and `-b 4 -g group:64`, with every ``--param-dtype`` this qpack offers:
  whole-file bits per quantized weight and the overall SNR of the quantized tensors;
- the lossless tensors (biases, BatchNorm weights and statistics): raw bytes against what
  is stored.

    python tests/benchmarks/bench_container.py [--json out.json] [--steps 300]

Trained checkpoints are cached in $TMPDIR/qpack_bench_container (outside the repository).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
import qpack  # noqa: E402
from qpack.demo.net import SeedNet  # noqa: E402
from qpack.format import PREAMBLE_SIZE, fixed_bytes  # noqa: E402

MNIST = Path(__file__).resolve().parents[3] / "shared" / "data" / "mnist"
CACHE = Path(tempfile.gettempdir()) / "qpack_bench_container"


class SmallBN(nn.Module):
    """Three conv + BatchNorm blocks and a linear classifier: about 23 k parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32)
        self.conv3, self.bn3 = nn.Conv2d(32, 48, 3, padding=1), nn.BatchNorm2d(48)
        self.fc = nn.Linear(48 * 3 * 3, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn1(self.conv1(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.bn2(self.conv2(x))), 2)
        x = nn.functional.max_pool2d(torch.relu(self.bn3(self.conv3(x))), 2)
        return self.fc(x.flatten(1))


class LeNet5(nn.Module):
    """The classic LeNet-5 on 28x28 input (conv1 padded by 2)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c3 = nn.Conv2d(1, 6, 5, padding=2), nn.Conv2d(6, 16, 5)
        self.f5, self.f6, self.out = nn.Linear(400, 120), nn.Linear(120, 84), nn.Linear(84, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.c1(x)), 2)
        x = nn.functional.max_pool2d(torch.relu(self.c3(x)), 2)
        return self.out(torch.relu(self.f6(torch.relu(self.f5(x.flatten(1))))))


MODELS = {"bn_cnn_23k": SmallBN, "lenet5": LeNet5, "seednet": SeedNet}


def trained(name: str, steps: int) -> tuple[dict[str, torch.Tensor], str]:
    """The model's state dict after ``steps`` Adam steps on MNIST (cached), or at init."""
    torch.manual_seed(0)
    model = MODELS[name]()
    path = CACHE / f"{name}_{steps}.pt"
    if path.is_file():
        return torch.load(path, weights_only=True), "trained (cached)"
    if not (MNIST / "train-images-idx3-ubyte").exists():
        return model.state_dict(), "initialisation (no MNIST)"
    from qpack.demo.mnist import read_idx

    images = torch.from_numpy(read_idx(MNIST / "train-images-idx3-ubyte")[:20000].copy()).float()[:, None] / 255
    labels = torch.from_numpy(read_idx(MNIST / "train-labels-idx1-ubyte")[:20000].copy()).long()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(1)
    model.train()
    for _ in range(steps):
        batch = torch.randint(0, images.shape[0], (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    CACHE.mkdir(exist_ok=True)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save(state, path)
    return state, f"trained {steps} steps"


def _stored_h(path: Path) -> int:
    return int.from_bytes(path.read_bytes()[12:16], "little")


def quantized_snr(report: qpack.PackReport, state: dict[str, torch.Tensor]) -> tuple[int, float]:
    """(quantized weights, overall SNR in dB over them), from each tensor's rel_rms."""
    signal = noise = 0.0
    count = 0
    for row in report.tensors:
        if row.encoding == "raw":
            continue
        energy = float(state[row.name].double().pow(2).sum())
        signal += energy
        noise += energy * row.rel_rms ** 2
        count += state[row.name].numel()
    return count, 10 * math.log10(signal / noise) if noise > 0 else math.inf


def param_dtypes() -> list[str | None]:
    from qpack import policy

    return list(getattr(policy, "PARAM_DTYPES", (None,)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path)
    parser.add_argument("--steps", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    results = []
    work = Path(tempfile.mkdtemp())
    print(f"qpack {qpack.__version__}, param dtypes offered: {param_dtypes()}")
    print(f"{'model':<12} {'params':>7} {'tensors':>7} {'H':>6} {'head':>6} {'fixed':>6} {'/entry':>7} {'v3':>6} "
          f"{'options':>7} {'file -b8':>9}  lossless raw -> stored")
    for name in MODELS:
        state, how = trained(name, args.steps)
        numel = sum(t.numel() for t in state.values())
        path = work / f"{name}.qpk"
        report = qpack.pack(state, path, force=True, threads=1)
        stored_h = _stored_h(path)
        with qpack.QpkReader(path) as reader:
            head = reader.data_start
            version = reader.version
            fixed_v3 = fixed_bytes(list(reader.entries.values()), reader.metadata, 3)  # 64-byte aligned
        fixed = qpack.info(path).container_bytes
        options = len(report.metadata.get("qpack.options", ""))
        raw_rows = [r for r in report.tensors if r.encoding == "raw"]
        lossless = (sum(r.original_bytes for r in raw_rows), sum(r.stored_bytes for r in raw_rows))
        row = {"model": name, "weights": how, "parameters": numel, "tensors": len(state), "version": version,
               "header_stored": stored_h, "head_bytes": head, "head_per_entry": head / len(state),
               "fixed_bytes": fixed, "fixed_per_entry": fixed / len(state), "fixed_bytes_v3": fixed_v3,
               "options_json": options, "file_b8": report.file_bytes,
               "lossless_raw": lossless[0], "lossless_stored": lossless[1], "groups": []}
        print(f"{name:<12} {numel:>7,} {len(state):>7} {stored_h:>6} {head:>6} {fixed:>6} "
              f"{fixed / len(state):>7.1f} {fixed_v3:>6} {options:>7} {report.file_bytes:>9,}  {lossless[0]:,} -> {lossless[1]:,}  (v{version}, {how})")
        for group in (32, 64):
            for dtype in param_dtypes():
                extra = {} if dtype is None else {"param_dtype": dtype}
                try:
                    rep = qpack.pack(state, path, force=True, threads=1, bits=4, granularity=f"group:{group}", **extra)
                except TypeError:
                    rep = qpack.pack(state, path, force=True, threads=1, bits=4, granularity=f"group:{group}")
                count, snr = quantized_snr(rep, state)
                quant_bytes = sum(r.stored_bytes for r in rep.tensors if r.encoding != "raw")
                bpw_file = 8 * rep.file_bytes / numel
                print(f"    -b 4 -g group:{group:<3} param {dtype or 'float32':<8} file {rep.file_bytes:>8,} B "
                      f"= {bpw_file:5.2f} bits/param, {count:,} quantized weights, SNR {snr:5.2f} dB "
                      f"(payload {quant_bytes:,} B)")
                row["groups"].append({"group": group, "param_dtype": dtype or "float32", "file_bytes": rep.file_bytes,
                                      "bpw_file": bpw_file, "quantized": count, "snr_db": snr})
        results.append(row)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
