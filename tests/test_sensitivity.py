"""qpack.measure_sensitivity: diagonal-Fisher weights from calibration batches, and their use."""

import pytest
import torch
import torch.nn.functional as F

import qpack
from qpack.sensitivity import MIN_WEIGHT


class Branches(torch.nn.Module):
    """Two same-shaped layers, one loud in the output and one quiet, and one never used; with
    BatchNorm statistics and dropout, which eval mode must freeze."""

    def __init__(self) -> None:
        super().__init__()
        self.loud = torch.nn.Linear(128, 64)
        self.quiet = torch.nn.Linear(128, 64)
        self.unused = torch.nn.Linear(128, 64)
        self.norm = torch.nn.BatchNorm1d(128, affine=False)  # statistics only
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.drop(self.norm(x))
        return 3 * self.loud(x) + 0.3 * self.quiet(x)


def model_and_batches():
    torch.manual_seed(0)
    model = Branches()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 128, generator=gen), torch.randint(0, 64, (16,), generator=gen)) for _ in range(3)]
    return model, batches


def test_weights_follow_what_the_loss_feels():
    model, batches = model_and_batches()
    weights = qpack.measure_sensitivity(model, batches, F.cross_entropy)
    assert set(weights) == {name for name, _ in model.named_parameters()}
    assert sum(weights.values()) / len(weights) == pytest.approx(1.0)
    # the unused layer's gradient is zero: it gets the floor, and nothing is below it
    assert weights["unused.weight"] == weights["unused.bias"] == min(weights.values())
    assert 0 < weights["unused.weight"] < 2 * MIN_WEIGHT
    # 10x the output scale is 100x the squared gradient, for the same mean square weight
    assert weights["loud.weight"] > 30 * weights["quiet.weight"]
    assert weights["quiet.weight"] > weights["unused.weight"]


def test_the_model_is_left_as_it_was():
    model, batches = model_and_batches()
    model.train()
    model.drop.eval()
    model.quiet.weight.requires_grad_(False)
    model.loud.weight.grad = torch.full_like(model.loud.weight, 0.5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = qpack.measure_sensitivity(model, batches, F.cross_entropy)
    assert weights["quiet.weight"] > weights["unused.weight"]  # frozen, and still measured
    assert model.training and model.loud.training and not model.drop.training
    assert not model.quiet.weight.requires_grad and model.loud.weight.requires_grad
    assert torch.equal(model.loud.weight.grad, torch.full_like(model.loud.weight, 0.5))
    assert model.quiet.weight.grad is None and model.loud.bias.grad is None
    after = model.state_dict()  # BatchNorm's running statistics included
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_bad_calibration_input():
    model, batches = model_and_batches()
    with pytest.raises(qpack.InputError, match="no calibration batches"):
        qpack.measure_sensitivity(model, [], F.cross_entropy)
    with pytest.raises(qpack.InputError, match="pair"):
        qpack.measure_sensitivity(model, [batches[0][0]], F.cross_entropy)
    with pytest.raises(qpack.InputError, match="scalar"):
        qpack.measure_sensitivity(model, batches, lambda out, y: out.detach().sum())
    with pytest.raises(qpack.InputError, match="not finite"):
        qpack.measure_sensitivity(model, batches, lambda out, y: out.sum() * float("inf"))
    assert model.training and model.loud.weight.grad is None  # restored after a failure too


@pytest.mark.parametrize("limit", [{"target_bpw": 4.0}, {"max_error": 0.05}])
def test_sensitive_tensors_get_more_bits(tmp_path, limit):
    model, batches = model_and_batches()
    weights = qpack.measure_sensitivity(model, batches, F.cross_entropy)
    state = model.state_dict()
    # below the quality floor allowed: the measured weights may sacrifice the quiet layer
    plain = {r.name: r.bits for r in qpack.pack(state, tmp_path / "a.qpk", allow_below_floor=True, **limit).tensors}
    careful = {r.name: r.bits for r in qpack.pack(state, tmp_path / "b.qpk", sensitivity=weights,
                                                  allow_below_floor=True, **limit).tensors}
    assert careful["loud.weight"] > careful["quiet.weight"]
    # the layers are alike but for their scale in the output: the weights widen the gap
    assert careful["loud.weight"] - careful["quiet.weight"] > plain["loud.weight"] - plain["quiet.weight"]
