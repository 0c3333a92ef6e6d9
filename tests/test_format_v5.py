"""Format version 5 (spec 1, 1.3): short payloads follow each other without padding, long ones
start 64-byte aligned; qpack writes version 5 and still writes and reads versions 1 to 4."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from torch import nn

import qpack
from qpack import QpkReader
from qpack.errors import FormatError
from qpack.format import ALIGNED_PAYLOAD, PREAMBLE_SIZE, fixed_bytes
from test_reader_rules import rewrite

VECTORS = Path(__file__).resolve().parents[1] / "specs" / "vectors"
_spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
make_vectors = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(make_vectors)


def small_bn_cnn() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.BatchNorm2d(16),
                        nn.ReLU(), nn.Flatten(), nn.LazyLinear(10))
    net(torch.randn(2, 1, 12, 12))
    return {k: v.detach().clone() for k, v in net.state_dict().items()}


def layout(path: Path) -> tuple[int, int, list]:
    """(version, D, entries in file order)."""
    with QpkReader(path) as reader:
        return reader.version, reader.data_start, list(reader.entries.values())


def test_short_payloads_follow_each_other_and_older_versions_still_pad(tmp_path):
    state = small_bn_cnn()
    qpack.pack(state, tmp_path / "m.qpk", bits=4, min_numel=64)
    version, start, entries = layout(tmp_path / "m.qpk")
    header_end = PREAMBLE_SIZE + int.from_bytes((tmp_path / "m.qpk").read_bytes()[12:16], "little")
    assert version == 5 and start == header_end  # no padding after the header ...
    end = 0
    for entry in entries:  # ... nor between payloads
        assert entry.offset == end
        end += entry.length
    assert (tmp_path / "m.qpk").stat().st_size == start + end
    sizes = {5: (tmp_path / "m.qpk").stat().st_size}
    for old in (3, 4):
        rewrite(tmp_path / "m.qpk", tmp_path / f"v{old}.qpk", old)
        version, start, old_entries = layout(tmp_path / f"v{old}.qpk")
        assert version == old and start % 64 == 0 and all(e.offset % 64 == 0 for e in old_entries)
        sizes[old] = (tmp_path / f"v{old}.qpk").stat().st_size
        for key, tensor in qpack.load(tmp_path / f"v{old}.qpk").items():
            assert torch.equal(tensor, qpack.load(tmp_path / "m.qpk")[key]), key
    # what version 5 saves is the padding, as fixed_bytes predicts it
    metadata = QpkReader(tmp_path / "m.qpk").metadata
    assert sizes[4] - sizes[5] == fixed_bytes(entries, metadata, 4) - fixed_bytes(entries, metadata, 5) > 10 * 16


def long_and_short() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(5)
    return {"a.bias": torch.randn(10, generator=gen),  # short, then long (incompressible), then short
            "big": torch.randint(-2 ** 31, 2 ** 31 - 1, (20_000,), dtype=torch.int32, generator=gen),
            "c.bias": torch.randn(7, generator=gen)}


def test_a_long_payload_starts_aligned_as_an_independent_reading_of_the_spec_finds_it(tmp_path):
    state = long_and_short()
    qpack.pack(state, tmp_path / "l.qpk")
    version, start, entries = layout(tmp_path / "l.qpk")
    a, big, c = entries
    assert version == 5 and big.length >= ALIGNED_PAYLOAD and a.length < ALIGNED_PAYLOAD
    assert start % 64 == 0 and big.offset % 64 == 0 and big.offset > a.offset + a.length  # padded
    assert c.offset == big.offset + big.length  # the short one after it is not
    # make_vectors' spec_read places payloads from the spec's text alone, not qpack's code
    spec_version, _, spec_entries, payloads = make_vectors.spec_read(tmp_path / "l.qpk")
    assert spec_version == 5 and [e["offset"] for e in spec_entries] == [e.offset for e in entries]
    assert payloads[1] == state["big"].numpy().tobytes()
    for key, tensor in qpack.load(tmp_path / "l.qpk").items():
        assert torch.equal(tensor, state[key])


def test_padding_version_5_does_not_have_is_refused(tmp_path):
    qpack.pack(small_bn_cnn(), tmp_path / "m.qpk", bits=4, min_numel=64)
    data = (tmp_path / "m.qpk").read_bytes()
    (tmp_path / "padded.qpk").write_bytes(data + bytes(64 - len(data) % 64))  # as if aligned
    with pytest.raises(FormatError, match=r"trailing bytes.*\[R16\]"):
        QpkReader(tmp_path / "padded.qpk")
    # a long payload's padding must be zero (R17)
    qpack.pack(long_and_short(), tmp_path / "l.qpk")
    _, start, (a, big, _) = layout(tmp_path / "l.qpk")
    data = bytearray((tmp_path / "l.qpk").read_bytes())
    data[start + a.offset + a.length] = 1
    (tmp_path / "dirty.qpk").write_bytes(bytes(data))
    with pytest.raises(FormatError, match=r"non-zero padding.*\[R17\]"):
        QpkReader(tmp_path / "dirty.qpk")


def test_a_derived_entry_needs_version_4_or_later(tmp_path):
    w = torch.randn(8, 40)
    w[w.abs() < 1] = 0
    state = {"w": w, "w_mask": (w != 0).float()}
    qpack.pack(state, tmp_path / "d.qpk", bits=5, method="kmeans", exact_zero=True, min_numel=1)
    _, _, entries = layout(tmp_path / "d.qpk")
    assert entries[1].encoding == "derived"
    rewrite(tmp_path / "d.qpk", tmp_path / "d4.qpk", 4)
    assert torch.equal(qpack.load(tmp_path / "d4.qpk")["w_mask"], state["w_mask"])
    with pytest.raises(qpack.InputError, match="needs version 4"):
        rewrite(tmp_path / "d.qpk", tmp_path / "d3.qpk", 3)
    assert not (tmp_path / "d3.qpk").exists()


def test_info_names_the_version_and_what_the_container_costs(tmp_path, capsys):
    from qpack.cli import main

    qpack.pack(small_bn_cnn(), tmp_path / "m.qpk", bits=4, min_numel=64)
    rewrite(tmp_path / "m.qpk", tmp_path / "v3.qpk", 3)
    for name, version in (("m.qpk", 5), ("v3.qpk", 3)):
        report = qpack.info(tmp_path / name)
        with QpkReader(tmp_path / name) as reader:
            fixed = fixed_bytes(list(reader.entries.values()), reader.metadata, version)
        assert report.format_version == version and report.container_bytes == fixed
        assert report.to_dict()["container_bytes"] == fixed
        assert main(["info", str(tmp_path / name)]) == 0
        assert f"container: .qpk version {version}, {fixed:,} bytes besides the payloads" in capsys.readouterr().out
    assert qpack.info(tmp_path / "v3.qpk").container_bytes > qpack.info(tmp_path / "m.qpk").container_bytes
