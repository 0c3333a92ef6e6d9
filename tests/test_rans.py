"""rANS-coded indices (spec section 4.1, file versions 2 and 3): the coder, the writer's
choice, and the reader's checks (R15, R19), on version-2 files as older qpack wrote them."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

import qpack
from qpack import FormatError, QpkReader, rans
from test_reader_rules import assemble, index_of, json_copy, lay_out, rejects, rewrite, split, write_sample

SPEC = Path(__file__).resolve().parents[1] / "specs" / "qpk-format.md"


def entropy_bytes(indices: np.ndarray) -> float:
    counts = np.bincount(indices)
    p = counts[counts > 0] / indices.size
    return float(-(p * np.log2(p)).sum() * indices.size / 8)


def skewed(n: int, levels: int, scale: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.clip(np.rint(rng.laplace(levels // 2, scale, n)), 0, levels - 1).astype(np.int64)


# -- the coder --------------------------------------------------------------------------------

@pytest.mark.parametrize("n, levels, scale", [
    (1, 2, 1.0), (2, 2, 1.0), (7, 4, 1.0), (1000, 8, 1.0), (65_537, 16, 2.0),
    (200_003, 256, 6.0), (50_000, 4096, 200.0), (300_000, 2, 0.05), (100_000, 65536, 3.0),
])
def test_round_trip(n, levels, scale):
    indices = skewed(n, levels, scale, seed=n)
    bits = max(1, (levels - 1).bit_length())
    payload = rans.encode(indices)
    assert payload is not None
    decoded = rans.decode(payload, n, bits)
    assert decoded.dtype == (np.uint8 if decoded.max() < 256 else np.uint16)
    assert np.array_equal(decoded.astype(np.int64), indices)
    # the estimate counts every coded bit as words; the final lane states hold up to 2 bytes each
    lanes = int(np.frombuffer(payload, "<u4", count=1)[0])
    assert abs(len(payload) - rans.encoded_size(n, np.bincount(indices))) <= 2 * lanes + 4


def test_one_symbol_costs_no_words():
    payload = rans.encode(np.full(100_000, 3))
    lanes = int(np.frombuffer(payload, "<u4", count=1)[0])
    assert len(payload) == 8 + 2 * 4 + 4 * lanes  # header, table, states, no words
    assert np.array_equal(rans.decode(payload, 100_000, 2), np.full(100_000, 3))


@pytest.mark.parametrize("n, levels, scale", [(400_000, 8, 0.4), (1_000_000, 16, 1.5), (500_000, 256, 10.0),
                                             (2_000_000, 2, 0.1)])
def test_within_one_percent_of_the_entropy_plus_fixed_overhead(n, levels, scale):
    # the issue asks for 2 %; the table and the per-lane states are the fixed part
    indices = skewed(n, levels, scale, seed=3)
    payload = rans.encode(indices)
    fixed = 8 + 2 * levels + 4 * -(-n // rans.WRITER_STEPS)
    assert len(payload) <= 1.01 * entropy_bytes(indices) + fixed + 16


def test_normalize_keeps_every_present_symbol_and_sums_to_the_total():
    counts = np.array([0, 1, 5, 0, 1_000_000, 3, 0, 1])
    freq = rans.normalize(counts)
    assert freq.sum() == 1 << rans.PROB_BITS
    assert np.all((freq > 0) == (counts > 0))
    assert freq.argmax() == 4
    assert rans.normalize(np.zeros(4, np.int64)) is None
    assert rans.normalize(np.ones((1 << rans.PROB_BITS) + 1, np.int64)) is None  # no valid table
    assert rans.encode(np.arange((1 << rans.PROB_BITS) + 1)) is None


def test_spec_worked_example():
    text = SPEC.read_text()
    example = re.search(r"Worked example, bits = 1, indices `\[0, 0, 1, 0\]`.*?Payload \(16 bytes\): `([0-9a-f ]+)`",
                        text, re.S)
    assert example, "the worked example is missing from the spec"
    payload = rans.encode(np.array([0, 0, 1, 0]))
    assert payload.hex(" ") == example.group(1)
    assert rans.decode(payload, 4, 1).tolist() == [0, 0, 1, 0]


# -- malformed payloads -------------------------------------------------------------------------

def _payload(n: int = 5000, levels: int = 8) -> tuple[bytes, int, int, int]:
    payload = rans.encode(skewed(n, levels, 1.0, seed=1))
    lanes, alphabet = (int(v) for v in np.frombuffer(payload, "<u4", count=2))
    return payload, n, lanes, alphabet


def _with(payload: bytes, offset: int, fmt: str, value: int) -> bytes:
    patched = bytearray(payload)
    patched[offset:offset + np.dtype(fmt).itemsize] = np.array([value], fmt).tobytes()
    return bytes(patched)


def test_decode_rejects_every_broken_field():
    payload, n, lanes, alphabet = _payload()
    states_at = 8 + 2 * alphabet
    words_at = states_at + 4 * lanes
    cases = {
        "short header": (payload[:7], n),
        "no lanes": (_with(payload, 0, "<u4", 0), n),
        "more lanes than indices": (_with(payload, 0, "<u4", n + 1), n),
        "too many steps": (payload, rans.MAX_STEPS * lanes + 1),
        "empty alphabet": (_with(payload, 4, "<u4", 0), n),
        "alphabet past 2^bits": (_with(payload, 4, "<u4", 9), n),
        "cut inside the states": (payload[:words_at - 1], n),
        "odd word bytes": (payload + b"\x00", n),
        "frequencies off by one": (_with(payload, 8, "<u2", int(np.frombuffer(payload, "<u2", 1, 8)[0]) + 1), n),
        "state below 2^16": (_with(payload, states_at, "<u4", 5), n),
        "words missing": (payload[:-2], n),
        "a word too many": (payload + b"\x00\x00", n),
        "a changed word": (_with(payload, words_at, "<u2", int(np.frombuffer(payload, "<u2", 1, words_at)[0]) ^ 0x40), n),
        "a changed state": (_with(payload, states_at, "<u4", int(np.frombuffer(payload, "<u4", 1, states_at)[0]) ^ 0x100), n),
    }
    for what, (data, count) in cases.items():
        with pytest.raises(rans.RansError):
            rans.decode(data, count, 3)
            pytest.fail(what)


def test_random_damage_is_caught_or_harmless():
    # any payload either fails with RansError or decodes to the right number of valid indices
    payload, n, _, _ = _payload(3000, 4)
    rng = np.random.default_rng(0)
    for _ in range(300):
        damaged = bytearray(payload)
        for position in rng.integers(0, len(payload), rng.integers(1, 4)):
            damaged[position] = rng.integers(0, 256)
        try:
            out = rans.decode(bytes(damaged), n, 2)
        except rans.RansError:
            continue
        assert out.size == n and int(out.max()) < 4


# -- in files ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def skewed_weights() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(11)
    u = torch.rand(300, 200, generator=gen) - 0.5
    laplace = -u.sign() * torch.log1p(-2 * u.abs())  # inverse CDF: a seeded Laplace sample
    return {"fc.weight": laplace, "uniform.weight": torch.rand(64, 64, generator=gen)}


def test_writer_codes_skewed_indices(tmp_path, skewed_weights):
    # 5-bit uniform: Laplace weights use the middle levels far more than the outer ones
    qpack.pack(skewed_weights, tmp_path / "coded.qpk", bits=5)
    with QpkReader(tmp_path / "coded.qpk") as reader:
        assert reader.version == 5
        assert reader.entry("fc.weight").compression == "rans"
        assert reader.entry("uniform.weight").compression != "rans"  # flat: nothing to gain
        coded_length = reader.entry("fc.weight").length
    qpack.pack(skewed_weights, tmp_path / "plain.qpk", bits=5, rans="never")
    with QpkReader(tmp_path / "plain.qpk") as reader:
        assert reader.version == 5 and reader.entry("fc.weight").compression != "rans"
        assert coded_length < 0.98 * reader.entry("fc.weight").length
    coded, plain = qpack.load(tmp_path / "coded.qpk"), qpack.load(tmp_path / "plain.qpk")
    for name in skewed_weights:
        assert torch.equal(coded[name], plain[name]), name
    assert qpack.verify(tmp_path / "coded.qpk") == len(skewed_weights)
    # written as version 2 (what older qpack wrote), the file reads the same
    rewrite(tmp_path / "coded.qpk", tmp_path / "v2.qpk", 2)
    with QpkReader(tmp_path / "v2.qpk") as reader:
        assert reader.version == 2
    assert all(torch.equal(t, coded[n]) for n, t in qpack.load(tmp_path / "v2.qpk").items())


def test_version_2_means_some_payload_is_rans_coded(tmp_path):
    write_sample(tmp_path / "flat.qpk")  # version 1, no rANS
    data = (tmp_path / "flat.qpk").read_bytes()
    assert data[8:12] == b"\x01\x00\x00\x00"
    # a version 1 file relabelled 2 is refused: version 2 means some payload is rANS-coded
    rejects(tmp_path, data[:8] + b"\x02" + data[9:], "R15")
    with pytest.raises(qpack.InputError, match="R15"):
        rewrite(tmp_path / "flat.qpk", tmp_path / "v2.qpk", 2)


@pytest.fixture(scope="module")
def coded_file(tmp_path_factory, skewed_weights) -> bytes:
    path = tmp_path_factory.mktemp("rans") / "coded.qpk"
    qpack.pack({"fc.weight": skewed_weights["fc.weight"][:40, :50].contiguous()}, path, bits=3,
               method="kmeans", prune=0.7)
    data = rewrite(path, path.with_name("v2.qpk"), 2)  # a version-2 file, plain header to edit
    assert split(data)[0]["tensors"][0]["compression"] == "rans"
    return data


def _rebuild(doc: dict, payloads: list[bytes], version: int) -> bytes:
    return assemble(doc, lay_out(doc, payloads), version=version)


def test_r15_rans_needs_version_2_width_bits_and_saved_space(tmp_path, coded_file):
    doc, payloads = split(coded_file)
    index = index_of(doc, "fc.weight")
    rejects(tmp_path, _rebuild(json_copy(doc), payloads, version=1), "R15")
    wide = json_copy(doc)
    wide["tensors"][index].update(width=4, raw_length=-(-2000 * 4 // 8))
    rejects(tmp_path, _rebuild(wide, payloads, version=2), "R15")
    grown = json_copy(doc)
    raw_length = grown["tensors"][index]["raw_length"]
    rejects(tmp_path, _rebuild(grown, [payloads[0] + bytes(raw_length - len(payloads[0]))], version=2), "R15")


def test_r19_corrupted_rans_payload_with_a_valid_checksum(tmp_path, coded_file):
    doc, payloads = split(coded_file)
    damaged = bytearray(payloads[0])
    damaged[-1] ^= 0x10  # the last word: decoding no longer ends at the start states
    rejects(tmp_path, _rebuild(json_copy(doc), [bytes(damaged)], version=2), "R19", on_read=True)
    rejects(tmp_path, _rebuild(json_copy(doc), [payloads[0][:-2]], version=2), "R19", on_read=True)


def test_every_single_byte_change_is_rejected(tmp_path, coded_file):
    path = tmp_path / "changed.qpk"
    for position in range(len(coded_file)):
        changed = bytearray(coded_file)
        changed[position] ^= 0xFF
        path.write_bytes(changed)
        with pytest.raises(FormatError):
            with QpkReader(path) as reader:
                for name in reader:
                    reader.tensor(name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_rans_file_loads_on_cuda_bit_identical(tmp_path, skewed_weights):
    qpack.pack(skewed_weights, tmp_path / "coded.qpk", bits=4, method="kmeans", prune=0.6)
    cpu, gpu = qpack.load(tmp_path / "coded.qpk"), qpack.load(tmp_path / "coded.qpk", device="cuda")
    for name in cpu:
        assert gpu[name].is_cuda and torch.equal(gpu[name].cpu(), cpu[name])


def test_rans_modes(tmp_path, skewed_weights):
    weights = {"fc.weight": skewed_weights["fc.weight"]}
    payload = {}
    for mode in ("never", "auto", "always"):
        qpack.pack(weights, tmp_path / f"{mode}.qpk", bits=5, granularity="channel", rans=mode)
        with QpkReader(tmp_path / f"{mode}.qpk") as reader:
            entry = reader.entry("fc.weight")
            assert reader.version == 5
            payload[mode] = (entry.compression, entry.length)
    # per-row 5-bit Laplace indices: rANS saves under 5 % over zstd, so only "always" uses it
    assert payload["never"][0] != "rans" and payload["auto"] == payload["never"]
    assert payload["always"][0] == "rans" and payload["always"][1] < payload["never"][1]
    with pytest.raises(qpack.InputError, match="rans mode"):
        qpack.pack(weights, tmp_path / "bad.qpk", rans="sometimes")


# -- the compiled kernels and the torch decoder, against the numpy reference ---------------------

def _numpy_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QPACK_NO_JIT", "1")


def _outcome(decode, *args):
    """What a decoder makes of a payload: its indices as int64, or the error's message."""
    try:
        return np.asarray(decode(*args)).astype(np.int64)
    except rans.RansError as exc:
        return str(exc)


def _same(a, b) -> bool:
    return a == b if isinstance(a, str) or isinstance(b, str) else np.array_equal(a, b)


def _adversarial_indices() -> list[tuple[np.ndarray, int]]:
    rng = np.random.default_rng(7)
    cases = [
        (np.ones(1, np.int64), 1),  # one symbol: frequency 2^15, f * 2^17 = 2^32
        (np.full(70_000, 1), 1),
        (np.arange(1 << rans.PROB_BITS), 15),  # the largest alphabet: every frequency 1
        (np.concatenate((np.zeros(200_000, np.int64), [65_535])), 16),  # a symbol of frequency 1 among 2^15
        (rng.integers(0, 1 << 16, 20_000), 16),
        (rng.integers(0, 2, 123_457), 1),  # flat: every step refills about half the lanes
        (skewed(9_999, 256, 0.3, seed=2), 8),
    ]
    return cases


@pytest.fixture(scope="module")
def jit():
    pytest.importorskip("numba", reason="the compiled kernels need numba (the numpy path is the fallback)")
    if rans._kernels() is None:
        pytest.skip("QPACK_NO_JIT is set")
    return rans._kernels()


@pytest.mark.parametrize("case", range(len(_adversarial_indices())))
def test_compiled_kernels_match_the_numpy_reference_bit_for_bit(jit, monkeypatch, case):
    indices, bits = _adversarial_indices()[case]
    compiled = rans.encode(indices)
    decoded = rans.decode(compiled, indices.size, bits)
    _numpy_path(monkeypatch)
    reference = rans.encode(indices)
    assert compiled == reference
    assert decoded.dtype == rans.decode(reference, indices.size, bits).dtype
    assert np.array_equal(decoded.astype(np.int64), indices)


@pytest.mark.parametrize("n, levels, scale", [(100_001, 16, 1.5), (300_000, 4096, 200.0), (50_000, 2, 0.05)])
def test_compiled_round_trip_matches_reference(jit, monkeypatch, n, levels, scale):
    indices = skewed(n, levels, scale, seed=n)
    bits = max(1, (levels - 1).bit_length())
    compiled = rans.encode(indices)
    assert np.array_equal(rans.decode(compiled, n, bits).astype(np.int64), indices)
    _numpy_path(monkeypatch)
    assert rans.encode(indices) == compiled


def _crafted_payloads(count: int, seed: int) -> list[tuple[bytes, int]]:
    """Random payloads that pass every header check (lanes, table, states in [2^16, 2^32)):
    their words decode to anything, run out or are left over."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        lanes = int(rng.integers(1, 40))
        numel = lanes * int(rng.integers(1, 30)) + int(rng.integers(0, lanes))
        alphabet = int(rng.integers(1, 9))
        freq = rans.normalize(rng.integers(1, 1000, alphabet))
        state = rng.integers(1 << 16, 1 << 32, lanes, dtype=np.int64)
        words = rng.integers(0, 1 << 16, int(rng.integers(0, numel + 1)))
        out.append((b"".join((np.array([lanes, alphabet], "<u4").tobytes(), freq.astype("<u2").tobytes(),
                              state.astype("<u4").tobytes(), words.astype("<u2").tobytes())), numel))
    return out


def test_compiled_decoder_agrees_on_damaged_and_crafted_payloads(jit, monkeypatch):
    payload, n, _, _ = _payload(1000, 4)
    rng = np.random.default_rng(5)
    inputs = _crafted_payloads(80, seed=1)
    for _ in range(80):
        damaged = bytearray(payload)
        for position in rng.integers(0, len(payload), rng.integers(1, 4)):
            damaged[position] = rng.integers(0, 256)
        inputs.append((bytes(damaged), n))
    compiled = [_outcome(rans.decode, data, count, 3) for data, count in inputs]
    _numpy_path(monkeypatch)
    reference = [_outcome(rans.decode, data, count, 3) for data, count in inputs]
    assert all(_same(a, b) for a, b in zip(compiled, reference))
    assert len({r for r in reference if isinstance(r, str)}) >= 3  # several kinds of failure


def test_compiled_decode_loop_matches_the_reference_state_by_state(jit):
    # below the final checks: the same indices and lane states on payloads that decode to
    # garbage, as long as the words last (the reference stops when they run out)
    for data, numel in _crafted_payloads(200, seed=3):
        freq, state, words = rans._parse(data, numel, 3)
        outs, states, errors = [], [], []
        for run in (rans._decode_numpy, lambda *a: rans._decode_jit(jit, *a)):
            out, lanes = np.zeros(numel, np.uint8), state.copy()
            try:
                run(out, freq, lanes, words)
                errors.append(None)
            except rans.RansError as exc:
                errors.append(str(exc))
            outs.append(out)
            states.append(lanes)
        assert errors[0] == errors[1]
        if "ends early" not in str(errors[0]):
            assert np.array_equal(*outs) and np.array_equal(*states)


@pytest.mark.parametrize("n, levels, scale", [(1, 2, 1.0), (7, 4, 1.0), (5000, 8, 1.0), (40_000, 16, 2.0),
                                             (20_001, 65536, 3.0), (30_000, 256, 6.0)])
def test_torch_decoder_on_cpu_matches_the_reference(n, levels, scale):
    indices = skewed(n, levels, scale, seed=n)
    bits = max(1, (levels - 1).bit_length())
    payload = rans.encode(indices)
    decoded = rans.decode_torch(payload, n, bits, "cpu")
    assert decoded.dtype == (torch.uint8 if levels <= 256 else torch.int32)
    assert np.array_equal(decoded.numpy().astype(np.int64), rans.decode(payload, n, bits).astype(np.int64))


def test_torch_decoder_agrees_on_damaged_and_crafted_payloads():
    payload, n, _, _ = _payload(300, 4)
    rng = np.random.default_rng(9)
    inputs = _crafted_payloads(25, seed=2)
    for _ in range(25):
        damaged = bytearray(payload)
        damaged[rng.integers(0, len(payload))] = rng.integers(0, 256)
        inputs.append((bytes(damaged), n))
    for data, count in inputs:
        expected = _outcome(rans.decode, data, count, 3)
        assert _same(_outcome(rans.decode_torch, data, count, 3, "cpu"), expected)


def test_reader_device_path_decodes_with_torch_bit_identical(tmp_path, skewed_weights):
    from qpack import reader as reader_module

    qpack.pack(skewed_weights, tmp_path / "coded.qpk", bits=5)
    with QpkReader(tmp_path / "coded.qpk") as reader:
        entry = reader.entry("fc.weight")
        assert entry.compression == "rans"
        stored = (tmp_path / "coded.qpk").read_bytes()[reader.data_start + entry.offset:][:entry.length]
        on_device = reader_module._rans_indices(entry, stored, torch.device("cpu"))  # the torch decoder
        on_cpu = reader_module._rans_indices(entry, stored, None)
        assert on_device.dtype == on_cpu.dtype and torch.equal(on_device, on_cpu)
        assert torch.equal(reader_module._pack_indices(entry, on_device), reader.read_payload("fc.weight"))
        assert torch.equal(reader_module.dequantize_indices(entry, on_device), reader.tensor("fc.weight"))
        with pytest.raises(FormatError, match="rANS payload is corrupted"):
            reader_module._rans_indices(entry, stored[:-2], torch.device("cpu"))


def test_import_qpack_does_not_import_numba():
    import subprocess
    import sys

    code = ("import sys, qpack; a = 'numba' in sys.modules; qpack.rans._kernels(); "
            "print(a, 'qpack.rans_jit' in sys.modules or qpack.rans._kernels() is None)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split() == ["False", "True"]
