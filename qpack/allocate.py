"""Choosing the bits of each tensor to meet a file-size target with the least error.

``qpack pack --target-bpw X`` encodes every tensor the policy quantizes at each candidate
width, measuring what it really costs (stored bytes after zstd, plus its parameters) and what
it loses (its squared error relative to its mean square, times its element count, times a
sensitivity weight). It then picks, for each tensor, the width minimising error + price x
bytes, raising the price until the estimated file fits within X bits per weight.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import msgpack
import torch

from .encoder import encode_tensor
from .errors import InputError
from .format import TensorEntry
from .policy import Policy

__all__ = ["CANDIDATE_BITS", "allocate_bits"]

#: widths tried for each tensor
CANDIDATE_BITS = (1, 2, 3, 4, 5, 6, 8)
#: alignment padding, per tensor (at most)
_PADDING = 63
#: preamble, header framing and metadata (an upper estimate)
_FILE_OVERHEAD = 1024


def _entry_bytes(entry: TensorEntry) -> int:
    """What a tensor adds besides its payload: its header entry (parameters included) and padding."""
    widest = replace(entry, length=0xFFFFFFFF, offset=0xFFFFFFFF, crc32=0xFFFFFFFF)  # 5-byte ints: an upper bound
    return len(msgpack.packb(widest.to_header(), use_bin_type=True)) + _PADDING


def allocate_bits(tensors: Mapping[str, torch.Tensor], policy: Policy, target_bpw: float,
                  sensitivity: Mapping[str, float] | None = None) -> dict[str, int]:
    """Bits for each tensor the policy quantizes, meeting ``target_bpw`` over the whole file.

    Args:
        tensors: the state dict (read twice: once here, once when packing).
        policy: the packing policy; its method, granularity and pruning are kept.
        target_bpw: file bytes * 8 / all elements of all tensors, at most.
        sensitivity: optional ``{name: weight}`` multiplying a tensor's error (for instance
            measured as the loss increase on a calibration batch); 1 by default.

    Returns:
        ``{name: bits}`` for every quantized tensor.

    Raises:
        InputError: the target cannot be met even at one bit per index.
    """
    if not isinstance(target_bpw, (int, float)) or isinstance(target_bpw, bool) or target_bpw <= 0:
        raise InputError(f"target bits per weight must be a positive number, got {target_bpw!r}")
    weights = dict(sensitivity or {})
    total_elements, fixed_bytes = 0, _FILE_OVERHEAD
    options: dict[str, list[tuple[int, int, float]]] = {}  # name -> [(bits, bytes, cost)]
    for name, tensor in tensors.items():
        total_elements += tensor.numel()
        decision = policy.decide(name, tensor)
        if decision.encoding == "raw":
            entry, stored, _ = encode_tensor(name, tensor, decision)
            fixed_bytes += len(stored) + _entry_bytes(entry)
            continue
        trials = []
        for bits in CANDIDATE_BITS:
            entry, stored, row = encode_tensor(name, tensor, replace(decision, bits=bits))
            if entry.encoding == "raw":  # NaN or Inf: stored raw whatever the width
                fixed_bytes += len(stored) + _entry_bytes(entry)
                break
            cost = (row.rel_rms or 0.0) ** 2 * tensor.numel() * weights.get(name, 1.0)
            trials.append((bits, len(stored) + _entry_bytes(entry), cost))
        if trials:
            options[name] = trials
    budget = target_bpw * total_elements / 8 - fixed_bytes
    smallest = sum(min(size for _, size, _ in trials) for trials in options.values())
    if smallest > budget:
        floor = (smallest + fixed_bytes) * 8 / max(total_elements, 1)
        raise InputError(f"--target-bpw {target_bpw} is below what 1-bit indices give here "
                         f"(about {floor:.3f} bits per weight)")
    # Lagrangian relaxation: each tensor minimises cost + price * bytes on its own; the price
    # is raised until the file fits. Sizes after zstd need not grow with bits, and this picks
    # from the lower convex hull of each tensor's (bytes, cost) points regardless.
    def choose(price: float) -> dict[str, tuple[int, int, float]]:
        return {name: min(trials, key=lambda t: (t[2] + price * t[1], t[1])) for name, trials in options.items()}

    def size(choice: dict[str, tuple[int, int, float]]) -> int:
        return sum(t[1] for t in choice.values())

    low, high = 0.0, 1.0
    while size(choose(high)) > budget:
        high *= 4
    if size(choose(low)) <= budget:
        high = low
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (low, middle) if size(choose(middle)) <= budget else (middle, high)
    choice = choose(high)
    # one price for all can leave bytes unspent (a big tensor's next width may not fit while
    # small ones could still widen): spend them on the best error reduction per byte
    while True:
        left = budget - size(choice)
        steps = [((now[2] - t[2]) / max(t[1] - now[1], 1), name, t)
                 for name, now in choice.items() for t in options[name]
                 if t[2] < now[2] and t[1] - now[1] <= left]
        if not steps:
            break
        _, name, better = max(steps, key=lambda step: (step[0], step[1]))
        choice[name] = better
    return {name: trial[0] for name, trial in choice.items()}
