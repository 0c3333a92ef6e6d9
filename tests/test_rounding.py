"""Balanced rounding of uniform grids (Policy.rounding, codecs.uniform.balanced)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import qpack
from qpack import encoder
from qpack.cli import main as cli_main
from qpack.codecs import uniform
from qpack.errors import InputError
from qpack.policy import Policy


def grid_steps(path, name):
    with qpack.QpkReader(path) as reader:
        entry = reader.entry(name)
        lo = np.frombuffer(entry.params["min"], "<f4").astype(np.float64)
        hi = np.frombuffer(entry.params["max"], "<f4").astype(np.float64)
    return (hi - lo) / ((1 << entry.bits) - 1)


def row_sums(restored, original, rows):
    return (restored.double() - original.double()).reshape(rows, -1).sum(dim=1).abs()


@pytest.mark.parametrize("granularity", ["tensor", "channel", "group:32"])
def test_each_row_s_errors_sum_to_at_most_half_a_step(tmp_path, granularity):
    gen = torch.Generator().manual_seed(1)
    w = {"conv.weight": 0.1 * torch.randn(48, 32, 3, 3, generator=gen)}
    sums = {}
    for rounding in ("nearest", "balanced"):
        path = tmp_path / f"{rounding}.qpk"
        qpack.pack(w, path, bits=3, granularity=granularity, rounding=rounding, param_dtype="float32")
        restored = qpack.load(path)["conv.weight"]
        rows = 48 * 288 // 32 if granularity == "group:32" else 48
        step = grid_steps(path, "conv.weight")
        step = np.broadcast_to(step, (rows,)) if step.size == 1 else step
        sums[rounding] = row_sums(restored, w["conv.weight"], rows).numpy() / step
        if rounding == "balanced":
            assert np.all(sums[rounding] <= 0.5 + 1e-4)
    # nearest rounding leaves sums of several steps (a sum of 288 uniform errors: sd 4.9)
    if granularity != "group:32":
        assert sums["nearest"].max() > 3


def test_a_layer_on_relu_inputs_keeps_its_mean_output(tmp_path):
    # the reason for balancing: nonnegative inputs turn each row's summed error into a shift
    gen = torch.Generator().manual_seed(2)
    w = 0.05 * torch.randn(64, 512, generator=gen)
    x = torch.rand(512, 2000, generator=gen)  # post-ReLU-like: mean 0.5
    shift = {}
    for rounding in ("nearest", "balanced"):
        qpack.pack({"fc.weight": w}, tmp_path / "m.qpk", bits=3, rounding=rounding, force=True)
        error = (qpack.load(tmp_path / "m.qpk")["fc.weight"] - w) @ x
        shift[rounding] = float(error.mean(dim=1).pow(2).mean().sqrt())
    assert shift["balanced"] < 0.25 * shift["nearest"]


def test_values_on_a_level_never_move(tmp_path):
    # already-quantized weights (retrained on the grid) come back bit for bit
    gen = torch.Generator().manual_seed(3)
    idx = torch.randint(0, 16, (40, 300), generator=gen).to(torch.float32)
    idx[0, 0], idx[0, 1] = 0, 15
    lo, step = np.float32(-0.5), np.float32(1.0) / np.float32(15)
    w = torch.tensor(lo) + torch.tensor(step) * idx  # fl32(min + fl32(step * idx)), as the spec rebuilds
    qpack.pack({"w": w}, tmp_path / "g.qpk", bits=4, exact_values=False, rounding="balanced")
    assert torch.equal(qpack.load(tmp_path / "g.qpk")["w"], w)


def test_zeros_stay_zeros_and_nothing_moves_onto_the_zero_level(tmp_path):
    gen = torch.Generator().manual_seed(4)
    w = 0.1 * torch.randn(64, 200, generator=gen)
    w[w.abs() < 0.08] = 0  # L1-like: most weights exactly 0
    for rounding in ("nearest", "balanced"):
        qpack.pack({"w": w}, tmp_path / f"{rounding}.qpk", bits=3, exact_zero=True, rounding=rounding)
    nearest, balanced = (qpack.load(tmp_path / f"{r}.qpk")["w"] for r in ("nearest", "balanced"))
    assert torch.all(balanced[w == 0] == 0)
    assert not torch.any((balanced == 0) & (nearest != 0))  # no move lands on the exact 0
    assert not torch.equal(balanced, nearest)


def test_rows_split_across_blocks_still_balance(tmp_path, monkeypatch):
    # one grid per tensor is quantized in blocks cut anywhere: a row may start in one block
    # and end in the next, and each piece is balanced, so a row's sum stays within a step
    monkeypatch.setattr(encoder, "BLOCK_ELEMENTS", 1000)
    gen = torch.Generator().manual_seed(5)
    w = 0.1 * torch.randn(30, 333, generator=gen)
    qpack.pack({"w": w}, tmp_path / "b.qpk", bits=3, rounding="balanced")
    sums = row_sums(qpack.load(tmp_path / "b.qpk")["w"], w, 30).numpy() / grid_steps(tmp_path / "b.qpk", "w")
    assert np.all(sums <= 1 + 1e-4)


def test_balanced_runs_follow_the_offset():
    # the direct call: runs of 4 starting 2 elements before the first value
    position = torch.tensor([0.4, 0.45, 1.4, 2.45, 3.3, 0.2], dtype=torch.float32)
    idx = position.round()
    moved = uniform.balanced(idx, position, 7, 4, 2, torch.full((6,), -1.0))
    # run 1: 0.4, 0.45 (errors -0.4, -0.45: sum -0.85, one up: the 0.45); run 2: the rest
    assert moved[:2].tolist() == [0.0, 1.0]
    errors = (moved[2:] - position[2:]).sum()
    assert abs(float(errors)) <= 0.5 + 1e-6


def test_the_option_is_checked_and_reaches_the_cli(tmp_path, capsys):
    with pytest.raises(InputError, match="unknown rounding 'up'"):
        Policy(rounding="up")
    gen = torch.Generator().manual_seed(6)
    torch.save({"fc.weight": torch.randn(32, 64, generator=gen)}, tmp_path / "m.pt")
    outputs = {}
    for rounding in ("nearest", "balanced"):
        out = tmp_path / f"{rounding}.qpk"
        assert cli_main(["pack", str(tmp_path / "m.pt"), "-b", "3", "--rounding", rounding, "-o", str(out), "-q"]) == 0
        outputs[rounding] = qpack.load(out)["fc.weight"]
        assert json.loads(qpack.info(out).metadata["qpack.options"])["rounding"] == rounding
    assert not torch.equal(outputs["nearest"], outputs["balanced"])
    # balanced is the default, in the API and the CLI
    qpack.pack(torch.load(tmp_path / "m.pt"), tmp_path / "default.qpk", bits=3)
    assert torch.equal(qpack.load(tmp_path / "default.qpk")["fc.weight"], outputs["balanced"])
    assert cli_main(["pack", str(tmp_path / "m.pt"), "-b", "3", "-o", str(tmp_path / "cli.qpk"), "-q"]) == 0
    assert torch.equal(qpack.load(tmp_path / "cli.qpk")["fc.weight"], outputs["balanced"])
    with pytest.raises(SystemExit) as stop:
        cli_main(["pack", str(tmp_path / "m.pt"), "--rounding", "up"])
    assert stop.value.code == 2


def test_wide_grids_and_1d_tensors_round_to_nearest(tmp_path):
    # above BALANCED_MAX_BITS the shift is negligible: the default 8-bit file is unchanged
    gen = torch.Generator().manual_seed(7)
    state = {"fc.weight": torch.randn(64, 300, generator=gen), "fc.bias": torch.randn(300, generator=gen)}
    for bits in (uniform.BALANCED_MAX_BITS + 1, 8):
        for rounding in ("nearest", "balanced"):
            qpack.pack(state, tmp_path / f"{rounding}.qpk", bits=bits, bias_bits=bits, rounding=rounding, force=True)
        nearest, balanced = (qpack.load(tmp_path / f"{r}.qpk") for r in ("nearest", "balanced"))
        assert all(torch.equal(nearest[k], balanced[k]) for k in state)
    qpack.pack(state, tmp_path / "n.qpk", bits=4, bias_bits=4, rounding="nearest")
    qpack.pack(state, tmp_path / "b.qpk", bits=4, bias_bits=4, rounding="balanced")
    nearest, balanced = qpack.load(tmp_path / "n.qpk"), qpack.load(tmp_path / "b.qpk")
    assert torch.equal(nearest["fc.bias"], balanced["fc.bias"])
    assert not torch.equal(nearest["fc.weight"], balanced["fc.weight"])


def test_a_block_inside_a_long_run_is_balanced_piece_by_piece():
    gen = torch.Generator().manual_seed(8)
    position = torch.rand(1000, generator=gen) * 7
    idx = position.round()
    none = torch.full((1000,), -1.0)
    # runs of 5000 elements, the block starting 4600 into one: pieces of 400 and 600
    moved = uniform.balanced(idx, position, 7, 5000, 4600, none)
    for piece in (slice(0, 400), slice(400, 1000)):
        assert abs(float((moved[piece] - position[piece]).sum())) <= 0.5 + 1e-4
    assert not torch.equal(moved, idx) and float((moved - idx).abs().max()) == 1.0


def test_values_rounded_to_an_exact_zero_neither_count_nor_move():
    # an L1-trained layer's near-zero bulk, snapped to a 0 level, is pruned, not rounded:
    # its errors would otherwise be "corrected" by moving the few large weights of the row
    position = torch.tensor([3.2, 3.2, 3.2, 3.2, 1.45, 1.45, 5.4, 0.6], dtype=torch.float32)
    idx = position.round()
    zero = torch.full((8,), 3.0)  # level 3 is an exact 0
    moved = uniform.balanced(idx, position, 7, 8, 0, zero)
    assert moved[:4].tolist() == [3.0] * 4  # on the 0 level: stay there
    # the rest: errors -0.45, -0.45, -0.4, +0.4 sum to -0.9: one moves up, the furthest (a 1.45)
    assert sorted(moved[4:6].tolist()) == [1.0, 2.0] and moved[6:].tolist() == [5.0, 1.0]
    # with no 0 level, the four 3.2s' errors (-0.8 in all) count too: the sum is -1.7, two move
    counted = uniform.balanced(idx, position, 7, 8, 0, torch.full((8,), -1.0))
    assert int((counted != idx).sum()) == 2


@pytest.mark.parametrize("segment, offset, top, zero_level", [(2048, 0, 15, None), (300, 120, 7, 3.0),
                                                            (5000, 4600, 3, None), (33, 0, 3, 1.0)])
def test_the_compiled_loop_moves_what_the_torch_code_moves(segment, offset, top, zero_level):
    # tensors of MIN_ELEMENTS or more run compiled; the torch code is the reference. Random
    # levels with errors all different (equal ones at a run's cut may go either way there),
    # a seventh of the values exactly on their level, and a 0 level.
    pytest.importorskip("numba")
    from qpack.codecs.lookup import MIN_ELEMENTS

    gen = torch.Generator().manual_seed(segment)
    numel = MIN_ELEMENTS * 5 + 17
    idx = torch.randint(0, top + 1, (numel,), generator=gen).to(torch.float32)
    error = (torch.randperm(numel, generator=gen) + 1).to(torch.float64) / (numel + 2) - 0.5
    error[: numel // 7] = 0.0
    position = (idx.to(torch.float64) - error).to(torch.float32)
    zero = torch.full((numel,), -1.0 if zero_level is None else zero_level)
    before = idx.clone()
    compiled = uniform.balanced(idx, position, top, segment, offset, zero)
    reference = uniform.balanced_reference(idx, position, top, segment, offset, zero)
    assert torch.equal(compiled, reference)
    assert not torch.equal(compiled, idx)
    assert torch.equal(idx, before)  # the input is left as it was


def test_the_compiled_loop_breaks_ties_by_index():
    # equal errors at the cut: of four candidates at +0.4 error, the two with the lowest
    # index move (the torch code's topk may pick any two)
    pytest.importorskip("numba")
    from qpack.codecs.lookup import MIN_ELEMENTS

    runs = MIN_ELEMENTS // 4
    row = torch.tensor([1.6, 1.6, 1.6, 1.6], dtype=torch.float32)  # errors +0.4 x 4: sum 1.6, two move
    position = row.repeat(runs)
    idx = position.round()
    moved = uniform.balanced(idx, position, 7, 4, 0, torch.full((position.numel(),), -1.0)).reshape(runs, 4)
    assert torch.equal(moved, torch.tensor([1.0, 1.0, 2.0, 2.0]).expand(runs, 4))
