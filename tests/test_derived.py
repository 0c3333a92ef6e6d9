"""Masks derived from another tensor (spec 3.5, format version 4): written only when exact
against the source as it decodes, read back bit for bit, and rejected by R12, R18, R24 and
R25 when malformed."""

from __future__ import annotations

import struct

import pytest
import torch
import torch.nn.utils.prune

import qpack
from qpack import FormatError, InputError, OutOfMemoryError, QpkReader
from qpack.codecs import derived
from qpack.writer import QpkWriter
from test_reader_rules import _entry, assemble3, index_of, rejects, split3


def pruned(rows: int = 40, cols: int = 50, seed: int = 0, keep: float = 0.1) -> torch.Tensor:
    """A weight pruned by magnitude (Deep Compression): the kept values are the large ones."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=gen)
    w[w.abs() < w.abs().quantile(1 - keep)] = 0
    return w


def version_of(path) -> int:
    return struct.unpack("<I", path.read_bytes()[8:12])[0]


def encodings(path) -> dict[str, str]:
    with QpkReader(path) as reader:
        return {name: e.encoding for name, e in reader.entries.items()}


@pytest.mark.parametrize("options", [{"bits": 4}, {"bits": 8}, {"bits": 3, "method": "kmeans"},
                                     {"bits": 4, "granularity": "group:32"}, {"bits": 6, "granularity": "channel"},
                                     {"bits": 6, "rans": "never", "param_dtype": "float16"}])
def test_masks_of_every_dtype_are_derived_and_come_back_bit_for_bit(tmp_path, options):
    w = pruned()
    masks = {"fc.mask": (w != 0).float(), "fc.flags": w != 0, "fc.bytes": (w != 0).to(torch.uint8),
             "fc.half": (w != 0).half(), "fc.long": (w != 0).long()}
    state = {"fc.weight": w, "fc.bias": torch.randn(40), **masks}
    report = qpack.pack(state, tmp_path / "m.qpk", **options)
    path = tmp_path / "m.qpk"
    back = qpack.load(path)
    kinds = encodings(path)
    for name, mask in masks.items():
        assert back[name].dtype == mask.dtype and torch.equal(back[name], mask), name
        assert kinds[name] == "derived", name
    assert version_of(path) == 5
    assert sum(r.stored_bytes for r in report.tensors if r.name in masks) == 0
    with QpkReader(path) as reader:  # one tensor alone decodes its source first
        assert torch.equal(reader.tensor("fc.flags"), masks["fc.flags"])
        assert reader.entry("fc.flags").params == {"source": "fc.weight", "rule": "nonzero"}
    assert qpack.verify(path) == len(state)
    rows = {r.name: r for r in qpack.info(path).tensors}
    assert rows["fc.mask"].encoding == "derived" and rows["fc.mask"].storage == "nonzero(fc.weight)"
    assert rows["fc.mask"].original_bytes == w.numel() * 4 and rows["fc.mask"].stored_bytes == 0


def test_a_mask_whose_source_quantizes_a_kept_weight_to_zero_is_stored_as_before(tmp_path):
    w = pruned()
    w[0, 0] = 1e-4  # kept, but a 4-bit grid with an exact 0 rounds it to 0
    mask = w != 0
    state = {"fc.weight": w, "fc.mask": mask.float(), "fc.flags": mask}
    report = qpack.pack(state, tmp_path / "m.qpk", bits=4, exact_zero=True)
    assert qpack.load(tmp_path / "m.qpk")["fc.weight"][0, 0] == 0
    kinds = encodings(tmp_path / "m.qpk")
    assert kinds == {"fc.weight": "uniform", "fc.mask": "kmeans", "fc.flags": "raw"}
    assert version_of(tmp_path / "m.qpk") == 5
    back = qpack.load(tmp_path / "m.qpk")
    assert torch.equal(back["fc.mask"], mask.float()) and torch.equal(back["fc.flags"], mask)
    assert "not derived" in next(r.reason for r in report.tensors if r.name == "fc.mask")


def test_negative_zero_is_zero_in_the_source_and_never_in_a_mask(tmp_path):
    w = pruned()
    w[1, :7] = -0.0  # -0.0 != 0 is False: the mask is 0 there
    mask = (w != 0).float()
    negative = mask.clone()
    negative[mask == 0] = -0.0  # would come back as +0.0: not derivable
    flags = w != 0
    flags_at_negative_zero = flags.clone()
    flags_at_negative_zero[1, 0] = True  # 1 where the source is -0.0
    state = {"w": w, "m": mask, "neg": negative, "odd": flags_at_negative_zero}
    qpack.pack(state, tmp_path / "z.qpk", exclude=["w"])  # the source raw: -0.0 kept as it is
    kinds = encodings(tmp_path / "z.qpk")
    assert kinds["m"] == "derived" and kinds["neg"] != "derived" and kinds["odd"] != "derived"
    back = qpack.load(tmp_path / "z.qpk")
    for name, tensor in state.items():
        assert torch.equal(back[name].view(torch.uint8) if tensor.dtype != torch.bool else back[name],
                           tensor.view(torch.uint8) if tensor.dtype != torch.bool else tensor), name


def test_torch_prune_masks_are_not_weight_orig_nonzero_and_stay_exact_codebooks(tmp_path):
    torch.manual_seed(0)
    layer = torch.nn.Linear(60, 30)
    torch.nn.utils.prune.l1_unstructured(layer, "weight", amount=0.8)
    state = {k: v.detach().clone() for k, v in layer.state_dict().items()}
    qpack.pack(state, tmp_path / "p.qpk")
    assert encodings(tmp_path / "p.qpk")["weight_mask"] == "kmeans"  # weight_orig keeps the pruned values
    assert torch.equal(qpack.load(tmp_path / "p.qpk")["weight_mask"], state["weight_mask"])


def test_the_writer_finds_the_nearest_source_and_works_whatever_the_order(tmp_path):
    a, b = pruned(seed=1), pruned(seed=2)
    state = {"x.mask": (a != 0).float(), "y.mask": (b != 0).float(), "x.weight": a, "y.weight": b}
    assert derived.find_sources(state) == {"x.mask": "x.weight", "y.mask": "y.weight"}
    for threads in (1, 3):  # masks before their sources, in other threads too
        qpack.pack(state, tmp_path / "o.qpk", bits=6, threads=threads, force=True)
        with QpkReader(tmp_path / "o.qpk") as reader:
            assert reader.entry("y.mask").params["source"] == "y.weight"
        back = qpack.load(tmp_path / "o.qpk")
        assert list(back) == list(state) and all(torch.equal(back[k], state[k]) for k in ("x.mask", "y.mask"))


def test_derive_masks_off_and_small_masks_store_the_mask(tmp_path):
    w = pruned()
    qpack.pack({"w": w, "m": w != 0}, tmp_path / "off.qpk", derive_masks=False)
    assert encodings(tmp_path / "off.qpk")["m"] == "raw"
    small = pruned(4, 8)
    assert derived.find_sources({"w": small, "m": small != 0}) == {}  # under MIN_NUMEL


def test_is_mask_tells_masks_from_weights():
    assert derived.is_mask(torch.tensor([0.0, 1.0, 1.0])) and derived.is_mask(torch.tensor([0, 1], dtype=torch.int8))
    assert derived.is_mask(torch.tensor([True, False]))
    assert not derived.is_mask(torch.tensor([0.0, -0.0, 1.0])) and not derived.is_mask(torch.tensor([0, 2]))
    assert not derived.is_mask(torch.randn(10000))


def test_decode_follows_the_worked_example_of_the_spec():
    source = torch.tensor([[0.5, 0.0], [-0.0, -2.0]])
    assert derived.decode(source, torch.uint8).numpy().tobytes().hex() == "01000001"
    assert derived.decode(source, torch.float32).numpy().tobytes().hex() == \
        "0000803f" "00000000" "00000000" "0000803f"
    assert derived.decode(torch.tensor([float("nan"), 0.0]), torch.bool).tolist() == [True, False]


# -- malformed derived entries --------------------------------------------------------------------


@pytest.fixture(scope="module")
def masked_bytes(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    path = tmp_path_factory.mktemp("masked") / "masked.qpk"
    w = pruned()
    qpack.pack({"w": w, "w.mask": (w != 0).float(), "other": torch.randn(5, 400), "b": torch.randn(40)}, path)
    return path.read_bytes()


def crafted(data: bytes, edit, version: int = 5) -> bytes:
    doc, payloads = split3(data)
    edit(doc, payloads)
    return assemble3(doc, payloads, version=version)


def test_the_fixture_reads(tmp_path, masked_bytes):
    (tmp_path / "ok.qpk").write_bytes(masked_bytes)
    assert encodings(tmp_path / "ok.qpk")["w.mask"] == "derived"
    assert crafted(masked_bytes, lambda doc, payloads: None) == masked_bytes  # the helpers rebuild its bytes


def _mask(doc):
    return doc["tensors"][index_of(doc, "w.mask")]


@pytest.mark.parametrize("edit", [
    lambda e: e.update(bits=1),
    lambda e: e.update(granularity="channel"),
    lambda e: e.update(group_size=16),
    lambda e: e.update(param_dtype="float16"),
    lambda e: e.update(params={"source": "w"}),
    lambda e: e.update(params={"source": "w", "rule": "nonzero", "extra": 1}),
    lambda e: e.update(params={"source": 3, "rule": "nonzero"}),
    lambda e: e.update(params={"source": "", "rule": "nonzero"}),
    lambda e: e.update(params={"source": "w" * 1025, "rule": "nonzero"}),
    lambda e: e.update(params={"source": "w", "rule": "zero"}),
    lambda e: e.update(compression="zstd"),
], ids=["bits", "granularity", "group_size", "param_dtype", "no-rule", "extra-key", "source-int", "source-empty",
        "source-long", "unknown-rule", "compressed"])
def test_r24_derived_entry_fields(tmp_path, masked_bytes, edit):
    rejects(tmp_path, crafted(masked_bytes, lambda doc, payloads: edit(_mask(doc))), "R24")


def test_r24_a_derived_entry_has_no_payload(tmp_path, masked_bytes):
    def give_payload(doc, payloads):
        payloads[index_of(doc, "w.mask")] = b"\x01" * 8
    exc = rejects(tmp_path, crafted(masked_bytes, give_payload), "R24")
    assert "no payload" in str(exc)


def test_r18_a_derived_entry_checksum_is_that_of_no_bytes(tmp_path, masked_bytes):
    doc, payloads = split3(masked_bytes)
    _mask(doc)["crc32"] = 1
    data = assemble3(doc, payloads, version=4, keep_checksums=True)
    rejects(tmp_path, data, "R18", qpack.ChecksumError, on_read=True)


@pytest.mark.parametrize("edit, words", [
    (lambda doc: _mask(doc)["params"].update(source="missing"), "does not hold"),
    (lambda doc: _mask(doc)["params"].update(source="w.mask"), "derived itself"),
    (lambda doc: _mask(doc)["params"].update(source="other"), "shape"),
    (lambda doc: _mask(doc)["params"].update(source="b"), "shape"),
], ids=["missing", "itself", "other-shape", "1-d"])
def test_r25_the_source_is_another_stored_entry_of_the_same_shape(tmp_path, masked_bytes, edit, words):
    exc = rejects(tmp_path, crafted(masked_bytes, lambda doc, payloads: edit(doc)), "R25")
    assert words in str(exc)


def test_r25_no_chains(tmp_path, masked_bytes):
    def chain(doc, payloads):
        other = doc["tensors"][index_of(doc, "w")]
        for key in ("encoding", "params", "compression", "bits", "stats", "width", "granularity", "group_size",
                    "param_dtype"):
            other.pop(key, None)
        other.update(encoding="derived", params={"source": "w.mask", "rule": "nonzero"})
        payloads[index_of(doc, "w")] = b""
    exc = rejects(tmp_path, crafted(masked_bytes, chain), "R25")
    assert "derived itself" in str(exc)


def test_r12_derived_needs_version_4(tmp_path, masked_bytes):
    exc = rejects(tmp_path, crafted(masked_bytes, lambda doc, payloads: None, version=3), "R12")
    assert "version 4" in str(exc)


def test_the_writer_refuses_a_derived_entry_in_an_older_version(tmp_path):
    writer = QpkWriter(tmp_path / "old.qpk", version=3)
    writer.add(_entry("w", torch.zeros(2, 2)), bytes(16))
    mask = _entry("m", torch.zeros(2, 2), "derived", params={"source": "w", "rule": "nonzero"})
    writer.add(mask, b"")
    with pytest.raises(InputError, match="version 4"):
        writer.finish()
    assert not (tmp_path / "old.qpk").exists()


def test_r23_counts_each_derived_tensor_in_its_own_dtype(tmp_path):
    w = pruned(64, 64)
    state = {"w": w, **{f"m{i}": (w != 0).double() for i in range(8)}}
    qpack.pack(state, tmp_path / "many.qpk", bits=4)
    assert set(encodings(tmp_path / "many.qpk").values()) == {"uniform", "derived"}
    decoded = w.numel() * 4 + 8 * w.numel() * 8
    with pytest.raises(OutOfMemoryError) as caught:
        QpkReader(tmp_path / "many.qpk", max_bytes=decoded - 1)
    assert caught.value.rule == "R23"
    with QpkReader(tmp_path / "many.qpk", max_bytes=decoded):
        pass


def test_load_reports_progress_for_every_tensor_in_file_order(tmp_path):
    w = pruned()
    state = {"m": w != 0, "w": w, "b": torch.randn(3)}
    qpack.pack(state, tmp_path / "p.qpk")
    seen = []
    back = qpack.load(tmp_path / "p.qpk", progress=lambda name, done, total: seen.append((done, total)))
    assert list(back) == ["m", "w", "b"] and seen == [(1, 3), (2, 3), (3, 3)]


def test_format_errors_are_named(tmp_path, masked_bytes):
    exc = rejects(tmp_path, crafted(masked_bytes, lambda doc, payloads: _mask(doc)["params"].update(rule="any")), "R24")
    assert isinstance(exc, FormatError) and "nonzero" in str(exc)


def test_a_file_built_by_hand_from_the_spec_example_reads(tmp_path):
    source = torch.tensor([[0.5, 0.0], [-0.0, -2.0]])
    doc = {"tensors": [
        {"name": "w", "dtype": "float32", "shape": [2, 2], "length": 16, "crc32": 0},
        {"name": "m", "dtype": "uint8", "shape": [2, 2], "encoding": "derived",
         "params": {"source": "w", "rule": "nonzero"}, "length": 0, "crc32": 0},
        {"name": "f", "dtype": "float32", "shape": [2, 2], "encoding": "derived",
         "params": {"rule": "nonzero", "source": "w"}, "length": 0, "crc32": 0},  # keys in any order
    ], "metadata": {}}
    for version in (4, 5):
        (tmp_path / "hand.qpk").write_bytes(assemble3(doc, [source.numpy().tobytes(), b"", b""], version=version))
        back = qpack.load(tmp_path / "hand.qpk")
        assert back["m"].numpy().tobytes().hex() == "01000001"
        assert back["f"].numpy().tobytes().hex() == "0000803f" "00000000" "00000000" "0000803f"
        assert qpack.verify(tmp_path / "hand.qpk") == 3
