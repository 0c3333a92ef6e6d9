"""Faithful round trips of real checkpoints (issue 13, item 6): the nesting and plain data of a
training checkpoint come back from ``unpack``; masks and other few-valued tensors are stored
exactly, in about a bit per element or less."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.utils.prune

import qpack
from qpack import InputError
from qpack.cli import main as cli
from qpack.structure import STRUCTURE_KEY, StructureError


def bit_exact(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and a.contiguous().reshape(-1).view(torch.uint8).equal(b.contiguous().reshape(-1).view(torch.uint8)))


def same(a, b) -> bool:
    """Equal as torch.load gives them back: types too (a tuple is no list, 1 is no True), tensors
    bit for bit, NaN equal to NaN."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and bit_exact(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(type(k) is type(j) for k, j in zip(a, b)) and all(
            same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, float):
        return math.copysign(1, a) == math.copysign(1, b) and (a == b or math.isnan(a) and math.isnan(b))
    return a == b


@pytest.fixture
def model_state() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"tok_emb.weight": torch.randn(65, 32, generator=gen), "blocks.0.attn.weight": torch.randn(96, 32, generator=gen),
            "blocks.0.ln.weight": torch.ones(32), "head.weight": torch.randn(65, 32, generator=gen)}


def char_gpt_checkpoint(model_state: dict) -> dict:
    chars = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak.\nAll: Speak, speak!"))
    return {"model_state": model_state, "optimizer": {"state": {}, "param_groups": [{"lr": 3e-4, "params": [0]}]},
            "config": {"n_layer": 1, "n_embd": 32, "dropout": 0.1, "bias": False, "vocab_size": len(chars)},
            "stoi": {c: i for i, c in enumerate(chars)}, "itos": {i: c for i, c in enumerate(chars)},
            "iter_num": 5000, "best_val_loss": 1.4697}


def pack_and_unpack(checkpoint: dict, folder: Path, **options) -> tuple[qpack.PackReport, object]:
    torch.save(checkpoint, folder / "ckpt.pt")
    report = qpack.pack(folder / "ckpt.pt", folder / "ckpt.qpk", **options)
    qpack.unpack(folder / "ckpt.qpk", folder / "back.pt")
    return report, torch.load(folder / "back.pt", weights_only=True)


# -- nesting and plain data -----------------------------------------------------------------------

def test_char_gpt_checkpoint_comes_back_as_it_was_less_the_optimizer(tmp_path, capsys, model_state):
    checkpoint = char_gpt_checkpoint(model_state)
    report, back = pack_and_unpack(checkpoint, tmp_path, exclude=["*"])
    expected = {k: v for k, v in checkpoint.items() if k != "optimizer"}
    assert same(back, expected)
    notes = " ".join(report.notes)
    assert "'model_state'" in notes and "left out training state: optimizer" in notes
    # load keeps giving the flat state dict under the names the model expects; no state.* clutter
    assert list(qpack.load(tmp_path / "ckpt.qpk")) == list(model_state)
    metadata = qpack.info(tmp_path / "ckpt.qpk").metadata
    assert STRUCTURE_KEY in metadata and not any(key.startswith("state.") for key in metadata)
    assert json.loads(metadata[STRUCTURE_KEY])["left_out"] == ["optimizer (training state)"]
    assert cli(["info", str(tmp_path / "ckpt.qpk")]) == 0
    shown = [line for line in capsys.readouterr().out.splitlines() if line.startswith(STRUCTURE_KEY)]
    assert len(shown) == 1 and len(shown[0]) < 300 and "bytes of JSON" in shown[0]


def test_a_quantized_pack_keeps_the_nesting_and_repacks_the_same(tmp_path, model_state):
    checkpoint = char_gpt_checkpoint(model_state)
    report, back = pack_and_unpack(checkpoint, tmp_path, bits=8)
    assert list(back) == ["model_state", "config", "stoi", "itos", "iter_num", "best_val_loss"]
    assert same(back["itos"], checkpoint["itos"]) and same(back["config"], checkpoint["config"])
    for name, tensor in model_state.items():
        assert (back["model_state"][name] - tensor).abs().max() < 0.05
    again = qpack.pack(tmp_path / "back.pt", tmp_path / "again.qpk", bits=8)
    trees = [json.loads(r.metadata[STRUCTURE_KEY])["tree"] for r in (report, again)]
    assert trees[0] == trees[1]
    model = torch.nn.Module()
    model.head = torch.nn.Linear(32, 65, bias=False)
    model.head.load_state_dict({"weight": back["model_state"]["head.weight"]})  # loads as the original did


def test_load_nested_is_an_opt_in(tmp_path, model_state):
    checkpoint = char_gpt_checkpoint(model_state)
    qpack.pack(checkpoint, tmp_path / "c.qpk", exclude=["*"])
    nested = qpack.load(tmp_path / "c.qpk", nested=True)
    assert same(nested, {k: v for k, v in checkpoint.items() if k != "optimizer"})
    flat = qpack.load(tmp_path / "c.qpk")
    assert same(flat, model_state)


@pytest.mark.parametrize("shape", ["net", "ema", "deeper", "module"])
def test_containers_are_found_where_the_tensors_are(tmp_path, model_state, shape):
    checkpoints = {
        "net": {"net": model_state, "epoch": 3},
        "ema": {"ema": model_state, "step": 10, "optimizer": {"state": {}, "param_groups": []}, "seed": 42},
        "deeper": {"checkpoint": {"weights_ema": model_state, "config": {"depth": 1}}, "version": "1.2"},
        "module": {"generator": model_state, "scheduler": {"last_epoch": 4}, "args": ["--lr", "0.1"]},
    }
    checkpoint = checkpoints[shape]
    report, back = pack_and_unpack(checkpoint, tmp_path, exclude=["*"])
    assert list(qpack.load(tmp_path / "ckpt.qpk")) == list(model_state)  # no container prefix
    expected = {k: v for k, v in checkpoint.items() if k not in ("optimizer", "scheduler")}
    assert same(back, expected)


def test_two_state_dicts_side_by_side_keep_their_prefixes(tmp_path, model_state):
    decoder = {"out.weight": torch.randn(8, 8)}
    checkpoint = {"encoder": model_state, "decoder": decoder, "epoch": 1}
    _, back = pack_and_unpack(checkpoint, tmp_path, exclude=["*"])
    assert list(qpack.load(tmp_path / "ckpt.qpk")) == [f"encoder.{k}" for k in model_state] + ["decoder.out.weight"]
    assert same(back, checkpoint)


def test_flat_state_dicts_record_nothing(tmp_path, model_state):
    with_optimizer = {**model_state, "optimizer": {"state": {}, "param_groups": []}}
    for i, checkpoint in enumerate([model_state, with_optimizer]):
        report = qpack.pack(checkpoint, tmp_path / f"{i}.qpk")
        assert STRUCTURE_KEY not in report.metadata
        qpack.unpack(tmp_path / f"{i}.qpk", tmp_path / f"{i}.pt")
        assert list(torch.load(tmp_path / f"{i}.pt", weights_only=True)) == list(model_state)


def test_plain_data_of_every_kind_comes_back_with_its_types(tmp_path, model_state):
    plain = {"ints": {0: "<pad>", 1: "a", -7: "neg"}, "mixed_keys": {True: 1, None: 2, 1.5: 3, "s": 4},
             "tuple": (1, (2.5, "x")), "list": [1, [2, [3, None]]], "inf": float("inf"), "ninf": -math.inf,
             "nan": math.nan, "neg_zero": -0.0, "big": 2**80, "unicode": "héllo \u2603 \U0001F600",
             "empty": {}, "empty_list": [], "flags": [True, False], "tiny": 5e-324, "nested": {"a": {"b": (None,)}}}
    checkpoint = {"model": model_state, **plain}
    _, back = pack_and_unpack(checkpoint, tmp_path, exclude=["*"])
    assert same(back, checkpoint)


def test_objects_that_are_not_plain_data_are_left_out_with_a_note(tmp_path, model_state):
    checkpoint = {"model": model_state, "args": argparse.Namespace(lr=0.1), "dtype": torch.float16,
                  "history": [1, argparse.Namespace(x=1)], "kept": [1, 2], "blob": b"\x00\x01",
                  "config": {"ok": 1, "odd": {1, 2}}}
    torch.save(checkpoint, tmp_path / "o.pt")
    with pytest.raises(InputError, match="--trust-pickle"):  # nothing unpickled unless asked
        qpack.pack(tmp_path / "o.pt", tmp_path / "o.qpk")
    assert not (tmp_path / "o.qpk").exists()
    report = qpack.pack(tmp_path / "o.pt", tmp_path / "o.qpk", exclude=["*"], trust_pickle=True)
    notes = " ".join(report.notes)
    for left_out in ("args (Namespace)", "dtype (dtype)", "history (a list holding", "blob (bytes)", "config.odd (set)"):
        assert left_out in notes
    qpack.unpack(tmp_path / "o.qpk", tmp_path / "o_back.pt")
    back = torch.load(tmp_path / "o_back.pt", weights_only=True)  # safe to load as weights
    assert same(back, {"model": model_state, "kept": [1, 2], "config": {"ok": 1}})


def test_unpack_flat_and_safetensors_give_the_flat_state_dict(tmp_path, model_state):
    qpack.pack(char_gpt_checkpoint(model_state), tmp_path / "c.qpk", exclude=["*"])
    assert cli(["unpack", str(tmp_path / "c.qpk"), "-o", str(tmp_path / "flat.pt"), "--flat", "-q"]) == 0
    assert same(torch.load(tmp_path / "flat.pt", weights_only=True), model_state)
    pytest.importorskip("safetensors")
    from safetensors.torch import load_file

    assert cli(["unpack", str(tmp_path / "c.qpk"), "-o", str(tmp_path / "c.safetensors"), "-q"]) == 0
    loaded = load_file(tmp_path / "c.safetensors")  # safetensors sorts the names
    assert sorted(loaded) == sorted(model_state) and all(bit_exact(loaded[k], v) for k, v in model_state.items())


def test_plain_data_too_large_for_the_metadata_keep_the_nesting_only(tmp_path, model_state):
    checkpoint = {"model_state": model_state, "vocab": {f"token{i}": i for i in range(8000)}, "step": 3}
    report = qpack.pack(checkpoint, tmp_path / "v.qpk", exclude=["*"])
    assert "kept the nesting only" in " ".join(report.notes)
    qpack.unpack(tmp_path / "v.qpk", tmp_path / "v.pt")
    assert same(torch.load(tmp_path / "v.pt", weights_only=True), {"model_state": model_state})


@pytest.mark.parametrize("text, words", [
    ("not json", "is not JSON"),
    ("[" * 100_00 + "]" * 100_00, "is not JSON"),  # json's recursion limit
    ('{"tree": {"tensors": "", "json": 1}}', "not an object with one key"),
    ('{"tree": {"dict": [["a", {"tensor": "missing"}]]}}', "'missing' that the file does not hold"),
    ('{"tree": {"dict": [["a", {"tensor": "w"}]]}}', "places no tensor 'v'"),
    ('{"tree": {"pickle": "gASV"}}', "unknown kind 'pickle'"),
    ('{"tree": {"dict": [[["a"], {"json": 1}]]}}', "not a [key, node] pair"),
    ('{"tree": {"float": "1e999"}}', "not nan, inf or -inf"),
    ('{"left_out": []}', "has no 'tree'"),
    ('{"tree": ' + '{"list": [' * 300 + "]}" * 300 + "}", "nests more than"),
])
def test_a_bad_structure_entry_is_a_one_line_error_and_writes_nothing(tmp_path, capsys, text, words):
    state = {"w": torch.ones(4, 4), "v": torch.zeros(4, 4)}
    qpack.pack(state, tmp_path / "b.qpk", metadata={STRUCTURE_KEY: text})
    with pytest.raises(StructureError, match=r"--flat") as caught:
        qpack.unpack(tmp_path / "b.qpk", tmp_path / "b.pt")
    assert words in str(caught.value) and "\n" not in str(caught.value)
    assert not (tmp_path / "b.pt").exists()
    assert cli(["unpack", str(tmp_path / "b.qpk"), "-o", str(tmp_path / "b.pt")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "b.pt").exists()
    assert same(qpack.load(tmp_path / "b.qpk"), state)  # the tensors still load flat
    assert cli(["unpack", str(tmp_path / "b.qpk"), "-o", str(tmp_path / "b.pt"), "--flat", "-q"]) == 0


# -- masks and other few-valued tensors -----------------------------------------------------------

def pruned_mlp() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(256, 64), torch.nn.ReLU(), torch.nn.Linear(64, 10))
    for layer in (net[0], net[2]):
        torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.9)
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def test_prune_masks_are_exact_and_cost_at_most_a_bit_each(tmp_path):
    state = pruned_mlp()
    assert {"0.weight_orig", "0.weight_mask"} <= set(state)
    report = qpack.pack(state, tmp_path / "p.qpk", bits=8)
    back = qpack.load(tmp_path / "p.qpk")
    rows = {row.name: row for row in report.tensors}
    for name in ("0.weight_mask", "2.weight_mask"):
        assert bit_exact(back[name], state[name])
        assert rows[name].encoding == "kmeans" and rows[name].bits == 1 and rows[name].rel_rms == 0.0
        assert rows[name].stored_bytes * 8 <= state[name].numel() * 0.75, rows[name].stored_bytes
    assert rows["0.weight_orig"].encoding == "uniform"  # trained-like weights are quantized as before
    assert qpack.verify(tmp_path / "p.qpk") == len(state)


def test_masks_cost_less_than_before(tmp_path):
    state = pruned_mlp()
    after = {r.name: r.stored_bytes for r in qpack.pack(state, tmp_path / "a.qpk", bits=8).tensors}
    # the exact path off: as qpack was
    before = {r.name: r.stored_bytes for r in qpack.pack(state, tmp_path / "b.qpk", bits=8, exact_values=False).tensors}
    assert after["0.weight_mask"] < before["0.weight_mask"] and after["2.weight_mask"] < before["2.weight_mask"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_few_distinct_values_are_stored_bit_for_bit_negative_zero_included(tmp_path, dtype):
    gen = torch.Generator().manual_seed(3)
    levels = torch.tensor([-0.0, 0.0, 0.5, -3.0], dtype=dtype)
    w = levels[torch.randint(0, 4, (40, 50), generator=gen)]
    report = qpack.pack({"w": w}, tmp_path / "w.qpk", bits=2)
    row = report.tensors[0]
    assert row.encoding == "kmeans" and row.bits == 2 and row.unique_after == 4
    back = qpack.load(tmp_path / "w.qpk")["w"]
    assert bit_exact(back, w) and bool(torch.signbit(back[w == 0]).eq(torch.signbit(w[w == 0])).all())


def test_exact_codebooks_only_when_exact_within_the_bits_and_worth_it(tmp_path):
    gen = torch.Generator().manual_seed(4)
    five = torch.tensor([0.0, 0.25, 0.5, 1.0, 8.0])[torch.randint(0, 5, (32, 32), generator=gen)]
    not_float32 = torch.tensor([0.1, 0.2], dtype=torch.float64)[torch.randint(0, 2, (32, 32), generator=gen)]
    few_uses = torch.randn(4, 8, generator=gen)  # 32 distinct values among 32: no saving to be had
    state = {"five": five, "not_float32": not_float32, "few_uses": few_uses, "many": torch.randn(32, 32, generator=gen)}
    rows = {r.name: r for r in qpack.pack(state, tmp_path / "a.qpk", bits=2, min_numel=1).tensors}
    assert rows["five"].encoding == "uniform"  # 5 values need 3 bits: -b 2 stays lossy
    assert rows["not_float32"].encoding == "uniform"  # a float32 codebook cannot hold 0.1 as float64
    assert rows["few_uses"].encoding == "uniform" and rows["many"].encoding == "uniform"
    rows = {r.name: r for r in qpack.pack(state, tmp_path / "b.qpk", bits=3, min_numel=1).tensors}
    assert rows["five"].encoding == "kmeans" and rows["five"].bits == 3
    assert bit_exact(qpack.load(tmp_path / "b.qpk")["five"], five)


def test_masks_with_nan_stay_raw_and_exact(tmp_path):
    mask = (torch.rand(16, 16, generator=torch.Generator().manual_seed(5)) > 0.5).float()
    mask[3, 4] = float("nan")
    report = qpack.pack({"m": mask}, tmp_path / "m.qpk")
    assert report.tensors[0].encoding == "raw"
    assert bit_exact(qpack.load(tmp_path / "m.qpk")["m"], mask)


def test_a_constant_tensor_is_one_value(tmp_path):
    ones = torch.ones(64, 64)
    row = qpack.pack({"ln.weight_2d": ones}, tmp_path / "c.qpk").tensors[0]
    assert row.encoding == "kmeans" and row.bits == 1 and row.stored_bytes < 64
    assert bit_exact(qpack.load(tmp_path / "c.qpk")["ln.weight_2d"], ones)
