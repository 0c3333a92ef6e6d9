"""--target-bpw and --max-error: bits per tensor chosen for the least error within a size, or
the smallest file within an error bound."""

import itertools
import json
import math

import numpy as np
import pytest
import torch
from conftest import run_qpack as run

import qpack
from qpack.allocate import _COST, _SIZE, CANDIDATE_BITS, _allocate, _Trial
from qpack.policy import DEFAULT_MIN_SNR_DB as FLOOR


def state_dict():
    gen = torch.Generator().manual_seed(3)
    laplace = torch.distributions.Laplace(0.0, 0.05)
    torch.manual_seed(3)
    return {"big.weight": laplace.sample((256, 300)), "mid.weight": torch.randn(64, 200, generator=gen) * 0.1,
            "small.weight": torch.randn(16, 40, generator=gen), "small.bias": torch.randn(16, generator=gen)}


def default_weights(count):
    """The default objective's weight of each of ``count`` quantized tensors, in file order:
    the edges weigh most, the second (of four or more) twice a middle layer."""
    from qpack.allocate import EDGE_WEIGHT, SECOND_WEIGHT

    weights = [1.0] * count
    if count >= 4:
        weights[1] = SECOND_WEIGHT
    if count:
        weights[0] = weights[-1] = EDGE_WEIGHT
    return weights


def test_default_weights_fall_from_the_input():
    from qpack.allocate import layer_weights

    assert list(layer_weights({"a": (9,), "b": (90,), "c": (900,), "d": (10,)}).values()) == [4.0, 2.0, 1.0, 4.0]
    assert list(layer_weights({"a": (9,), "b": (90,), "c": (10,)}).values()) == [4.0, 1.0, 4.0]  # no second among 3
    assert list(layer_weights({"a": (9,)}).values()) == [4.0]
    assert layer_weights({"a": 9, "b": 90, "c": 900, "d": 10}) == layer_weights({"a": (9,), "b": (90,), "c": (900,),
                                                                                "d": (10,)})  # counts, as before


def test_the_conv_before_global_pooling_weighs_less_and_may_go_lower():
    """The last conv feeding a pooled head (its channels are the next layer's inputs) gets
    POOLED_WEIGHT and a floor POOLED_FLOOR_RELIEF lower; a flattened head, a 5x5 kernel (LeNet's
    c5, one position) or measured sensitivity leave every layer as it was."""
    from qpack.allocate import POOLED_FLOOR_RELIEF, POOLED_WEIGHT, layer_weights, plan, pooled_conv
    from qpack.policy import Policy

    pooled = {"stem": (16, 1, 3, 3), "b1": (32, 16, 3, 3), "b2": (32, 32, 3, 3), "last": (48, 32, 3, 3),
              "fc": (10, 48)}
    assert pooled_conv(pooled) == "last"
    assert list(layer_weights(pooled).values()) == [4.0, 2.0, 1.0, POOLED_WEIGHT, 4.0]
    assert pooled_conv({**pooled, "fc": (10, 48 * 49)}) is None  # flattened: channels x positions
    assert pooled_conv({**pooled, "last": (48, 32, 5, 5)}) is None  # a kernel over the whole map
    assert pooled_conv({"stem": (48, 1, 3, 3), "fc": (10, 48)}) is None  # first and edge already
    block = {"stem": (16, 1, 3, 3), "conv1": (32, 16, 3, 3), "conv2": (32, 32, 3, 3), "shortcut": (32, 16, 1, 1),
             "fc": (10, 32)}
    assert pooled_conv(block) is None  # a downsampling block's 1x1 shortcut comes last
    separable = {"stem": (16, 1, 3, 3), "dw": (64, 1, 3, 3), "pw": (128, 64, 1, 1), "fc": (10, 128)}
    assert pooled_conv(separable) == "pw"  # a MobileNet's last pointwise conv
    assert list(layer_weights(pooled, {"last": 1.0}).values())[3] == 32 * 9 * 48
    gen = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in pooled.items()}
    chosen = plan(tensors, Policy(min_numel=64), target_bpw=4.0)
    assert chosen.tensor_floors == {"last": FLOOR - POOLED_FLOOR_RELIEF}
    assert chosen.summary()["tensor_floors"] == {"last": FLOOR - POOLED_FLOOR_RELIEF}
    assert plan(tensors, Policy(min_numel=64), target_bpw=4.0, sensitivity=dict.fromkeys(pooled, 1.0)).tensor_floors == {}


def test_info_counts_the_pooled_convs_own_floor(tmp_path):
    """A pooled conv between its own floor and the policy's is not listed below the floor."""
    from qpack.allocate import POOLED_FLOOR_RELIEF

    gen = torch.Generator().manual_seed(1)
    shapes = {"stem": (16, 1, 3, 3), "b1": (32, 16, 3, 3), "last": (96, 32, 3, 3), "fc": (10, 96)}
    tensors = {name: torch.randn(shape, generator=gen) for name, shape in shapes.items()}
    path = tmp_path / "pooled.qpk"
    report = qpack.pack(tensors, path, target_bpw=2.8, min_numel=64)
    snr = {row.name: row.snr_db for row in report.tensors}
    assert FLOOR - POOLED_FLOOR_RELIEF <= snr["last"] < FLOOR  # the tight budget takes the relief
    allocation = qpack.info(path).allocation
    assert allocation["tensor_floors"] == {"last": FLOOR - POOLED_FLOOR_RELIEF}
    assert allocation["below_floor"] == []
    assert min(snr[name] for name in ("stem", "b1", "fc")) >= FLOOR


def weighted_error(report):
    """The default objective: rel^2 summed per layer, the first and last quantized tensors weighted more."""
    rows = [r for r in report.tensors if r.encoding != "raw"]
    weights = default_weights(len(rows))
    return sum(w * (r.rel_rms or 0) ** 2 for w, r in zip(weights, rows))


def options_bytes(path):
    return len(qpack.info(path).metadata["qpack.options"])


def fits_beside(same, chosen, target, state):
    """A fixed setting's file fits the target even with the allocated file's longer options record."""
    extra = options_bytes(chosen.path) - options_bytes(same.path)
    return (same.file_bytes + extra) * 8 / sum(t.numel() for t in state.values()) <= target


def bits_per_weight(report, state):
    return report.file_bytes * 8 / sum(t.numel() for t in state.values())


@pytest.mark.parametrize("target", [1.5, 2.5, 4.0])
def test_meets_the_target_and_beats_one_width_for_all(tmp_path, target):
    state = state_dict()
    chosen = qpack.pack(state, tmp_path / "t.qpk", target_bpw=target, allow_below_floor=True)
    assert bits_per_weight(chosen, state) <= target
    rows = {r.name: r for r in chosen.tensors}
    assert f"--target-bpw {target} chose" in rows["big.weight"].reason
    # no single width for every tensor that fits the same budget (the header counted
    # exactly: only the allocated file's longer options record is a margin) has less error
    compared = 0
    for bits in range(1, 9):
        same = qpack.pack(state, tmp_path / f"b{bits}.qpk", bits=bits, force=True)
        if fits_beside(same, chosen, target, state):
            compared += 1
            assert weighted_error(chosen) <= weighted_error(same) * 1.0001
    assert compared


def test_info_shows_the_choice(tmp_path):
    state = state_dict()
    packed = qpack.pack(state, tmp_path / "t.qpk", target_bpw=4.0, method="kmeans")
    described = qpack.info(tmp_path / "t.qpk")
    widths = {t.name: t.bits for t in described.tensors if t.encoding != "raw"}
    assert widths == {t.name: t.bits for t in packed.tensors if t.encoding != "raw"}
    assert len(set(widths.values())) > 1
    options = json.loads(described.metadata["qpack.options"])
    assert options["target_bpw"] == 4.0 and "allocated_bits" not in options  # the entries hold the choice
    summary = described.allocation
    assert summary == packed.allocation and summary["min_snr_db"] == FLOOR and summary["objective"] == "per-layer"
    assert summary["lowest_snr_db"] >= FLOOR and summary["below_floor"] == []
    assert summary["predicted_error"] == pytest.approx(
        math.sqrt(weighted_error(described) / (2 * 4.0 + 1)), rel=1e-3)  # three tensors, two at the edges


def test_sensitivity_buys_bits(tmp_path):
    state = state_dict()
    plain = qpack.pack(state, tmp_path / "a.qpk", target_bpw=2.0, allow_below_floor=True)
    careful = qpack.pack(state, tmp_path / "b.qpk", target_bpw=2.0, sensitivity={"mid.weight": 1000.0},
                         allow_below_floor=True)
    bits = lambda report, name: next(r.bits for r in report.tensors if r.name == name)  # noqa: E731
    assert bits(careful, "mid.weight") >= bits(plain, "mid.weight")
    assert bits(careful, "mid.weight") >= 6


def test_impossible_target_is_a_clear_error(tmp_path):
    with pytest.raises(qpack.InputError, match="target-bpw"):
        qpack.pack(state_dict(), tmp_path / "t.qpk", target_bpw=0.05, allow_below_floor=True)
    assert not (tmp_path / "t.qpk").exists()
    for bad in [0, -1, "x"]:
        with pytest.raises(qpack.InputError):
            qpack.pack(state_dict(), tmp_path / "t.qpk", target_bpw=bad)


# -- --max-error: the smallest file within an error bound ---------------------------------------

def overall_error(report, sensitivity=None):
    """The predicted error from the rows' rel_rms: per layer (edges weighted more) by default,
    sqrt(sum s n rel^2 / sum s n) with a sensitivity."""
    rows = [r for r in report.tensors if r.encoding != "raw"]
    if sensitivity is None:
        weights = default_weights(len(rows))
    else:
        weights = [sensitivity.get(r.name, 1.0) * math.prod(r.shape) for r in rows]
    return math.sqrt(sum(w * r.rel_rms ** 2 for w, r in zip(weights, rows)) / sum(weights))


def payload_bytes(report):
    return sum(r.stored_bytes for r in report.tensors)


@pytest.mark.parametrize("bound", [0.025, 0.1, 0.15, 0.4])
def test_max_error_meets_the_bound_and_beats_one_width_for_all(tmp_path, bound):
    state = state_dict()
    chosen = qpack.pack(state, tmp_path / "e.qpk", max_error=bound, allow_below_floor=True)
    assert overall_error(qpack.info(tmp_path / "e.qpk")) <= bound * (1 + 1e-9)  # the file's own stats
    assert f"--max-error {bound} chose" in next(r.reason for r in chosen.tensors if r.name == "big.weight")
    met = 0
    for bits in CANDIDATE_BITS:  # the widths the allocator may use
        same = qpack.pack(state, tmp_path / f"b{bits}.qpk", bits=bits, force=True)
        if overall_error(same) <= bound:
            met += 1
            # payloads, not files: the allocated file's options record is longer
            assert payload_bytes(chosen) <= payload_bytes(same), bits
    assert met  # each bound is met by some single width, so the comparison above ran


def test_max_error_with_sensitivity_weighs_the_bound(tmp_path):
    state = state_dict()
    weights = {"mid.weight": 50.0}
    plain = qpack.pack(state, tmp_path / "a.qpk", max_error=0.1)
    careful = qpack.pack(state, tmp_path / "b.qpk", max_error=0.1, sensitivity=weights)
    assert overall_error(careful, weights) <= 0.1 * (1 + 1e-9)
    # the heavy tensor is kept more precise (more bits, or a tighter grid at the same width)
    error = {r.name: r.rel_rms for r in careful.tensors}
    assert error["mid.weight"] < 0.9 * next(r.rel_rms for r in plain.tensors if r.name == "mid.weight")
    options = json.loads(qpack.info(tmp_path / "b.qpk").metadata["qpack.options"])
    assert options["max_error"] == 0.1 and options["target_bpw"] is None
    assert options["allocation"]["objective"] == "sensitivity"
    assert qpack.info(tmp_path / "b.qpk").allocation["predicted_error"] == pytest.approx(
        overall_error(careful, weights), rel=1e-3)


def test_max_error_bad_values_and_impossible_bound(tmp_path):
    with pytest.raises(qpack.InputError, match=r"cannot be met.*gives an error of 0\.0\d+"):
        qpack.pack(state_dict(), tmp_path / "e.qpk", max_error=1e-4)
    for bad in [0, -0.1, float("nan"), float("inf"), "0.1", True]:
        with pytest.raises(qpack.InputError, match="max error must be a positive finite number"):
            qpack.pack(state_dict(), tmp_path / "e.qpk", max_error=bad)
    with pytest.raises(qpack.InputError, match="exactly one"):
        qpack.pack(state_dict(), tmp_path / "e.qpk", max_error=0.1, target_bpw=3.0)
    with pytest.raises(qpack.InputError, match="lacks.*'module.mid.weight'"):
        qpack.pack(state_dict(), tmp_path / "e.qpk", max_error=0.1, sensitivity={"module.mid.weight": 2.0})
    with pytest.raises(qpack.InputError, match="target_bpw or max_error"):
        qpack.pack(state_dict(), tmp_path / "e.qpk", sensitivity={"mid.weight": 2.0})
    assert not (tmp_path / "e.qpk").exists()


def test_max_error_on_the_command_line(tmp_path):
    torch.save(state_dict(), tmp_path / "model.pt")
    run("pack", "model.pt", "--max-error", "0.1", "-o", "e.qpk", cwd=tmp_path)
    doc = json.loads(run("info", "e.qpk", "--json", cwd=tmp_path).stdout)
    rows = [r for r in doc["tensors"] if r["encoding"] != "raw"]
    assert len({r["bits"] for r in rows}) > 1  # a choice per tensor, not one width
    options = json.loads(doc["metadata"]["qpack.options"])
    assert options["max_error"] == 0.1 and doc["allocation"]["max_error"] == 0.1
    assert doc["allocation"]["predicted_error"] <= 0.1 and doc["allocation"]["min_snr_db"] == FLOOR
    assert doc["allocation"]["lowest_snr_db"] >= FLOOR
    weights = [4.0 if i in (0, len(rows) - 1) else 1.0 for i in range(len(rows))]
    assert math.sqrt(sum(w * r["rel_rms"] ** 2 for w, r in zip(weights, rows)) / sum(weights)) <= 0.1
    assert "allocation: --max-error 0.1, per-layer objective" in run("info", "e.qpk", cwd=tmp_path).stdout


# -- the allocator against an exhaustive search -------------------------------------------------

def random_trials(rng, tensors):
    """Trial tables shaped like real ones: bytes grow about linearly with bits, error falls 4x a bit."""
    trials = {}
    for i in range(tensors):
        numel, spread = 10 ** rng.uniform(2, 5.5), rng.uniform(0.8, 1.2, len(CANDIDATE_BITS))
        trials[f"t{i}"] = [_Trial(b, "tensor", int(numel * b / 8 * s) + 100, numel * 4.0 ** -b * rng.uniform(0.3, 3))
                           for b, s in zip(CANDIDATE_BITS, spread)]
    return trials


@pytest.mark.parametrize("minimise, limited", [(_SIZE, _COST), (_COST, _SIZE)], ids=["max-error", "target-bpw"])
def test_allocation_is_near_the_exhaustive_optimum(minimise, limited):
    rng = np.random.default_rng(7)
    optimal, worst = 0, 0.0
    for _ in range(60):
        trials = random_trials(rng, int(rng.integers(2, 5)))
        table = np.array([[(t.bits, 0, t.size, t.cost) for t in row] for row in trials.values()],
                         dtype=np.float64)  # tensors x widths x (bits, granularity, size, cost)
        every = np.array(list(itertools.product(range(len(CANDIDATE_BITS)), repeat=len(trials))))
        rows = np.arange(len(trials))
        least, most = table[..., limited].min(axis=1).sum(), table[..., limited].max(axis=1).sum()
        limit = least + (most - least) * rng.uniform(0, 0.3) ** 2
        fits = table[rows, every, limited].sum(axis=1) <= limit
        best = table[rows, every[fits], minimise].sum(axis=1).min()
        choice = _allocate(trials, minimise, limited, limit)
        picked = [trials[name][column] for name, column in choice.items()]
        assert sum(t[limited] for t in picked) <= limit
        found = sum(t[minimise] for t in picked)
        optimal += found <= best * (1 + 1e-12)
        worst = max(worst, found / best)
    assert optimal >= 50 and worst < 1.1, (optimal, worst)


# -- granularity: per-channel parameters where they pay for their size ---------------------------

def granular_state():
    """One tensor whose rows have ranges far apart (per-row grids pay), one whose rows are
    permutations of one row (identical ranges: per-row grids only cost).

    The rows differ in their centres, not only in scale: for rows that differ only in scale,
    one grid for the tensor is usually as good or better (at the same size), because the
    entropy coding of its indices spends few bits on the narrow rows.
    """
    gen = torch.Generator().manual_seed(5)
    centres = torch.linspace(-4, 4, 64)[torch.randperm(64, generator=gen), None]
    shifted = torch.randn(64, 512, generator=gen) + centres
    row = torch.randn(512, generator=gen)
    even = row[torch.argsort(torch.rand(64, 512, generator=gen), dim=1)]
    return {"shifted.weight": shifted, "even.weight": even}


def granularities(report):
    return {r.name: r.granularity for r in report.tensors if r.encoding != "raw"}


@pytest.mark.parametrize("target", [3.0, 4.0])
def test_channel_where_it_pays_and_never_worse_than_one_choice_for_all(tmp_path, target):
    state = granular_state()
    chosen = qpack.pack(state, tmp_path / "t.qpk", target_bpw=target, allow_below_floor=True)
    assert granularities(chosen) == {"shifted.weight": "channel", "even.weight": "tensor"}
    assert "chose" in chosen.tensors[0].reason and "channel granularity" in chosen.tensors[0].reason
    per_tensor = qpack.pack(state, tmp_path / "p.qpk", target_bpw=target, allocate_granularity="tensor",
                            allow_below_floor=True)
    assert set(granularities(per_tensor).values()) == {"tensor"}
    assert bits_per_weight(chosen, state) <= target and bits_per_weight(per_tensor, state) <= target
    assert weighted_error(chosen) < weighted_error(per_tensor) * 0.95
    compared = 0
    for bits, granularity in itertools.product(CANDIDATE_BITS, ("tensor", "channel")):
        same = qpack.pack(state, tmp_path / "s.qpk", bits=bits, granularity=granularity, force=True)
        if fits_beside(same, chosen, target, state):
            compared += 1
            assert weighted_error(chosen) <= weighted_error(same) * 1.0001, (bits, granularity)
    assert compared >= 4


def test_granularity_round_trips_through_the_command_line(tmp_path):
    torch.save(granular_state(), tmp_path / "model.pt")
    run("pack", "model.pt", "--target-bpw", "3", "--allocate-granularity", "tensor, channel,group:64",
        "--allow-below-floor", "-o", "t.qpk", cwd=tmp_path)
    doc = json.loads(run("info", "t.qpk", "--json", cwd=tmp_path).stdout)
    options = json.loads(doc["metadata"]["qpack.options"])
    assert options["allocate_granularity"] == ["tensor", "channel", "group:64"]
    allocated = {r["name"]: r["granularity"] for r in doc["tensors"]}
    assert allocated["even.weight"] == "tensor" and allocated["shifted.weight"] != "tensor"
    assert "uniform/channel" in run("info", "t.qpk", cwd=tmp_path).stdout or allocated["shifted.weight"] != "channel"
    # each tensor decodes with its own granularity: the loaded error is the one its header states
    loaded, original = qpack.load(tmp_path / "t.qpk"), granular_state()
    for row in doc["tensors"]:
        x, y = original[row["name"]], loaded[row["name"]]
        assert float((y - x).norm() / x.norm()) == pytest.approx(row["rel_rms"], rel=1e-3)


def test_default_candidates():
    from qpack.allocate import candidate_granularities
    from qpack.policy import Policy

    assert candidate_granularities(Policy()) == ("tensor", "channel")
    assert candidate_granularities(Policy(granularity="group:64")) == ("group:64", "channel", "tensor")
    # per-row codebooks are slow to fit: tried for k-means only when asked
    assert candidate_granularities(Policy(method="kmeans")) == ("tensor",)
    assert candidate_granularities(Policy(method="kmeans", granularity="channel")) == ("channel", "tensor")
    assert candidate_granularities(Policy(), " channel,,group:32 ") == ("channel", "group:32")


@pytest.mark.parametrize("args, message", [
    (["--target-bpw", "3", "--allocate-granularity", "channel,rows"], "unknown granularity 'rows'"),
    (["--target-bpw", "3", "--allocate-granularity", "group:8"], "unknown granularity 'group:8'"),
    (["--max-error", "0.1", "--allocate-granularity", ""], "at least one"),
    (["--allocate-granularity", "channel"], "target_bpw or max_error"),
])
def test_bad_allocate_granularity_is_a_one_line_usage_error(tmp_path, capsys, args, message):
    from qpack import cli

    torch.save(granular_state(), tmp_path / "model.pt")
    code = cli.main(["pack", str(tmp_path / "model.pt"), "-o", str(tmp_path / "t.qpk"), *args])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "t.qpk").exists()


# -- the objective, the quality floor and the budget ----------------------------------------------

def lenet_like():
    """A small first layer (150 weights) and a small last one (840) around a big middle, like LeNet-5."""
    gen = torch.Generator().manual_seed(11)
    torch.manual_seed(11)
    heavy_tailed = torch.distributions.Laplace(0.0, 0.05).sample((120, 400))  # its bits cost the most
    return {"c1.weight": torch.randn(6, 1, 5, 5, generator=gen) * 0.3, "c1.bias": torch.zeros(6),
            "c5.weight": heavy_tailed,
            "f6.weight": torch.randn(84, 120, generator=gen) * 0.1,
            "out.weight": torch.randn(10, 84, generator=gen) * 0.2}


def test_small_input_and_output_layers_are_not_sacrificed(tmp_path):
    # summing numel * rel^2 gave such layers 2 bits at rel 0.4-0.6 (a broken model): per layer,
    # their bits are cheap, so they end up at least as accurate as the big layer
    state = lenet_like()
    report = qpack.pack(state, tmp_path / "t.qpk", target_bpw=3.5)  # the old objective: c1 3 bits, rel 0.22
    rel = {r.name: r.rel_rms for r in report.tensors if r.encoding != "raw"}
    assert bits_per_weight(report, state) <= 3.5
    assert max(rel["c1.weight"], rel["out.weight"]) < rel["c5.weight"] / 2, rel
    assert min(r.snr_db for r in report.tensors if r.encoding != "raw") >= FLOOR


def budget_note(report):
    """(budget, fixed, left, used) bytes from the note ``pack`` writes for an allocation."""
    import re

    note = next(n for n in report.notes if n.startswith("budget:"))
    return tuple(int(x.replace(",", "")) for x in re.findall(r"[\d,]{2,}", note))


def test_the_plan_is_the_file(tmp_path):
    """The budget counts the header, alignment and lossless tensors as the writer writes them:
    what the allocation planned (fixed bytes + the quantized tensors') is the file's size."""
    state = lenet_like()
    elements = sum(t.numel() for t in state.values())
    for target in (4.0, 5.5):
        report = qpack.pack(state, tmp_path / "t.qpk", target_bpw=target, force=True)
        budget, fixed, left, used = budget_note(report)
        assert budget == int(target * elements / 8) and left == budget - fixed
        assert fixed + used == report.file_bytes <= budget


def test_a_target_met_only_below_the_floor_is_refused(tmp_path, capsys):
    from qpack import cli

    state = lenet_like()
    torch.save(state, tmp_path / "model.pt")
    with pytest.raises(qpack.InputError, match=rf"below the quality floor of {FLOOR:g} dB SNR; the smallest target "
                                               r"that keeps every one above it is (\d+\.\d\d) bits per weight"):
        qpack.pack(state, tmp_path / "t.qpk", target_bpw=1.5)
    assert not (tmp_path / "t.qpk").exists()
    code = cli.main(["pack", str(tmp_path / "model.pt"), "-o", str(tmp_path / "t.qpk"), "--target-bpw", "1.5"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and not (tmp_path / "t.qpk").exists(), err
    feasible = float(err.split("above it is ")[1].split()[0])
    assert 1.5 < feasible < 8
    # the target it names is met, above the floor
    report = qpack.pack(state, tmp_path / "t.qpk", target_bpw=feasible)
    assert bits_per_weight(report, state) <= feasible
    assert min(r.snr_db for r in report.tensors if r.encoding != "raw") >= FLOOR
    # an explicit flag goes below it (and says so); a lower floor moves the limit
    below = qpack.pack(state, tmp_path / "b.qpk", target_bpw=1.5, allow_below_floor=True)
    assert below.allocation["below_floor"] and any(n.startswith("below the quality floor") for n in below.notes)
    assert cli.main(["pack", str(tmp_path / "model.pt"), "-o", str(tmp_path / "c.qpk"), "--target-bpw",
                     str(feasible - 0.3), "--min-snr", "5", "-q"]) == 0
    assert qpack.info(tmp_path / "c.qpk").allocation["min_snr_db"] == 5.0
    with pytest.raises(qpack.InputError, match="min_snr_db"):
        qpack.pack(state, tmp_path / "d.qpk", target_bpw=4.0, min_snr_db=float("nan"))
    with pytest.raises(qpack.InputError, match="unknown packing option 'min_snr'"):
        qpack.pack(state, tmp_path / "d.qpk", target_bpw=4.0, min_snr=3)


def test_sensitivity_file_from_the_api_to_the_command_line(tmp_path, capsys):
    from qpack import cli
    from qpack.sensitivity import load_sensitivity

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(20, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    batches = [(torch.randn(16, 20), torch.randint(0, 4, (16,))) for _ in range(3)]
    weights = qpack.measure_sensitivity(model, batches, torch.nn.functional.cross_entropy,
                                        path=tmp_path / "s.json")
    assert load_sensitivity(tmp_path / "s.json") == pytest.approx(weights)
    torch.save(model.state_dict(), tmp_path / "model.pt")
    code = cli.main(["pack", str(tmp_path / "model.pt"), "-o", str(tmp_path / "t.qpk"), "--max-error", "0.05",
                     "--sensitivity", str(tmp_path / "s.json"), "--min-numel", "1", "-q"])
    assert code == 0, capsys.readouterr().err
    assert qpack.info(tmp_path / "t.qpk").allocation["objective"] == "sensitivity"
    bad = {"missing.json": None, "text.json": "not json", "list.json": "[1, 2]",
           "kind.json": '{"kind": "other", "version": 1, "weights": {}}',
           "negative.json": '{"kind": "qpack.sensitivity", "version": 1, "weights": {"0.weight": -1}}',
           "version.json": '{"kind": "qpack.sensitivity", "version": 9, "weights": {"0.weight": 1}}',
           "unknown.json": '{"kind": "qpack.sensitivity", "version": 1, "weights": {"module.0.weight": 1}}'}
    for name, text in bad.items():
        if text is not None:
            (tmp_path / name).write_text(text)
        code = cli.main(["pack", str(tmp_path / "model.pt"), "-o", str(tmp_path / "u.qpk"), "--target-bpw", "6",
                         "--sensitivity", str(tmp_path / name)])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, (name, err)
        assert not (tmp_path / "u.qpk").exists()


# -- the packer on extreme values and edge inputs (issue 13, item 4) -------------------------------

def test_target_bpw_on_huge_values_returns_with_honest_errors(tmp_path):
    gen = torch.Generator().manual_seed(1)
    w = (torch.rand(95, 63, generator=gen) * 2 - 1) * 1e20  # squares overflow float32
    report = qpack.pack({"w": w}, tmp_path / "t.qpk", target_bpw=5.0)
    row = report.tensors[0]
    loaded = qpack.load(tmp_path / "t.qpk")["w"]
    measured = float((loaded.double() - w.double()).norm() / w.double().norm())
    assert row.rel_rms == pytest.approx(measured, rel=1e-3) and row.rel_rms < 0.2
    assert bits_per_weight(report, {"w": w}) <= 5.0


def test_exact_zero_grid_past_float16_range_is_stored_losslessly(tmp_path):
    w = torch.tensor([-39008, -31008, 32992, -28992, -2000, 63008], dtype=torch.float16)
    report = qpack.pack({"w": w}, tmp_path / "t.qpk", bits=2, exact_zero=True, min_numel=1, bias_bits=2)
    assert report.tensors[0].encoding == "raw" and "overflows float16" in report.tensors[0].reason
    assert torch.equal(qpack.load(tmp_path / "t.qpk")["w"], w)
    from qpack.encoder import snr_db

    assert snr_db(1.0, math.inf) == -math.inf and snr_db(1e-300, 1e300) < -1000  # no math domain error


@pytest.mark.parametrize("limit", [{"target_bpw": 4.0}, {"max_error": 0.1}])
def test_nothing_to_quantize_is_a_clear_error(tmp_path, capsys, limit):
    from qpack import cli

    with pytest.raises(qpack.InputError, match="no tensor here can be quantized"):
        qpack.pack({"steps": torch.arange(10)}, tmp_path / "t.qpk", **limit)
    torch.save({"steps": torch.arange(10)}, tmp_path / "model.pt")
    option = "--target-bpw" if "target_bpw" in limit else "--max-error"
    code = cli.main(["pack", str(tmp_path / "model.pt"), "-o", str(tmp_path / "t.qpk"), option,
                     str(next(iter(limit.values())))])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no tensor here can be quantized" in err
    assert not (tmp_path / "t.qpk").exists()


# -- the default -b 8: a channel much weaker than its tensor gets its own grid (issue 11, item 5) --

def weak_channel_conv():
    """A trained-ResNet-like conv: weight decay has shrunk some filters 30x (BatchNorm after
    the conv scales their outputs back up), the rest are alike."""
    gen = torch.Generator().manual_seed(2)
    scale = torch.ones(32)
    scale[::8] = 1 / 30
    return torch.randn(32, 16, 3, 3, generator=gen) * 0.1 * scale[:, None, None, None]


def after_batchnorm(weight, rebuilt):
    """Per output channel, the relative error of conv + BatchNorm (each channel normalised to
    unit variance over a batch, as BatchNorm's running statistics do)."""
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(64, weight.shape[1], 8, 8, generator=gen)
    y, z = (torch.nn.functional.conv2d(x, w) for w in (weight, rebuilt))
    std = y.std(dim=(0, 2, 3), keepdim=True)
    return ((z - y) / std).pow(2).mean(dim=(0, 2, 3)).sqrt()


def with_batchnorm(weight, name="conv"):
    """A state dict of ``weight`` followed by a BatchNorm over its output channels."""
    channels = weight.shape[0]
    return {f"{name}.weight": weight, "bn.weight": torch.ones(channels), "bn.bias": torch.zeros(channels),
            "bn.running_mean": torch.zeros(channels), "bn.running_var": torch.ones(channels),
            "bn.num_batches_tracked": torch.tensor(1)}


def test_a_weak_channel_gets_its_own_grid_at_the_default_setting(tmp_path):
    weight = weak_channel_conv()
    state = with_batchnorm(weight)
    one_grid = qpack.pack(state, tmp_path / "t.qpk", channel_spread=None)
    assert one_grid.tensors[0].granularity == "tensor"
    worst_one_grid = float(after_batchnorm(weight, qpack.load(tmp_path / "t.qpk")["conv.weight"]).max())
    default = qpack.pack(state, tmp_path / "d.qpk")  # -b 8, per tensor unless a channel is this weak
    assert default.tensors[0].granularity == "channel" and "30x weaker" in default.tensors[0].reason
    worst_default = float(after_batchnorm(weight, qpack.load(tmp_path / "d.qpk")["conv.weight"]).max())
    # the mechanism: one grid gives the weak channels ~30x the tensor's error, and BatchNorm keeps it
    assert one_grid.tensors[0].rel_rms < 0.01 and worst_one_grid > 0.05
    assert worst_default < worst_one_grid / 10 and worst_default < 0.01
    # 8 bytes of grid a channel, and the weak channels' indices now carry information
    assert default.file_bytes <= one_grid.file_bytes * 1.2
    # random-like channels, an explicit granularity and short rows keep what they had
    gen = torch.Generator().manual_seed(4)
    for tensor, options in [(torch.randn(64, 40, generator=gen), {}), (weight, {"granularity": "group:64"}),
                            (weak_channel_conv().reshape(-1, 2)[:, :1], {})]:
        report = qpack.pack(with_batchnorm(tensor, "w"), tmp_path / "o.qpk", force=True, **options)
        assert report.tensors[0].granularity == options.get("granularity", "tensor").partition(":")[0]


def silent_channel_conv():
    """A conv whose BatchNorm rescales some channels from far below the rest: a filter decayed
    10^4 times (or reparametrised: scaling a channel and its running statistics alike leaves
    the model's function as it was), one pruned to zeros, and others 1 to 20 times weaker."""
    gen = torch.Generator().manual_seed(5)
    scale = torch.exp(torch.empty(32).uniform_(math.log(1 / 20), 0.0, generator=gen))
    scale[3], scale[17] = 1e-4, 0.0
    return torch.randn(32, 16, 3, 3, generator=gen) * 0.1 * scale[:, None, None, None]


@pytest.mark.parametrize("options", [{}, {"bits": 4}, {"target_bpw": 5.0}])
def test_a_channel_far_weaker_than_the_rest_keeps_its_shape_after_batchnorm(tmp_path, options):
    """One grid for the tensor rounds a channel 10^4 times weaker to a constant, whose offset
    from its running mean the BatchNorm divides by a tiny deviation (a ResNet with such
    channels fell to 10 % accuracy at -b 8); and an allocation that counts a weak channel's
    error by its share of the tensor's values gives it coarse steps the BatchNorm scales up."""
    weight = silent_channel_conv()
    state = with_batchnorm(weight)
    live = torch.ones(32, dtype=torch.bool)
    live[17] = False  # all zeros: after_batchnorm has no scale for it; it must stay zeros
    worst = {}
    for label, spread in [("default", {}), ("one grid", {"channel_spread": None})]:
        report = qpack.pack(state, tmp_path / "t.qpk", force=True, **spread, **options)
        rebuilt = qpack.load(tmp_path / "t.qpk")["conv.weight"]
        worst[label] = float(after_batchnorm(weight, rebuilt)[live].max())
        if label == "default":
            assert report.tensors[0].granularity == "channel"
            assert torch.equal(rebuilt[17], torch.zeros_like(rebuilt[17]))
    assert worst["one grid"] > 0.5  # the silent channel lost
    assert worst["default"] < (0.02 if "bits" not in options and "target_bpw" not in options else 0.2)


def test_the_allocation_weighs_each_channel_as_its_batchnorm_does(tmp_path):
    """Channels 1 to 20 times weaker than the rest (none dead): at --target-bpw 4 the allocation
    sees that one grid gives the weak ones many times the tensor's relative error."""
    gen = torch.Generator().manual_seed(6)
    scale = torch.exp(torch.empty(64).uniform_(math.log(1 / 20), 0.0, generator=gen))
    weight = torch.randn(64, 32, 3, 3, generator=gen) * 0.1 * scale[:, None, None, None]
    state = {**with_batchnorm(weight), "fc.weight": torch.randn(10, 64 * 9, generator=gen) * 0.05}
    worst = {}
    for label, spread in [("default", {}), ("one grid", {"channel_spread": None})]:
        report = qpack.pack(state, tmp_path / "t.qpk", target_bpw=4.0, force=True, **spread)
        rebuilt = qpack.load(tmp_path / "t.qpk")["conv.weight"]
        worst[label] = float(after_batchnorm(weight, rebuilt).max())
        granularity = {r.name: r.granularity for r in report.tensors}["conv.weight"]
        assert granularity == ("channel" if label == "default" else "tensor")
    assert worst["default"] < worst["one grid"] / 3


def test_a_weak_channel_without_batchnorm_keeps_one_grid(tmp_path):
    """Without a BatchNorm after it, a weak channel's output stays weak, and so does its error:
    one grid is right. (An L1-trained layer with many near-dead rows paid 40x the bytes for
    grids per channel, at no gain in accuracy.)"""
    from qpack.policy import normalized_outputs

    weight = weak_channel_conv()
    alone = qpack.pack({"conv.weight": weight}, tmp_path / "a.qpk")
    assert alone.tensors[0].granularity == "tensor"
    state = {"a.weight": weight, "a.bias": torch.zeros(32), **with_batchnorm(weak_channel_conv()[:, :8], "b")}
    state["c.weight"] = torch.randn(10, 32)  # a linear after the BatchNorm: not normalised
    assert normalized_outputs(state) == {"b.weight"}
    report = {r.name: r.granularity for r in qpack.pack(state, tmp_path / "s.qpk").tensors}
    assert report["a.weight"] == "tensor" and report["b.weight"] == "channel"
    # a mismatched length (not this weight's channels) is not its BatchNorm
    assert normalized_outputs({"x.weight": weight, "bn.running_var": torch.ones(16)}) == frozenset()


def test_a_larger_target_is_never_refused_after_a_smaller_one_was_met(tmp_path):
    # the re-plan after a file came out a byte over its budget shrank the limit by that byte
    # only, and the greedy fill used it up again: --target-bpw 5 was refused where 4 was met
    state = lenet_like()
    elements = sum(t.numel() for t in state.values())
    met = []
    for target in (4.0, 4.5, 5.0, 5.5, 6.0, 7.0):
        try:
            report = qpack.pack(state, tmp_path / "t.qpk", target_bpw=target, force=True)
        except qpack.QpkError:
            assert not met, f"--target-bpw {target} refused after {met[-1]} was met"
            continue
        assert report.file_bytes * 8 <= target * elements
        met.append(target)
    assert met


# ------------------------------------------------------------------------ grids wider than their values

def test_a_wider_grid_covers_the_values_and_steps_between_two_widths():
    from qpack.codecs import uniform

    values = torch.randn(6, 500, generator=torch.Generator().manual_seed(1))
    plain = uniform.choose_params(values, 5, rows=6)
    for span in (2 ** 0.25, 2 ** 0.5, 2 ** 0.75):
        wide = uniform.choose_params(values, 5, rows=6, span=span)
        assert (wide["min"] <= plain["min"]).all() and (wide["max"] >= plain["max"]).all()
        ratio = (wide["max"] - wide["min"]) / (plain["max"] - plain["min"])
        assert torch.allclose(ratio, torch.full_like(ratio, span), rtol=1e-6)
        middle = lambda p: (p["min"].double() + p["max"].double()) / 2  # noqa: E731
        assert torch.allclose(middle(wide), middle(plain), atol=1e-6)
    with pytest.raises(ValueError, match="span"):
        uniform.choose_params(values, 5, rows=6, span=0.5)
    # a range at the edge of float32 keeps its own grid rather than overflow
    edge = uniform.choose_params(torch.tensor([[-1e38, 1.5e38]]), 4, span=1.5)
    assert edge["min"].item() == torch.tensor(-1e38).item() and edge["max"].item() == torch.tensor(1.5e38).item()


def test_a_wider_grid_reads_back_by_the_formula_and_codes_smaller(tmp_path):
    from qpack.policy import Policy

    gen = torch.Generator().manual_seed(2)
    state = {"w": torch.randn(128, 256, generator=gen)}
    # nearest rounding: the expected indices below are the nearest levels
    narrow = qpack.pack(state, tmp_path / "n.qpk", bits=5, rounding="nearest")
    wide = qpack.pack(state, tmp_path / "w.qpk", bits=5, span_by_name=(("w", 2 ** 0.5),), rounding="nearest")
    assert "1.41x its range" in wide.tensors[0].reason
    assert wide.file_bytes < narrow.file_bytes
    assert wide.tensors[0].snr_db < narrow.tensors[0].snr_db
    loaded, params = qpack.load(tmp_path / "w.qpk")["w"], qpack.info(tmp_path / "w.qpk").tensors[0].params
    lo, hi = float(params["min"][0]), float(params["max"][0])
    assert lo < float(state["w"].min()) and hi > float(state["w"].max())
    step = np.float32(np.float32(hi - lo) / np.float32(31))
    q = np.clip(np.rint((state["w"].numpy() - np.float32(lo)) / step), 0, 31).astype(np.float32)
    expected = (np.float32(lo) + (step * q).astype(np.float32)).astype(np.float32)
    assert np.array_equal(loaded.numpy(), expected)
    assert q.max() < 31 and q.min() > 0  # the outer levels go unused
    with pytest.raises(qpack.QpkError, match="span"):
        Policy(span_by_name=(("w", 3.0),))


def test_the_allocation_uses_wider_grids_between_widths(tmp_path, monkeypatch):
    """A target between two widths' sizes is met with less error (the objective) with the
    quarter-bit steps of wider grids than with whole widths only."""
    import qpack.allocate as allocate

    state = state_dict()
    chosen = qpack.pack(state, tmp_path / "s.qpk", target_bpw=3.0, allow_below_floor=True)
    rows = {r.name: r for r in chosen.tensors}
    assert any("its range" in r.reason for r in rows.values())
    monkeypatch.setattr(allocate, "SPANS", (1.0,))
    whole = qpack.pack(state, tmp_path / "w.qpk", target_bpw=3.0, allow_below_floor=True)
    assert not any("its range" in r.reason for r in whole.tensors)
    assert bits_per_weight(chosen, state) <= 3.0 and bits_per_weight(whole, state) <= 3.0
    assert weighted_error(chosen) < weighted_error(whole)


def test_wider_8_bit_grids_fill_a_target_between_7_and_8_bits(tmp_path, monkeypatch):
    """One layer holding nearly all the weights (pytorch/examples' MNIST network: 98 %): a
    target between its 7- and 8-bit sizes is met with an 8-bit grid wider than the values,
    with less error than whole widths and 7-bit spans allow (that network's --target-bpw 5
    stopped 0.2 bits per weight short of the target without them)."""
    import qpack.allocate as allocate

    gen = torch.Generator().manual_seed(5)
    state = {"fc1.weight": torch.randn(256, 400, generator=gen) * 0.05,
             "fc2.weight": torch.randn(10, 256, generator=gen) * 0.1}
    b7 = bits_per_weight(qpack.pack(state, tmp_path / "b7.qpk", bits=7), state)
    b8 = bits_per_weight(qpack.pack(state, tmp_path / "b8.qpk", bits=8), state)
    target = (b7 + b8) / 2
    chosen = qpack.pack(state, tmp_path / "t.qpk", target_bpw=target)
    rows = {r.name: r for r in chosen.tensors}
    assert rows["fc1.weight"].bits == 8 and "its range" in rows["fc1.weight"].reason
    monkeypatch.setattr(allocate, "SPAN_BITS", frozenset({3, 4, 5, 6, 7}))
    short = qpack.pack(state, tmp_path / "s.qpk", target_bpw=target)
    assert bits_per_weight(short, state) <= target and bits_per_weight(chosen, state) <= target
    assert not any(r.bits == 8 and "its range" in r.reason for r in short.tensors)
    assert weighted_error(chosen) < weighted_error(short)


# ------------------------------------------------------------------ the predicted allocation (issue 14, item 4)

def varied_state():
    """Weights of different shapes of distribution: Gaussian, Laplace, heavy-tailed (Student t,
    2 degrees of freedom), pruned (most small weights exactly 0), and a small first layer."""
    gen = torch.Generator().manual_seed(21)
    torch.manual_seed(21)
    pruned = torch.randn(80, 200, generator=gen) * 0.1
    pruned[pruned.abs() < 0.08] = 0
    return {"small.weight": torch.randn(6, 25, generator=gen) * 0.3,
            "gauss.weight": torch.randn(128, 256, generator=gen) * 0.05,
            "laplace.weight": torch.distributions.Laplace(0.0, 0.03).sample((96, 300)),
            "heavy.weight": torch.distributions.StudentT(2.0).sample((64, 400)) * 0.02,
            "pruned.weight": pruned}


def both_plans(monkeypatch, state, **limit):
    """The allocation as predicted (the default) and as the exhaustive search gives it."""
    import qpack.allocate as allocate
    from qpack.policy import Policy

    policy = Policy(allow_below_floor=limit.pop("allow_below_floor", False))
    predicted = allocate.plan(state, policy, **limit)
    monkeypatch.setattr(allocate, "PREDICT", False)
    exhaustive = allocate.plan(state, policy, **limit)
    monkeypatch.setattr(allocate, "PREDICT", True)
    return predicted, exhaustive


@pytest.mark.parametrize("target", [2.0, 3.0, 4.0, 5.5])
def test_the_predicted_allocation_is_as_good_as_the_exhaustive_one_and_within_budget(monkeypatch, target):
    state = varied_state()
    elements = sum(t.numel() for t in state.values())
    predicted, exhaustive = both_plans(monkeypatch, state, target_bpw=target, allow_below_floor=target < 3)
    assert predicted.file_bytes <= int(target * elements / 8) and exhaustive.file_bytes <= int(target * elements / 8)
    # the objective (weighted RMS of per-layer errors) within issue 14's 0.2 dB (2.3 %) of the
    # exhaustive one's (at 2 bits, below the floor, two spans apart cost 1.4 % here)
    assert predicted.predicted_error <= exhaustive.predicted_error * 10 ** (0.2 / 20), (predicted, exhaustive)


@pytest.mark.parametrize("bound", [0.02, 0.06, 0.15])
def test_the_predicted_max_error_allocation_is_as_small_as_the_exhaustive_one(monkeypatch, bound):
    predicted, exhaustive = both_plans(monkeypatch, varied_state(), max_error=bound)
    assert predicted.predicted_error <= bound and exhaustive.predicted_error <= bound
    # within 2.5 %: at 0.02 the estimate puts the heavy-tailed tensor's 6-bit k-means codebook
    # 25 % above its encoded error (it fits codebooks to tails worse than the encoder does), so
    # the predicted plan stays at 7 bits there, 2.3 % larger
    assert predicted.quantized_bytes <= exhaustive.quantized_bytes * 1.025


def test_the_predicted_plan_is_the_file_and_its_choices_are_encoded(tmp_path):
    state = varied_state()
    elements = sum(t.numel() for t in state.values())
    for target in (3.0, 4.5):
        report = qpack.pack(state, tmp_path / "t.qpk", target_bpw=target, force=True)
        budget, fixed, left, used = budget_note(report)
        assert fixed + used == report.file_bytes <= budget == int(target * elements / 8)
        # the allocation's error is the file's: every chosen candidate was measured on its encoding
        rows = [r for r in report.tensors if r.encoding != "raw"]
        weights = default_weights(len(rows))
        error = math.sqrt(sum(w * r.rel_rms ** 2 for w, r in zip(weights, rows)) / sum(weights))
        assert report.allocation["predicted_error"] == pytest.approx(error, rel=1e-3)


def test_predicted_sizes_and_errors_follow_the_encoder():
    """The histogram's rANS sizes are rans.encoded_size's; its errors are the encoder's within 1 %."""
    from qpack import estimate, rans
    from qpack.encoder import encode_tensor
    from qpack.policy import Decision

    rng = np.random.default_rng(4)
    counts = rng.integers(0, 5000, (20, 64)) * (rng.random((20, 64)) < 0.7)
    counts[:, 0] += 1
    for row, size in zip(counts, estimate.rans_sizes(int(counts.sum(1).max()), counts)[0]):
        assert abs(int(size) - rans.encoded_size(int(counts.sum(1).max()), row)) <= 2
    from qpack.allocate import _candidates, _columns, _predictable, _predicted
    from qpack.policy import Policy

    state = varied_state()
    # most of the pruned tensor is 0, and the heavy-tailed one's (Student t, 2 degrees of
    # freedom) range is so wide that most values lie within half a step of 0 even at 5 bits:
    # the encoder gives their uniform grids an exact 0 level, which the estimate does not
    # model, so those columns are encoded in full; their k-means columns are predicted
    decision, candidates = Policy().decide("pruned.weight", state["pruned.weight"]), _candidates(Policy(), ("tensor",))
    from qpack.allocate import ENCODE_BELOW

    assert state["small.weight"].numel() < ENCODE_BELOW  # few values: encoded at every candidate
    assert not _predictable(state["small.weight"], decision, candidates)
    for name in (n for n in state if n != "small.weight"):
        assert _predictable(state[name], decision, candidates)
        found = _predicted(name, state[name], decision, candidates)
        methods = [setting[0] for setting in _columns(state[name], candidates)]
        assert "kmeans" in methods and not any(t.exact for (t, _), m in zip(found, methods) if m == "kmeans")
        encoded = [t.exact for (t, _), m in zip(found, methods) if m == "uniform"]
        assert all(encoded) if name in ("pruned.weight", "heavy.weight") else not any(encoded), name
    for name in ("gauss.weight", "laplace.weight", "small.weight"):
        tensor = state[name]
        for kind, rows in (("tensor", 1), ("channel", tensor.shape[0])):
            stats = estimate.statistics(tensor, rows, None)
            settings = [(3, 1.0), (5, 2 ** 0.5), (8, 1.0)]
            counts, error = estimate.uniform(stats, settings)
            for (bits, span), row_counts, rel in zip(settings, counts, estimate.relative_error(stats, error)):
                # nearest rounding, which the estimate models (balanced rounding adds 1-4 %,
                # and the allocation confirms the chosen candidates by encoding them)
                _, _, report = encode_tensor(name, tensor, Decision("uniform", bits, kind, "", span=span,
                                                                    rounding="nearest"))
                if "exact 0" not in report.reason:  # a 0-level grid (heavy tails at 3 bits) is not modelled
                    assert rel == pytest.approx(report.rel_rms, rel=0.01), (name, kind, bits, span)
                else:
                    assert rel > report.rel_rms  # the plain grid's error, over-predicted
                assert int(row_counts.sum()) == tensor.numel()


def test_a_header_estimated_too_large_is_planned_again(monkeypatch):
    """The fixed bytes are first estimated from sketches of the smallest candidates' entries,
    which can be larger than the chosen ones'. A plan that fits with much of the budget left
    by that overestimate is planned again within what its own header leaves (on a 25 M-weight
    model the estimate was 31 KB high, and the plan 0.12 dB short of the exhaustive one's)."""
    import qpack.allocate as allocate
    from qpack.policy import Policy

    state = varied_state()
    budget = int(4.0 * sum(t.numel() for t in state.values()) / 8)
    honest = allocate.plan(state, Policy(), target_bpw=4.0)
    init = allocate._Planner.__init__

    def overestimated(self, *args):
        init(self, *args)
        self.fixed += budget // 20

    monkeypatch.setattr(allocate._Planner, "__init__", overestimated)
    replanned = allocate.plan(state, Policy(), target_bpw=4.0)
    assert replanned.file_bytes <= budget
    assert replanned.predicted_error <= honest.predicted_error * 1.001, (replanned, honest)
    monkeypatch.setattr(allocate, "_FIXED_OVERESTIMATE", budget)  # never planned again
    wasteful = allocate.plan(state, Policy(), target_bpw=4.0)
    assert wasteful.file_bytes <= budget - budget // 40
    assert wasteful.predicted_error > replanned.predicted_error * 1.01


def test_refusals_hold_with_predictions(monkeypatch, tmp_path):
    """A target named as the smallest above the floor is met; an impossible bound names the
    best error, computed from encodes (the same as the exhaustive search names)."""
    state = varied_state()
    messages = []
    for predict in (True, False):
        import qpack.allocate as allocate

        monkeypatch.setattr(allocate, "PREDICT", predict)
        with pytest.raises(qpack.InputError, match="quality floor") as refused:
            qpack.pack(state, tmp_path / "t.qpk", target_bpw=1.2)
        with pytest.raises(qpack.InputError, match="cannot be met") as impossible:
            qpack.pack(state, tmp_path / "t.qpk", max_error=1e-5)
        messages.append((str(refused.value), str(impossible.value)))
    assert messages[0][1] == messages[1][1]
    feasible = float(messages[0][0].split("above it is ")[1].split()[0])
    report = qpack.pack(state, tmp_path / "t.qpk", target_bpw=feasible)
    assert report.file_bytes * 8 <= feasible * sum(t.numel() for t in state.values())
    assert min(r.snr_db for r in report.tensors if r.encoding != "raw") >= FLOOR


def test_the_pack_writes_the_allocations_encodings_as_it_would_encode_them(monkeypatch, tmp_path):
    """The chosen candidates' encodings from the allocation are written as they are: the file is
    the same, byte for byte, as when the pack encodes every tensor again."""
    import qpack.allocate as allocate

    state = varied_state()
    from qpack.policy import Policy

    planned = allocate.plan(state, Policy(), 3.5)
    assert planned.encoded  # kept for the pack
    kept = qpack.pack(state, tmp_path / "kept.qpk", target_bpw=3.5)
    monkeypatch.setattr(allocate, "KEEP_BYTES", 0)
    assert not allocate.plan(state, Policy(), 3.5).encoded
    again = qpack.pack(state, tmp_path / "again.qpk", target_bpw=3.5)
    assert (tmp_path / "kept.qpk").read_bytes() == (tmp_path / "again.qpk").read_bytes()
    assert [r.reason for r in kept.tensors] == [r.reason for r in again.tensors]


def test_a_few_rows_with_their_own_zero_level_leave_a_channel_grid_predicted():
    # a row whose one outlier puts most of its values within half a step of 0 gets an exact 0
    # level of its own; the estimate does not model that, but a few such rows (an embedding's
    # rare outlier rows) move the tensor's size and error by less than their share, so its
    # channel columns stay predicted; many such rows (an L1-trained layer's live rows) are
    # encoded in full
    from qpack.allocate import ZERO_HEAVY_ROW_SHARE, _zero_heavy_grids
    from qpack.codecs import uniform

    gen = torch.Generator().manual_seed(31)
    rows = 400
    w = torch.randn(rows, 256, generator=gen) * 0.02
    few = w.clone()
    few[:2, 0] = 5.0  # two rows of 400: each its own 0 level, 0.5 % of the rows
    many = w.clone()
    many[:40, 0] = 5.0  # 10 % of the rows
    for tensor, count in ((few, 2), (many, 40)):
        params = uniform.choose_params(tensor, 5, rows, None)
        assert int(uniform.zero_heavy_rows(tensor, params, 5, rows, None).sum()) == count
    assert 2 < ZERO_HEAVY_ROW_SHARE * rows <= 40
    assert not _zero_heavy_grids(few, rows, 0) and _zero_heavy_grids(many, rows, 0)
    assert not _zero_heavy_grids(w, rows, 0)


@pytest.mark.parametrize("rows_of", ["channel", "tensor", "group:64", "group:999"])
def test_compiled_histogram_is_the_numpy_reference(monkeypatch, rows_of):
    """The estimate's one-pass histogram (numba) gives the bins, counts and float64 sums of
    the numpy code it replaces, so the allocation chooses the same with or without numba."""
    from qpack import estimate
    from qpack.format import parameter_rows
    from qpack.jit import kernels
    from qpack.policy import parse_granularity

    if kernels("qpack.estimate_jit") is None:
        pytest.skip("numba is not available (or QPACK_NO_JIT is set): only the reference runs")
    gen = torch.Generator().manual_seed(5)
    tensor = torch.randn(300, 70, generator=gen) * torch.rand(300, 1, generator=gen)
    tensor[7] = 0.5  # a constant row: index 0, no error
    kind, group = parse_granularity(rows_of)
    rows = parameter_rows(tuple(tensor.shape), kind, group)
    fast = estimate.statistics(tensor, rows, group or None, exact_limit=0)
    monkeypatch.setenv("QPACK_NO_JIT", "1")
    reference = estimate.statistics(tensor, rows, group or None, exact_limit=0)
    for field in ("u", "count", "weight", "e0", "e1", "e2", "low", "high"):
        assert np.array_equal(getattr(fast, field), getattr(reference, field)), field
    assert (fast.signal, fast.constant) == (reference.signal, reference.constant)
