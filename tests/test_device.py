"""The device path: decoding on a GPU gives the same tensors as on the CPU, bit for bit.

Skipped cleanly where no CUDA device is present (CI); run on a GPU machine with
``python -m pytest tests/test_device.py``.
"""

import pytest
import torch

import qpack
from qpack.bitpack import pack_bits, unpack_bits

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("bits", range(1, 17))
def test_unpack_on_device_matches_cpu(bits):
    gen = torch.Generator().manual_seed(bits)
    indices = torch.randint(0, 1 << bits, (10_001,), generator=gen)
    packed = pack_bits(indices, bits)
    on_device = unpack_bits(packed.cuda(), bits, indices.numel())
    assert on_device.is_cuda
    assert torch.equal(on_device.cpu(), unpack_bits(packed, bits, indices.numel()))
    assert torch.equal(pack_bits(indices.cuda(), bits).cpu(), packed)


@pytest.mark.parametrize("method,granularity", [("uniform", "tensor"), ("uniform", "channel"), ("kmeans", "tensor")])
@pytest.mark.parametrize("bits", [1, 3, 4, 8, 11, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_load_on_device_matches_cpu(tmp_path, method, granularity, bits, dtype):
    gen = torch.Generator().manual_seed(bits)
    state = {"w": (torch.randn(64, 300, generator=gen) * 0.05).to(dtype),
             "b": torch.randn(64, generator=gen).to(dtype), "steps": torch.tensor(5)}
    qpack.pack(state, tmp_path / "m.qpk", bits=bits, method=method, granularity=granularity)
    on_cpu = qpack.load(tmp_path / "m.qpk")
    on_gpu = qpack.load(tmp_path / "m.qpk", device="cuda")
    for name, tensor in on_cpu.items():
        assert on_gpu[name].is_cuda and on_gpu[name].dtype == tensor.dtype
        assert torch.equal(on_gpu[name].cpu(), tensor), name


def test_load_into_module_on_device(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    qpack.pack(net.state_dict(), tmp_path / "m.qpk", bits=8)
    net_gpu = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4)).cuda()
    qpack.load_into(net_gpu, tmp_path / "m.qpk")
    net_cpu = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 4))
    qpack.load_into(net_cpu, tmp_path / "m.qpk")
    for (name, a), b in zip(net_gpu.state_dict().items(), net_cpu.state_dict().values()):
        assert a.is_cuda and torch.equal(a.cpu(), b), name


def test_sensitivity_on_device_matches_cpu():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(32, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 32, generator=gen), torch.randint(0, 4, (8,), generator=gen)) for _ in range(2)]
    on_cpu = qpack.measure_sensitivity(model, batches, torch.nn.functional.cross_entropy)
    model.cuda()
    on_gpu = qpack.measure_sensitivity(model, batches, torch.nn.functional.cross_entropy)  # batches moved there
    assert next(model.parameters()).is_cuda
    assert on_gpu.keys() == on_cpu.keys()
    for name, weight in on_cpu.items():
        assert on_gpu[name] == pytest.approx(weight, rel=1e-2), name
