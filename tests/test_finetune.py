"""qpack.finetune: trained k-means quantization (with pruning) and the uniform STE, on tiny models."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qpack
from qpack.errors import InputError
from qpack.finetune import EpochStats, finetune, prune_mask, uniform_grid


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def assert_exact_repack(state: dict[str, torch.Tensor], result: Any, tmp_path: Path) -> None:
    """Packing with the result's options gives back exactly the fine-tuned tensors."""
    qpack.pack(state, tmp_path / "m.qpk", **result.pack_options)
    back = qpack.load(tmp_path / "m.qpk")
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())


class Tiny(nn.Module):
    """Conv + BatchNorm + two Linear layers, for 1x8x8 inputs and 4 classes."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(torch.relu(self.bn(self.conv(x))), 2)
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


QUANTIZED = ["conv.weight", "fc1.weight", "fc2.weight"]  # 72, 4096 and 128 elements; the rest is 1-D


def _data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].sum((1, 2)) > 0).long() * 2 + (x[:, 0, :, :4].sum((1, 2)) > 0).long()
    return x, y


def _loader(x: torch.Tensor, y: torch.Tensor, batch: int = 32) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return list(zip(x.split(batch), y.split(batch)))


@pytest.fixture(scope="module")
def trained() -> dict[str, torch.Tensor]:
    """A Tiny model trained in full precision on the toy problem (its state dict)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        model = Tiny()
        x, y = _data()
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        for _ in range(8):
            for xb, yb in _loader(x, y):
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return {k: v.clone() for k, v in model.state_dict().items()}


def _model(state: dict[str, torch.Tensor]) -> Tiny:
    model = Tiny()
    model.load_state_dict(state)
    return model


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return F.cross_entropy(model(x), y).item()


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
@pytest.mark.parametrize("bits", [1, 2, 4])
def test_at_most_two_to_the_bits_values_and_exact_repack(
    trained: dict[str, torch.Tensor], tmp_path: Path, method: str, bits: int
) -> None:
    model = _model(trained)
    x, y = _data()
    result = finetune(model, _loader(x, y), bits=bits, method=method, epochs=1, lr=1e-3)
    assert sorted(result.tensors) == QUANTIZED
    state = _state(model)
    for name in QUANTIZED:
        assert state[name].unique().numel() <= 2**bits == 1 << result.tensors[name].bits
        assert result.tensors[name].levels == state[name].unique().numel()
    for name in ("conv.bias", "bn.weight", "fc1.bias"):  # 1-D: trained, not quantized
        assert not torch.equal(state[name], trained[name])
    assert result.pack_options["method"] == "kmeans" and result.pack_options["bits"] == bits
    qpack.pack(state, tmp_path / "m.qpk", **result.pack_options)
    back = qpack.load(tmp_path / "m.qpk")
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor), name


def test_kmeans_with_bias_bits_quantizes_one_dimensional_parameters(
    trained: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    model = _model(trained)
    x, y = _data()
    result = finetune(model, _loader(x, y), bits=3, bias_bits=2, epochs=1, lr=1e-3)
    assert set(result.tensors) == {name for name, _ in model.named_parameters()}
    assert result.tensors["bn.weight"].bits == 2 and result.tensors["fc1.weight"].bits == 3
    state = _state(model)
    assert state["fc1.bias"].unique().numel() <= 4
    assert not torch.equal(state["bn.running_mean"], trained["bn.running_mean"])  # BatchNorm statistics trained
    assert_exact_repack(state, result, tmp_path)


def test_pruned_weights_stay_exactly_zero(trained: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = _model(trained)
    x, y = _data()
    masks = {name: prune_mask(trained[name], 0.75) for name in QUANTIZED}
    seen: list[EpochStats] = []
    result = finetune(
        model, _loader(x, y), bits=2, prune=0.75, prune_epochs=2, epochs=2, lr=1e-3, progress=seen.append
    )
    assert [(s.phase, s.epoch) for s in seen] == [("prune", 1), ("prune", 2), ("quantize", 1), ("quantize", 2)]
    assert seen == result.history
    state = _state(model)
    for name in QUANTIZED:
        w = state[name]
        pruned = ~masks[name]
        assert int(pruned.sum()) == round(0.75 * w.numel()) == result.tensors[name].pruned
        assert torch.all(w[pruned] == 0)  # held at zero through both phases
        assert w.unique().numel() <= 4 and 0.0 in w.unique()  # zero plus at most three centroids
        assert result.tensors[name].codebook[0] == 0.0
        assert not torch.equal(w[masks[name]], trained[name][masks[name]])  # the kept ones trained
    assert_exact_repack(state, result, tmp_path)


def test_prune_by_pattern(trained: dict[str, torch.Tensor]) -> None:
    model = _model(trained)
    x, y = _data()
    result = finetune(model, _loader(x, y), bits=3, prune={"fc1.*": 0.9, "conv.*": 0.5}, epochs=0)
    assert result.tensors["fc1.weight"].pruned == round(0.9 * 4096)
    assert result.tensors["conv.weight"].pruned == 36
    assert result.tensors["fc2.weight"].pruned == 0
    assert result.history == []
    assert model.fc1.weight.detach().eq(0).sum() >= round(0.9 * 4096)


def test_training_lowers_the_loss_of_the_quantized_model(trained: dict[str, torch.Tensor]) -> None:
    x, y = _data()
    baseline = _model(trained)
    finetune(baseline, _loader(x, y), bits=1, epochs=0)  # k-means, not trained
    tuned = _model(trained)
    finetune(tuned, _loader(x, y), bits=1, epochs=4, lr=2e-3)
    assert _loss(tuned, x, y) < 0.9 * _loss(baseline, x, y)
    assert tuned.fc1.weight.unique().numel() <= 2


def test_centroids_move_by_the_summed_gradient_of_their_members(trained: dict[str, torch.Tensor]) -> None:
    x, y = _data(32)
    reference = _model(trained)
    finetune(reference, [(x, y)], bits=2, epochs=0)  # the same clustering, not trained
    reference.train()
    F.cross_entropy(reference(x), y).backward()
    model = _model(trained)
    lr = 1e-3
    result = finetune(model, [(x, y)], bits=2, epochs=1, lr=lr)  # one Adam step
    for name in QUANTIZED:
        w = dict(reference.named_parameters())[name]
        before = torch.unique(w.detach())
        index = torch.searchsorted(before, w.detach().reshape(-1))
        summed = torch.zeros_like(before).index_add_(0, index, w.grad.reshape(-1))
        # Adam's first step moves every parameter by lr * sign(gradient)
        torch.testing.assert_close(result.tensors[name].codebook, before - lr * summed.sign(), rtol=0, atol=1e-6)
        after = dict(model.named_parameters())[name].detach()
        assert torch.equal(after.reshape(-1), result.tensors[name].codebook[index])  # same assignments


def test_uniform_ste_keeps_weights_on_their_grid(trained: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = _model(trained)
    x, y = _data()
    result = finetune(model, _loader(x, y), bits=3, method="uniform", epochs=2, lr=1e-3)
    assert result.uniform_exact is True
    state = _state(model)
    for name in QUANTIZED:
        w = state[name]
        snapped, grid = uniform_grid(w, 3)
        assert torch.equal(snapped, w)  # on its own grid: a fixed point
        assert torch.isin(w.unique(), grid).all() and grid.numel() == 8
        assert torch.equal(grid, result.tensors[name].codebook)
        assert not torch.equal(w, uniform_grid(trained[name], 3)[0])  # the latent weights trained
    qpack.pack(state, tmp_path / "u.qpk", bits=3, method="uniform")  # the uniform codec agrees exactly
    back = qpack.load(tmp_path / "u.qpk")
    assert all(torch.equal(back[k], v) for k, v in state.items())


def test_uniform_grid_matches_the_codec(tmp_path: Path) -> None:
    torch.manual_seed(1)
    w = torch.randn(64, 33) * 0.05
    for bits in (1, 3, 8):
        # the snapping is nearest rounding; the codec balances below 7 bits unless told not to
        qpack.pack({"w": w}, tmp_path / f"{bits}.qpk", bits=bits, method="uniform", rounding="nearest")
        assert torch.equal(uniform_grid(w, bits)[0], qpack.load(tmp_path / f"{bits}.qpk")["w"])
    assert torch.equal(uniform_grid(torch.full((8, 8), 0.5), 2)[0], torch.full((8, 8), 0.5))


def test_weight_filter_and_exclude_leave_tensors_full_precision(
    trained: dict[str, torch.Tensor], tmp_path: Path
) -> None:
    model = _model(trained)
    x, y = _data()
    result = finetune(
        model, _loader(x, y), bits=2, epochs=1, lr=1e-3, exclude=["conv.*"],
        weight_filter=lambda name, p: name != "fc2.weight",
    )
    assert list(result.tensors) == ["fc1.weight"]
    assert result.pack_options["exclude"] == ("conv.*", "fc2.weight")
    state = _state(model)
    assert state["fc2.weight"].unique().numel() == 128
    assert_exact_repack(state, result, tmp_path)


def test_bit_overrides(trained: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = _model(trained)
    x, y = _data()
    result = finetune(model, _loader(x, y), bits=2, bit_overrides={"conv.*": 4}, epochs=1, lr=1e-3)
    assert result.tensors["conv.weight"].bits == 4 and result.tensors["conv.bias"].bits == 4
    assert model.conv.weight.unique().numel() > 4
    qpack.pack(_state(model), tmp_path / "m.qpk", **result.pack_options)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in qpack.load(tmp_path / "m.qpk").items())


def test_training_mode_and_custom_loss(trained: dict[str, torch.Tensor]) -> None:
    model = _model(trained).eval()
    x, y = _data(64)
    calls = []

    def loss_fn(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        calls.append(len(target))
        return F.cross_entropy(out, target)

    result = finetune(model, _loader(x, y), bits=3, epochs=1, lr=1e-3, loss_fn=loss_fn)
    assert not model.training and calls == [32, 32]
    assert result.history[0].batches == 2 and result.history[0].accuracy is not None


@pytest.mark.parametrize(
    "options, message",
    [
        ({"method": "uniform", "prune": 0.5}, "prune needs method='kmeans'"),
        ({"prune": 1.0}, "prune fractions"),
        ({"prune": {"fc1.*": -0.1}}, "prune fractions"),
        ({"method": "gptq"}, "unknown method"),
        ({"bits": 0}, "bits"),
        ({"epochs": -1}, "epochs"),
        ({"lr": float("nan")}, "lr"),
        ({"exclude": ["*"]}, "no parameter to quantize"),
    ],
)
def test_bad_options_raise_input_error(trained: dict[str, torch.Tensor], options: dict[str, Any], message: str) -> None:
    x, y = _data(32)
    with pytest.raises(InputError, match=message):
        finetune(_model(trained), [(x, y)], **options)


def test_bad_loaders(trained: dict[str, torch.Tensor]) -> None:
    x, _ = _data(32)
    with pytest.raises(InputError, match="no batches"):
        finetune(_model(trained), [], epochs=1)
    with pytest.raises(InputError, match=r"\(inputs, targets\)"):
        finetune(_model(trained), [x], epochs=1)
    assert issubclass(InputError, ValueError)


def test_import_qpack_does_not_import_finetune() -> None:
    code = "import sys, qpack; print('qpack.finetune' in sys.modules, 'qpack.demo' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "False"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_finetune_on_cuda(trained: dict[str, torch.Tensor], tmp_path: Path) -> None:
    model = _model(trained)
    x, y = _data()
    result = finetune(model, _loader(x, y), bits=3, prune=0.5, epochs=1, lr=1e-3, device="cuda")
    assert model.fc1.weight.is_cuda and result.tensors["fc1.weight"].codebook.device.type == "cpu"
    state = {k: v.cpu() for k, v in model.state_dict().items()}
    assert_exact_repack(state, result, tmp_path)
