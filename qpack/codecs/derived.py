"""The "derived" encoding (spec 3.5, format version 4): a 0/1 mask rebuilt from another tensor.

A pruning mask that equals ``(w != 0)`` of a tensor ``w`` in the same file is stored as a
header entry naming ``w`` and the rule "nonzero": no payload. Deriving is exact only against
``w`` as the file decodes it (quantization may move a small kept weight to 0), so the writer
compares the mask with the decoded source (:func:`matches`) and stores the mask another way
when they differ.

Choosing the source (:func:`find_sources`) / checking it (:func:`matches`) / rebuilding the
mask (:func:`decode`) are three pure functions, as for the other codecs.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["RULES", "decode", "is_mask", "matches", "find_sources", "MIN_NUMEL"]

#: the rules a derived entry may name (R24)
RULES = ("nonzero",)
#: smaller masks stay as they are: a derived entry's header bytes (its source's name) cost
#: about what a few dozen elements of mask do
MIN_NUMEL = 64
#: elements looked at first (a strided sample) to tell a weight from a mask cheaply
_SAMPLE = 1 << 12
#: same-shape tensors compared with one mask at most (nearest names first)
_MAX_TRIES = 4
#: integer views of float dtypes: +0.0 is the all-zero bit pattern, -0.0 is not
_BITS_OF = {torch.float16: torch.int16, torch.bfloat16: torch.int16, torch.float32: torch.int32,
            torch.float64: torch.int64}


def decode(source: torch.Tensor, dtype: torch.dtype, rule: str = "nonzero") -> torch.Tensor:
    """The derived tensor: 1 where ``source`` is not equal to 0 (IEEE comparison: -0.0 is 0,
    NaN is not), 0 elsewhere, as ``dtype``, on ``source``'s device and of its shape."""
    assert rule in RULES, rule  # the reader checked it (R24)
    return (source != 0).to(dtype)


def is_mask(tensor: torch.Tensor) -> bool:
    """Whether every element is exactly 0 or 1 as :func:`decode` gives them back bit for bit:
    bool, an integer 0 / 1, or a float +0.0 / 1.0 (a -0.0 would come back as +0.0)."""
    if tensor.dtype == torch.bool:
        return True
    flat = tensor.reshape(-1)
    view = _BITS_OF.get(tensor.dtype)
    if view is None and (tensor.dtype.is_floating_point or tensor.dtype.is_complex):
        return False  # float8: not worth a special case
    for part in (flat[:: max(1, flat.numel() // _SAMPLE)], flat):  # a weight fails on the sample
        zero = part.view(view) == 0 if view is not None else part == 0
        if not bool((zero | (part == 1)).all()):
            return False
    return True


def matches(mask: torch.Tensor, decoded_source: torch.Tensor) -> bool:
    """Whether :func:`decode` of ``decoded_source`` (the source as the file decodes it) gives
    back ``mask`` exactly (``mask`` passed :func:`is_mask`)."""
    return mask.shape == decoded_source.shape and bool(torch.equal(mask != 0, decoded_source != 0))


def find_sources(tensors: Mapping[str, torch.Tensor], names: list[str] | None = None) -> dict[str, str]:
    """Masks and the tensor each may be derived from: ``{mask name: source name}``.

    A mask is a tensor of at least MIN_NUMEL elements that :func:`is_mask`; its candidates
    are the other tensors of its shape that are not masks, nearest name first (the longest
    common prefix: ``fc1.weight`` for ``fc1.weight_mask`` or ``fc1.mask``), at most a few,
    and the first whose own values have the mask's pattern of zeros is taken. Whether the
    pattern survives quantization is checked later, against the decoded source.
    """
    names = list(tensors) if names is None else names
    by_shape: dict[tuple[int, ...], list[str]] = {}
    for name in names:
        tensor = tensors[name]
        if tensor.numel() >= MIN_NUMEL:
            by_shape.setdefault(tuple(tensor.shape), []).append(name)
    found: dict[str, str] = {}
    for group in by_shape.values():
        if len(group) < 2:
            continue
        masks = [name for name in group if is_mask(tensors[name])]
        chosen = frozenset(masks)
        others = [name for name in group if name not in chosen]
        for mask in masks:
            ranked = sorted(others, key=lambda other: -_common_prefix(mask, other))[:_MAX_TRIES]
            for other in ranked:
                if _sample_matches(tensors[mask], tensors[other]) and matches(tensors[mask], tensors[other]):
                    found[mask] = other
                    break
    return found


def _sample_matches(mask: torch.Tensor, other: torch.Tensor) -> bool:
    """:func:`matches` on a strided sample: most candidates fail it at a tiny cost."""
    step = max(1, mask.numel() // _SAMPLE)
    return matches(mask.reshape(-1)[::step], other.reshape(-1)[::step])


def _common_prefix(a: str, b: str) -> int:
    count = 0
    for x, y in zip(a, b):
        if x != y:
            break
        count += 1
    return count
