"""Work per byte: the costliest files under 64 KB the rules allow (tests/worst_case.py) are
valid, sit exactly at the bounds, and one step or one element more is refused when the
file is opened, before any payload is decoded. Their CPU cost is measured by
tests/benchmarks/bench_worst_case.py (a benchmark figure, not a timed test).
"""

from __future__ import annotations

import zlib

import pytest
import worst_case
from test_reader_rules import split

import qpack
from qpack import FormatError, OutOfMemoryError, QpkReader
from qpack.format import default_max_bytes
from qpack.rans import MAX_STEPS

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def files() -> dict[str, bytes]:
    return {name: build() for name, build in worst_case.BUILDERS.items()}


def _write(tmp_path, data: bytes):
    path = tmp_path / "w.qpk"
    path.write_bytes(data)
    return path


def test_worst_files_are_small_and_at_the_bounds(files, tmp_path):
    for name, data in files.items():
        assert len(data) < worst_case.SIZE, name
        with QpkReader(_write(tmp_path, data)) as reader:  # valid at open, within R23's default
            decoded = sum(e.numel * 2 for e in reader.entries.values())
            if name == "many_steps":
                assert len(reader) > 200 and worst_case.rans_steps(data) == MAX_STEPS * len(reader)
            else:  # within a step of R23's bound
                assert default_max_bytes(len(data)) - 2 * 8 * MAX_STEPS < decoded <= default_max_bytes(len(data))


def test_worst_payloads_decode(files, tmp_path):
    # every entry of many_steps is alike: three of them, whole, stand for the 250
    assert qpack.verify(_write(tmp_path, worst_case.many_steps(3))) == 3
    for name in ("many_lanes", "zstd_expansion"):
        loaded = qpack.load(_write(tmp_path, files[name]))
        assert all(bool((t == 0.5).all()) for t in loaded.values()), name


def test_one_step_more_is_refused_at_open(tmp_path):
    payload = worst_case.rans_payload(1)
    data = worst_case.build([worst_case.entry("a", MAX_STEPS + 1, payload, "rans")], [payload])
    with pytest.raises(FormatError) as caught:
        QpkReader(_write(tmp_path, data))
    assert caught.value.rule == "R15" and "8192 steps" in str(caught.value)
    # the same payload behind a header that does not give it away: the decoder refuses it (R19)
    from qpack import rans

    with pytest.raises(rans.RansError, match="at most 8192 steps"):
        rans.decode(payload, MAX_STEPS + 1, 1)
    assert rans.decode(payload, MAX_STEPS, 1).tolist() == [0] * MAX_STEPS


@pytest.mark.parametrize("name", ["many_lanes", "zstd_expansion"])
def test_one_element_more_is_refused_at_open(files, tmp_path, name):
    doc, payloads = split(files[name])
    first = doc["tensors"][0]
    extra = default_max_bytes(len(files[name])) // 2 - sum(t["shape"][0] for t in doc["tensors"]) + 1
    first["shape"] = [first["shape"][0] + extra]
    first["raw_length"] = (first["shape"][0] + 7) // 8
    if name == "many_lanes":  # one lane more holds the extra elements
        lanes = first["shape"][0] // MAX_STEPS + 1
        payloads[0] = worst_case.rans_payload(lanes)
        first["length"] = len(payloads[0])
    else:
        payloads[0] = worst_case.zstd_frame_of_zeros(first["raw_length"])
        first["length"] = len(payloads[0])
    first["crc32"] = zlib.crc32(payloads[0])
    data = worst_case.build(doc["tensors"], payloads)
    assert len(data) < worst_case.SIZE
    with pytest.raises(OutOfMemoryError) as caught:
        QpkReader(_write(tmp_path, data))
    assert caught.value.rule == "R23"
    with QpkReader(_write(tmp_path, data), max_bytes=None) as reader:  # the caller may allow it
        assert len(reader) == len(doc["tensors"])
