"""--target-bpw: bits per tensor chosen to meet a size target with the least error."""

import json

import pytest
import torch

import qpack


def state_dict():
    gen = torch.Generator().manual_seed(3)
    laplace = torch.distributions.Laplace(0.0, 0.05)
    torch.manual_seed(3)
    return {"big.weight": laplace.sample((256, 300)), "mid.weight": torch.randn(64, 200, generator=gen) * 0.1,
            "small.weight": torch.randn(16, 40, generator=gen), "small.bias": torch.randn(16, generator=gen)}


def weighted_error(report):
    return sum((r.rel_rms or 0) ** 2 * (r.original_bytes // 4) for r in report.tensors if r.encoding != "raw")


def bits_per_weight(report, state):
    return report.file_bytes * 8 / sum(t.numel() for t in state.values())


@pytest.mark.parametrize("target", [1.5, 2.5, 4.0])
def test_meets_the_target_and_beats_one_width_for_all(tmp_path, target):
    state = state_dict()
    chosen = qpack.pack(state, tmp_path / "t.qpk", target_bpw=target)
    assert bits_per_weight(chosen, state) <= target
    rows = {r.name: r for r in chosen.tensors}
    assert "--target-bpw chose" in rows["big.weight"].reason
    # no single width for every tensor that fits the same budget (with the small margin the
    # allocator keeps for the header it cannot see yet) has less total error
    for bits in range(1, 9):
        same = qpack.pack(state, tmp_path / f"b{bits}.qpk", bits=bits, force=True)
        if bits_per_weight(same, state) <= target - 0.05:
            assert weighted_error(chosen) <= weighted_error(same) * 1.0001


def test_info_shows_the_choice(tmp_path):
    state = state_dict()
    qpack.pack(state, tmp_path / "t.qpk", target_bpw=2.5, method="kmeans")
    described = qpack.info(tmp_path / "t.qpk")
    widths = {t.name: t.bits for t in described.tensors if t.encoding != "raw"}
    options = json.loads(described.metadata["qpack.options"])
    assert widths and options["target_bpw_bits"] == widths


def test_sensitivity_buys_bits(tmp_path):
    state = state_dict()
    plain = qpack.pack(state, tmp_path / "a.qpk", target_bpw=2.0)
    careful = qpack.pack(state, tmp_path / "b.qpk", target_bpw=2.0, sensitivity={"mid.weight": 1000.0})
    bits = lambda report, name: next(r.bits for r in report.tensors if r.name == name)  # noqa: E731
    assert bits(careful, "mid.weight") >= bits(plain, "mid.weight")
    assert bits(careful, "mid.weight") >= 6


def test_impossible_target_is_a_clear_error(tmp_path):
    with pytest.raises(qpack.InputError, match="target-bpw"):
        qpack.pack(state_dict(), tmp_path / "t.qpk", target_bpw=0.05)
    assert not (tmp_path / "t.qpk").exists()
    for bad in [0, -1, "x"]:
        with pytest.raises(qpack.InputError):
            qpack.pack(state_dict(), tmp_path / "t.qpk", target_bpw=bad)
