"""Inference from packed weights: layers that keep a .qpk file's indices on the device.

``qpack.load_into(model, path, packed=True)`` swaps each ``nn.Linear``, ``nn.Conv1d/2d/3d``,
``nn.Embedding`` and transformers ``Conv1D`` whose weight the file stores quantized (at most
8 bits) for a packed layer from this module. A packed layer holds the indices in a
byte-aligned container, decoded once from the stored (bit-packed or rANS-coded) form:

- ``nibbles``: two indices per byte, index 2i in the low half (bits <= 4), the layout of
  ``bitpack.pack_bits(idx, 4)``;
- ``bytes``: one uint8 index per byte (5 to 8 bits);
- ``int8``: one byte per index, stored as ``idx - 128`` in int8, the operand of
  ``torch._weight_int8pack_mm`` (uniform, per tensor or channel, 5 to 8 bits, linear layers
  on the CPU);
- ``int4pack``: the operand of ``torch._weight_int4pack_mm_for_cpu`` (uniform, at most
  4 bits, linear layers on the CPU whose shape the kernel takes, when numba is missing),

(bytes and nibbles also feed the fused numba kernels of ``qpack._fused``: see PackedLinear)

plus the tensor's parameters (min and step, or codebooks). ``forward`` rebuilds the weight of
that one layer when it needs it (or hands the indices to a kernel that does), so at most one
layer's weight exists at full precision at a time. Wider indices (9 to 16 bits) are rebuilt
once at load time and kept as a plain weight: a 16-bit container would save little.

``state_dict()`` of a packed model holds the rebuilt weights, bit-identical to ``qpack.load``:
they come from the codecs' own ``dequantize`` functions (spec section 3) applied to the
container's indices. The kernels compute the same weights with their own arithmetic (an FMA,
another summation order), so their outputs match the rebuilt model's within float
rounding, not to the bit.
"""

from __future__ import annotations

import functools
import logging
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .bitpack import pack_bits, unpack_bits
from .codecs import kmeans, uniform
from .dtypes import dtype_from_name
from .format import TensorEntry
from .reader import QpkReader, decode_indices, params_on

__all__ = ["PackedWeight", "PackedLinear", "PackedConv", "PackedEmbedding", "pack_modules",
           "packed_bytes", "KERNELS"]

log = logging.getLogger("qpack")

try:  # the optional fused int8 kernel (pip install qpack[fast])
    from . import _fused
except ImportError:  # pragma: no cover - numba missing
    _fused = None  # type: ignore[assignment]

#: use the fused int8 kernel for small batches when numba is installed (tests turn it off)
FUSED = True

#: the forward paths a packed linear layer can take: see PackedLinear
KERNELS = ("int8mm", "int4mm", "fused", "lookup", "dequantize")

#: batch rows up to which the PyTorch int8 / int4 kernels beat rebuilding the weight with
#: float32 activations (above, they are 5-10x slower than the fp32 matmul here)
_KERNEL_ROWS = 4

#: group sizes ``torch._weight_int4pack_mm_for_cpu`` accepts
_INT4_GROUPS = (256, 128, 64, 32)


class PackedWeight(nn.Module):
    """One quantized weight as indices in a byte container plus its parameters.

    Its tensors are buffers that ``state_dict`` leaves out (the layer that owns it writes the
    rebuilt weight instead); ``.to(device)`` moves them like any buffer.

    Args:
        entry: the tensor's header record.
        indices: its flat indices (any integer dtype), already checked (R20).
        device: where the container lives.
        kernel: the container to build for ("int8mm", "int4mm", anything else: plain bytes or
            nibbles); the caller checked that the kernel fits.
    """

    def __init__(self, entry: TensorEntry, indices: torch.Tensor, device: torch.device, kernel: str) -> None:
        super().__init__()
        self.encoding = entry.encoding
        self.bits = entry.bits
        self.shape = tuple(entry.shape)
        self.dtype = dtype_from_name(entry.dtype)
        self.row_length = entry.group_size or None
        self.kernel = kernel
        self.int4_group = 0
        params = params_on(entry, device)
        if self.encoding == "uniform":
            self.register_buffer("lo", params["min"], persistent=False)
            step = uniform.step_of(params["min"], params["max"], self.bits)
            if kernel != "int4mm":  # the int4 kernel's scales are the steps: no second copy
                self.register_buffer("step", step, persistent=False)
        else:
            self.register_buffer("codebook", params["codebook"], persistent=False)
        indices = indices.to(device)
        if kernel == "int8mm":
            # int8 = idx - 128: the same byte as idx with its top bit flipped
            container = (indices.to(torch.uint8) ^ 128).view(torch.int8).reshape(self.shape[0], -1)
            out_features = container.shape[0]
            lo, step = self.lo.expand(out_features), step.expand(out_features)
            # W = lo + step * idx = (lo + 128 step) + step * (idx - 128); y = x W^T + offset * sum(x)
            self.register_buffer("offset", lo + 128 * step, persistent=False)
            self.register_buffer("scales", step.contiguous(), persistent=False)
        elif kernel == "int4mm":
            container, self.int4_group, scale_zero = _int4pack(indices, self.lo, step, self.shape, self.row_length)
            self.register_buffer("scale_zero", scale_zero, persistent=False)
        elif self.bits <= 4:
            container = pack_bits(indices, 4)
        else:
            container = indices.to(torch.uint8)
        self.register_buffer("container", container, persistent=False)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def indices(self) -> torch.Tensor:
        """The flat indices (uint8), unpacked from the container."""
        if self.kernel == "int8mm":
            return self.container.view(torch.uint8).reshape(-1) ^ 128
        if self.kernel == "int4mm":
            return _int4unpack(self.container, self.shape[0], self.numel // self.shape[0])
        if self.bits <= 4:
            return unpack_bits(self.container, 4, self.numel)
        return self.container

    def dequantize(self) -> torch.Tensor:
        """The weight rebuilt in its original dtype and shape, exactly as ``qpack.load`` does."""
        indices = self.indices()
        if self.encoding == "uniform":
            lo = self.lo
            if self.kernel == "int4mm":
                step = _int4_steps(self.scale_zero, lo.numel(), self.shape)
            else:
                step = self.step
            return uniform.dequantize_with_step(indices, lo, step, self.shape, self.dtype, self.row_length)
        return kmeans.dequantize(indices, {"codebook": self.codebook}, self.bits, self.shape, self.dtype,
                                 self.row_length)

    def fused_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ W.T`` by the numba kernel that rebuilds one row of W at a time (2-D weights)."""
        rows = self.lo.numel() if self.encoding == "uniform" else self.codebook.shape[0]
        group = self.row_length or self.numel // rows
        if self.encoding == "uniform":
            return _fused.decode_matmul(x, self.container, self.bits <= 4, self.shape, group, self.lo, self.step)
        return _fused.decode_matmul(x, self.container, self.bits <= 4, self.shape, group, codebook=self.codebook)

    def extra_repr(self) -> str:
        return f"{self.encoding}, bits={self.bits}, shape={self.shape}, kernel={self.kernel}"


class _PackedLayer(nn.Module):
    """What every packed layer shares: a ``PackedWeight`` and a state dict with the weight."""

    packed: PackedWeight

    @property
    def weight(self) -> torch.Tensor:
        """The rebuilt weight (a new tensor each time: it costs a dequantization)."""
        return self.packed.dequantize()

    def _save_to_state_dict(self, destination: dict[str, Any], prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        destination[prefix + "weight"] = self.packed.dequantize()


class PackedLinear(_PackedLayer):
    """``nn.Linear`` (or transformers ``Conv1D``, ``transposed=True``) over a packed weight.

    The forward path (``kernel``) is one of ``KERNELS``:

    - ``int8mm`` (uniform, per tensor or channel, 5-8 bits, int8 container): float32 batches
      of up to ``fused_rows()`` rows run the fused numba kernel, half-precision batches and
      batches of up to 4 rows ``torch._weight_int8pack_mm`` plus the ``min * sum(x)`` term,
      larger ones rebuild the weight and call ``F.linear``;
    - ``int4mm`` (uniform, at most 4 bits, without numba): ``torch._weight_int4pack_mm_for_cpu``
      for half-precision batches and batches of up to 4 rows, else rebuild;
    - ``fused`` (anything else, with numba): float32 batches of up to ``fused_rows()`` rows run
      a numba kernel that rebuilds one weight row at a time in cache; larger ones rebuild;
    - ``lookup`` / ``dequantize``: rebuild the weight (codebook lookup, or the uniform grid),
      then ``F.linear``.
    """

    def __init__(self, packed: PackedWeight, bias: torch.Tensor | None, transposed: bool = False) -> None:
        super().__init__()
        self.packed = packed
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=bias.requires_grad)
        self.transposed = transposed
        self.out_features = packed.shape[1] if transposed else packed.shape[0]
        self.in_features = packed.shape[0] if transposed else packed.shape[1]

    @property
    def kernel(self) -> str:
        return self.packed.kernel

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        # the kernels have no backward: a graph through the input takes the rebuilding path
        # (and a model moved off the CPU after loading rebuilds: the kernels are CPU ones)
        if (packed.kernel in ("int8mm", "int4mm", "fused") and packed.container.device.type == "cpu"
                and x.device.type == "cpu" and not (x.requires_grad and torch.is_grad_enabled())):
            flat = x.reshape(-1, x.shape[-1])
            small = flat.dtype == torch.float32 and rows <= fused_rows()
            y = None
            if packed.kernel == "fused" and small:
                y = packed.fused_matmul(flat.contiguous())
            elif packed.kernel == "int8mm" and small:
                y = _fused.int8_matmul(flat.contiguous(), packed.container, packed.scales, packed.offset)
            elif packed.kernel != "fused" and (rows <= _KERNEL_ROWS or flat.dtype in (torch.bfloat16, torch.float16)):
                y = self._torch_kernel(flat)
            if y is not None:
                if self.bias is not None:
                    y = y.add_(self.bias.to(y.dtype))
                return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)
        weight = packed.dequantize()
        if self.transposed:  # transformers Conv1D: y = x @ W + b with W of shape (in, out)
            y = x @ weight
            return y if self.bias is None else y + self.bias
        return F.linear(x, weight, self.bias)

    def _torch_kernel(self, flat: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if flat.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            flat = flat.float()
        flat = flat.contiguous()
        if packed.kernel == "int8mm":
            y = torch._weight_int8pack_mm(flat, packed.container, packed.scales.to(flat.dtype))
            return y.addcmul_(flat.sum(dim=1, keepdim=True), packed.offset.to(flat.dtype)[None, :])
        return torch._weight_int4pack_mm_for_cpu(flat, packed.container, packed.int4_group,
                                                 packed.scale_zero.to(flat.dtype))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={self.kernel}"


class PackedConv(_PackedLayer):
    """``nn.Conv1d/2d/3d`` over a packed weight: the weight is rebuilt, then convolved."""

    def __init__(self, packed: PackedWeight, conv: nn.modules.conv._ConvNd) -> None:
        super().__init__()
        self.packed = packed
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach(), requires_grad=conv.bias.requires_grad)
        self.dims = len(conv.kernel_size)
        self.stride, self.padding, self.dilation, self.groups = conv.stride, conv.padding, conv.dilation, conv.groups
        self.padding_mode = conv.padding_mode
        self._reversed_padding_repeated_twice = conv._reversed_padding_repeated_twice

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        weight = self.packed.dequantize()
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return conv(x, weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return conv(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return f"conv{self.dims}d, stride={self.stride}, padding={self.padding}, groups={self.groups}"


class PackedEmbedding(_PackedLayer):
    """``nn.Embedding`` over a packed weight: only the looked-up rows are rebuilt when the
    parameter rows line up with the embedding rows (per tensor, per channel, or groups that
    tile a row); otherwise the whole table is rebuilt, then indexed."""

    def __init__(self, packed: PackedWeight, embedding: nn.Embedding) -> None:
        super().__init__()
        self.packed = packed
        self.padding_idx = embedding.padding_idx
        self.num_embeddings, self.embedding_dim = packed.shape

    def _rows_fit(self) -> bool:
        packed, dim = self.packed, self.embedding_dim
        if packed.kernel in ("int8mm", "int4mm") or (packed.bits <= 4 and dim % 2):
            return False
        return packed.row_length is None or dim % packed.row_length == 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if not self._rows_fit():
            return F.embedding(ids, packed.dequantize(), self.padding_idx)
        rows = ids.reshape(-1)
        dim = self.embedding_dim
        count = rows.numel() * dim
        table = packed.container.view(self.num_embeddings, -1)[rows].reshape(-1)
        indices = unpack_bits(table, 4, count) if packed.bits <= 4 else table
        sets = _param_rows(packed, rows)
        shape = (rows.numel(), dim)
        if packed.encoding == "uniform":
            lo, step = sets
            values = uniform.dequantize_with_step(indices, lo, step, shape, packed.dtype, packed.row_length)
        else:
            values = kmeans.dequantize(indices, {"codebook": sets[0]}, packed.bits, shape, packed.dtype,
                                       packed.row_length)
        return values.reshape(*ids.shape, dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def fused_rows() -> int:
    """Batch rows up to which int8 layers run the fused kernel (0 without numba)."""
    return _fused.MAX_ROWS if _fused is not None and FUSED else 0


def _param_rows(packed: PackedWeight, rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The parameter sets of the given embedding rows, in row order."""
    tensors = (packed.lo, packed.step) if packed.encoding == "uniform" else (packed.codebook,)
    sets = tensors[0].shape[0]
    if sets == 1:
        return tensors
    per_row = sets // packed.shape[0]  # 1 per channel, dim / G per group
    picks = (rows[:, None] * per_row + torch.arange(per_row, device=rows.device)[None, :]).reshape(-1)
    return tuple(t[picks] for t in tensors)


# -- int4 kernel operand --------------------------------------------------------------------

def _int4_fits(shape: tuple[int, ...], row_length: int | None, device: torch.device) -> bool:
    if device.type != "cpu" or len(shape) != 2 or not hasattr(torch, "_weight_int4pack_mm_for_cpu"):
        return False
    out_features, in_features = shape
    if out_features % 32 or in_features % 64:
        return False
    return row_length is None or (row_length in _INT4_GROUPS and in_features % row_length == 0)


def _int4pack(indices: torch.Tensor, lo: torch.Tensor, step: torch.Tensor, shape: tuple[int, ...],
              row_length: int | None) -> tuple[torch.Tensor, int, torch.Tensor]:
    """The kernel's weight, group size and (groups, N, 2) scales and zeros.

    The kernel computes ``(q - 8) * scale + zero`` per group of K, so scale = step and
    zero = min + 8 step. Per tensor or channel, the parameters repeat over groups of 256
    (or the largest size that divides K).
    """
    out_features, in_features = shape
    q = indices.reshape(out_features, in_features).to(torch.int32)
    packed = torch._convert_weight_to_int4pack_for_cpu(q, 2)
    if row_length is None:
        group = next(g for g in _INT4_GROUPS if in_features % g == 0)
        lo_g = lo.expand(out_features)[:, None].expand(out_features, in_features // group)
        step_g = step.expand(out_features)[:, None].expand(out_features, in_features // group)
    else:
        group = row_length
        lo_g, step_g = lo.reshape(out_features, -1), step.reshape(out_features, -1)
    scale_zero = torch.stack([step_g.t(), (lo_g + 8 * step_g).t()], dim=-1).contiguous()
    return packed, group, scale_zero


def _int4unpack(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Invert ``torch._convert_weight_to_int4pack_for_cpu`` (torch 2.13), whose layout depends
    on the CPU (``_int4_layout``). With AVX2, byte (b, k, j) of an (N/32, K, 16) view holds
    row 32b + j in its low half and row 32b + 16 + j in its high half, column k. With AVX-512,
    blocks of 64 rows: byte (b, k, j) of an (N/64, K, 32) view holds rows 64b + j and
    64b + 32 + j; a last block of 32 rows is (K, 16) bytes, byte (k, j) holding rows 2j and
    2j + 1. ``pack_modules`` checks the inverse on every weight it packs."""
    block = 64 if _int4_layout() == "avx512" else 32
    whole = out_features // block * block
    flat = packed.reshape(-1)
    blocks = flat[:whole * in_features // 2].reshape(whole // block, in_features, block // 2)
    halves = torch.stack([blocks & 15, blocks >> 4], dim=1)  # (N/block, 2, K, block/2)
    rows = halves.permute(0, 1, 3, 2).reshape(-1)
    if whole == out_features:
        return rows
    tail = flat[whole * in_features // 2:].reshape(in_features, -1)  # AVX-512's last 32 rows
    pairs = torch.stack([tail & 15, tail >> 4], dim=-1).reshape(in_features, -1)
    return torch.cat([rows, pairs.t().reshape(-1)])


@functools.lru_cache(maxsize=1)
def _int4_layout() -> str:
    """"avx512" or "avx2": where this CPU's int4 kernel puts row 32 of a 64 x 64 weight."""
    probe = torch.zeros(64, 64, dtype=torch.int32)
    probe[32, 0] = 1
    return "avx512" if int(torch._convert_weight_to_int4pack_for_cpu(probe, 2).reshape(-1)[0]) == 16 else "avx2"


def _int4_steps(scale_zero: torch.Tensor, sets: int, shape: tuple[int, ...]) -> torch.Tensor:
    """The steps back from the kernel's scales (they are the steps, bit for bit)."""
    scales = scale_zero[..., 0]  # (groups, N)
    if sets == 1:
        return scales[0, :1].clone()
    if sets == shape[0]:
        return scales[0].clone()
    return scales.t().reshape(-1).clone()


# -- choosing layers and paths --------------------------------------------------------------

def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D, without importing transformers
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and isinstance(getattr(module, "weight", None), torch.Tensor)


def _kind(module: nn.Module) -> str | None:
    if type(module) is nn.Linear:
        return "linear"
    if _is_hf_conv1d(module):
        return "conv1d_t"
    if type(module) in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
        return "conv"
    if type(module) is nn.Embedding and module.max_norm is None and not module.sparse:
        return "embedding"
    return None


def choose_kernel(entry: TensorEntry, kind: str, device: torch.device, allowed: tuple[str, ...] = KERNELS) -> str:
    """The forward path for one layer (see ``KERNELS`` and ``PackedLinear``)."""
    rebuild = "lookup" if entry.encoding == "kmeans" else "dequantize"
    if kind != "linear" or device.type != "cpu":
        return rebuild
    shape = tuple(entry.shape)
    per_row = entry.granularity in ("tensor", "channel")
    if (entry.encoding == "uniform" and 5 <= entry.bits <= 8 and per_row and "int8mm" in allowed
            and hasattr(torch, "_weight_int8pack_mm")):
        return "int8mm"
    if fused_rows() and "fused" in allowed and (entry.bits > 4 or shape[1] % 2 == 0):
        return "fused"
    if (entry.encoding == "uniform" and entry.bits <= 4 and "int4mm" in allowed
            and _int4_fits(shape, entry.group_size or None, device)):
        return "int4mm"
    return rebuild


def pack_modules(module: nn.Module, reader: QpkReader, device: torch.device,
                 kernels: tuple[str, ...] = KERNELS) -> set[str]:
    """Swap every layer whose weight ``reader`` stores quantized at <= 8 bits for a packed one.

    Layers that share one weight Parameter (tied embeddings) share one ``PackedWeight``.

    Args:
        module: the model; changed in place.
        reader: the open .qpk file.
        device: where containers and parameters live.
        kernels: the paths allowed (tests force each one); ``lookup`` or ``dequantize``
            when none of them fits.

    Returns:
        The state-dict names of the weights now packed (the caller loads everything else).
    """
    by_weight: dict[int, list[tuple[str, nn.Module]]] = {}
    for name, child in module.named_modules(remove_duplicate=False):
        kind = _kind(child)
        if kind is not None and name:  # the root module itself cannot be swapped in place
            by_weight.setdefault(id(child.weight), []).append((name, child))
    done: set[str] = set()
    for users in by_weight.values():
        names = [f"{name}.weight" if name else "weight" for name, _ in users]
        stored = next((n for n in names if n in reader and _packable(reader.entry(n))), None)
        if stored is None:
            continue
        entry = reader.entry(stored)
        kinds = {_kind(child) for _, child in users}
        kernel = choose_kernel(entry, kinds.pop() if len(kinds) == 1 else "mixed", device, kernels)
        indices = decode_indices(entry, reader.read_payload(stored), device)
        packed = PackedWeight(entry, indices, device, kernel)
        if kernel == "int4mm" and not torch.equal(packed.indices(), indices.to(torch.uint8)):
            # another torch build laid the kernel operand out differently: keep plain nibbles
            log.debug("%s: int4pack layout not recognised, dequantizing instead", stored)
            packed = PackedWeight(entry, indices, device, "dequantize")
        for (name, child), key in zip(users, names):
            _replace(module, name, _build(packed, child))
            done.add(key)
    return done


def _packable(entry: TensorEntry) -> bool:
    return entry.encoding in ("uniform", "kmeans") and entry.bits <= 8 and len(entry.shape) >= 2


def _build(packed: PackedWeight, child: nn.Module) -> nn.Module:
    kind = _kind(child)
    if tuple(child.weight.shape) != packed.shape:
        raise ValueError(f"weight shape {tuple(child.weight.shape)} does not match the file's {packed.shape}")
    if kind == "linear":
        return PackedLinear(packed, child.bias)
    if kind == "conv1d_t":
        return PackedLinear(packed, child.bias, transposed=True)
    if kind == "conv":
        return PackedConv(packed, child)
    return PackedEmbedding(packed, child)


def _replace(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


def packed_bytes(module: nn.Module) -> int:
    """Bytes of every distinct tensor a module holds (parameters and buffers, any kind)."""
    seen: dict[int, int] = {}
    for tensor in [*module.parameters(), *module.buffers()]:
        seen[id(tensor)] = tensor.numel() * tensor.element_size()
    return sum(seen.values())


def summary(module: nn.Module) -> dict[str, int]:
    """How many packed layers take each forward path."""
    out: dict[str, int] = {}
    seen: set[int] = set()
    for child in module.modules():
        if isinstance(child, PackedWeight) and id(child) not in seen:
            seen.add(id(child))
            out[child.kernel] = out.get(child.kernel, 0) + 1
    return out

