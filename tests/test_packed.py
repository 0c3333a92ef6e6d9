"""Packed inference (qpack.packed): every forward path against the dequantized model, state
dicts bit-identical to qpack.load, the memory bound, and a transformers model end to end."""

import math

import pytest
import torch
from torch import nn

import qpack
import qpack.packed
from qpack.dtypes import itemsize
from qpack.packed import KERNELS, PackedEmbedding, PackedLinear, _int4unpack, pack_modules, packed_bytes, summary
from qpack.reader import QpkReader


class Net(nn.Module):
    """One of each layer kind; shapes the int4 kernel takes (N % 32, K % 64)."""

    def __init__(self, vocab: int = 40, dim: int = 64) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.up = nn.Linear(dim, 128)
        self.down = nn.Linear(128, dim, bias=False)
        self.conv2 = nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect")
        self.conv1 = nn.Conv1d(4, 8, 3, stride=2)
        self.norm = nn.LayerNorm(dim)

    def forward(self, ids, image, seq):
        h = self.norm(self.down(torch.relu(self.up(self.emb(ids)))))
        return h, self.conv2(image), self.conv1(seq)


def _inputs(gen, vocab=40):
    return (torch.randint(0, vocab, (3, 5), generator=gen), torch.randn(2, 3, 8, 8, generator=gen),
            torch.randn(2, 4, 11, generator=gen))


def _models(tmp_path, make, **options):
    torch.manual_seed(0)
    path = tmp_path / "m.qpk"
    qpack.pack(make().state_dict(), path, force=True, **options)
    reference = make()
    reference.load_state_dict(qpack.load(path))
    packed = make()
    qpack.load_into(packed, path, packed=True)
    return path, reference, packed


def _assert_same_outputs(reference, packed, inputs, atol=2e-5):
    with torch.no_grad():
        for want, got in zip(reference(*inputs), packed(*inputs)):
            assert got.dtype == want.dtype and got.shape == want.shape
            torch.testing.assert_close(got, want, rtol=1e-5, atol=atol)


def _assert_state_equal(path, packed):
    loaded, state = qpack.load(path), packed.state_dict()
    assert list(state) == list(nn.Module.state_dict(packed)) and set(state) == set(loaded)
    for name, tensor in loaded.items():
        assert state[name].dtype == tensor.dtype and torch.equal(state[name], tensor), name


# options -> the paths the two linear layers take with numba, and without
PATHS = [
    (dict(bits=8, granularity="channel"), "int8mm", "int8mm"),
    (dict(bits=6, granularity="tensor"), "int8mm", "int8mm"),
    (dict(bits=4, granularity="channel"), "fused", "int4mm"),
    (dict(bits=3, granularity="group:32"), "fused", "int4mm"),
    (dict(bits=4, granularity="group:64", rans="always"), "fused", "int4mm"),
    (dict(bits=4, method="kmeans"), "fused", "lookup"),
    (dict(bits=7, method="kmeans", granularity="channel"), "fused", "lookup"),
    (dict(bits=8, granularity="group:16"), "fused", "dequantize"),
    (dict(bits=2, granularity="group:16"), "fused", "dequantize"),
    (dict(bits=5, granularity="group:48"), "fused", "dequantize"),  # groups straddle rows
    (dict(bits=3, method="kmeans", granularity="group:96"), "fused", "lookup"),
]


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("options,with_numba,without", PATHS)
def test_each_path_matches_the_dequantized_model(tmp_path, monkeypatch, options, with_numba, without, fused):
    if fused:
        pytest.importorskip("numba", reason="the fused kernels need numba (the fast and dev extras)")
    monkeypatch.setattr(qpack.packed, "FUSED", fused)
    path, reference, packed = _models(tmp_path, Net, **options)
    assert isinstance(packed.up, PackedLinear) and isinstance(packed.emb, PackedEmbedding)
    assert packed.up.kernel == packed.down.kernel == (with_numba if fused else without)
    assert isinstance(packed.norm, nn.LayerNorm)
    gen = torch.Generator().manual_seed(1)
    _assert_same_outputs(reference, packed, _inputs(gen))
    # more rows than the kernels take: the weight is rebuilt
    _assert_same_outputs(reference, packed, (torch.randint(0, 40, (9, 10), generator=gen), *_inputs(gen)[1:]))
    with torch.no_grad():  # 3 rows: the fused or PyTorch kernels; bf16: the PyTorch kernels
        x = torch.randn(3, 64, generator=gen)
        torch.testing.assert_close(packed.up(x), reference.up(x), rtol=1e-5, atol=2e-5)
        if packed.up.kernel in ("int8mm", "int4mm"):
            torch.testing.assert_close(packed.up(x.bfloat16()).float(), reference.up(x), rtol=5e-2, atol=5e-2)
    _assert_state_equal(path, packed)


@pytest.mark.parametrize("kernel,fused", [("int8mm", True), ("int8mm", False), ("dequantize", False)])
def test_forced_paths_agree(tmp_path, monkeypatch, kernel, fused):
    """int8 layers run the fused numba kernel for small batches, else torch._weight_int8pack_mm."""
    if fused:
        pytest.importorskip("numba", reason="the fused kernel needs numba (the fast and dev extras)")
    monkeypatch.setattr(qpack.packed, "FUSED", fused)
    assert (qpack.packed.fused_rows() >= 15) == fused
    path, reference, _ = _models(tmp_path, Net, bits=8, granularity="channel")
    torch.manual_seed(0)
    packed = Net()
    with QpkReader(path) as reader:
        done = pack_modules(packed, reader, torch.device("cpu"), kernels=(kernel,))
        packed.load_state_dict({n: reader.tensor(n) for n in reader.keys() if n not in done})
    assert summary(packed) == ({"int8mm": 2, "dequantize": 3} if kernel == "int8mm" else {"dequantize": 5})
    assert packed.up.kernel == kernel
    _assert_same_outputs(reference, packed, _inputs(torch.Generator().manual_seed(2)))
    _assert_state_equal(path, packed)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_weights_and_activations(tmp_path, dtype):
    def make():
        return nn.Sequential(nn.Linear(64, 96), nn.ReLU(), nn.Linear(96, 64)).to(dtype)

    for options in (dict(bits=8, granularity="channel"), dict(bits=4, granularity="channel")):
        path, reference, packed = _models(tmp_path, make, **options)
        x = torch.randn(4, 64).to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(packed(x), reference(x), rtol=2e-2, atol=2e-2)
        _assert_state_equal(path, packed)


def test_embedding_rows_and_whole_table(tmp_path):
    # odd width at 4 bits: rows do not start on a byte, the whole table is rebuilt instead
    for dim, options in [(64, dict(bits=4, granularity="group:16")), (33, dict(bits=4, granularity="channel")),
                         (64, dict(bits=5, method="kmeans", granularity="channel")), (48, dict(bits=8, granularity="group:32"))]:
        def make(dim=dim):
            return nn.Sequential(nn.Embedding(30, dim, padding_idx=0))

        path, reference, packed = _models(tmp_path, make, **options)
        ids = torch.randint(0, 30, (4, 7), generator=torch.Generator().manual_seed(dim))
        with torch.no_grad():
            assert torch.equal(packed(ids), reference(ids))
        assert packed[0]._rows_fit() == (dim != 33 and options.get("granularity") != "group:32")
        _assert_state_equal(path, packed)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(64, 32)
        self.head = nn.Linear(32, 64, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids):
        return (self.head(self.emb(ids)),)


def test_tied_weights_share_one_container(tmp_path):
    torch.manual_seed(0)
    state = {k: v for k, v in Tied().state_dict().items() if k != "head.weight"}  # as save_pretrained does
    qpack.pack(state, tmp_path / "m.qpk", bits=8, granularity="channel")
    reference = Tied()
    reference.load_state_dict(qpack.load(tmp_path / "m.qpk"), strict=False)
    packed = Tied()
    result = qpack.load_into(packed, tmp_path / "m.qpk", packed=True)
    assert not result.missing_keys and packed.head.packed is packed.emb.packed
    assert packed_bytes(packed) < 64 * 32 * 1.15 + 64 * 8 * 2
    _assert_same_outputs(reference, packed, (torch.randint(0, 64, (2, 3)),))


def test_wide_indices_load_as_usual(tmp_path):
    path, reference, packed = _models(tmp_path, Net, bits=12)
    assert summary(packed) == {} and type(packed.up) is nn.Linear
    _assert_state_equal(path, packed)


def _baseline_bytes(path) -> int:
    """Quantized payloads in byte containers (1 byte per index, half one at <= 4 bits) plus
    their stored parameters, plus every lossless tensor."""
    total = 0
    with QpkReader(path) as reader:
        for entry in reader.entries.values():
            if entry.encoding == "raw":
                total += entry.numel * itemsize(entry.dtype)
                continue
            total += math.ceil(entry.numel / 2) if entry.bits <= 4 else entry.numel
            total += sum(len(v) for v in entry.params.values() if isinstance(v, bytes))
    return total


@pytest.mark.parametrize("options", [dict(bits=8, granularity="channel"), dict(bits=4, granularity="channel"),
                                     dict(bits=4, method="kmeans")])
def test_packed_memory_bound(tmp_path, options):
    def make():
        return nn.Sequential(nn.Linear(256, 512), nn.GELU(), nn.Linear(512, 256), nn.LayerNorm(256))

    path, reference, packed = _models(tmp_path, make, **options)
    assert packed_bytes(packed) <= 1.15 * _baseline_bytes(path)
    assert packed_bytes(packed) < packed_bytes(reference) / 3.4


def test_int4_layout_inverse():
    gen = torch.Generator().manual_seed(0)
    for n, k in [(32, 64), (96, 128), (64, 320)]:
        q = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.int32)
        operand = torch._convert_weight_to_int4pack_for_cpu(q, 2)
        assert torch.equal(_int4unpack(operand, n, k), q.reshape(-1).to(torch.uint8))


def test_fused_int8_kernel_batches():
    pytest.importorskip("numba", reason="the fused kernel needs numba (the fast and dev extras)")
    from qpack import _fused

    gen = torch.Generator().manual_seed(3)
    s = torch.randint(-128, 128, (37, 70), generator=gen, dtype=torch.int8)
    scale, offset = torch.rand(37, generator=gen) * 0.01, torch.randn(37, generator=gen) * 0.1
    weight = s.float() * scale[:, None] + offset[:, None]
    for rows in (1, 2, 17):
        x = torch.randn(rows, 70, generator=gen)
        torch.testing.assert_close(_fused.int8_matmul(x, s, scale, offset), x @ weight.T, rtol=1e-5, atol=1e-5)


def test_input_gradients_take_the_dequantize_path(tmp_path):
    def make():
        return nn.Sequential(nn.Linear(64, 96))

    _, reference, packed = _models(tmp_path, make, bits=8, granularity="channel")
    assert packed[0].kernel == "int8mm"
    x = torch.randn(3, 64, requires_grad=True)
    packed(x).sum().backward()
    want = torch.randn(3, 64, requires_grad=True)
    with torch.no_grad():
        want.copy_(x)
    reference(want).sum().backward()
    torch.testing.assert_close(x.grad, want.grad)


def test_kernels_listed():
    assert set(KERNELS) == {"int8mm", "int4mm", "fused", "lookup", "dequantize"}


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("options", [dict(bits=8, granularity="channel"), dict(bits=4, granularity="group:32"),
                                     dict(bits=4, method="kmeans")])
def test_packed_on_cuda_matches_cpu(tmp_path, options):
    path, reference, _ = _models(tmp_path, Net, **options)
    torch.manual_seed(0)
    packed = Net().cuda()
    qpack.load_into(packed, path, packed=True)
    assert set(summary(packed)) <= {"dequantize", "lookup"}  # the kernels are CPU-only
    inputs = _inputs(torch.Generator().manual_seed(1))
    with torch.no_grad():
        for want, got in zip(reference(*inputs), packed(*(x.cuda() for x in inputs))):
            torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)
    for name, tensor in qpack.load(path).items():
        assert torch.equal(packed.state_dict()[name].cpu(), tensor), name
