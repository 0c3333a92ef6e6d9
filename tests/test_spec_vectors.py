"""The spec's test vectors: qpack decodes each to the values the spec gives, byte for byte,
and the writer still produces the committed version-5 bytes (a change that alters bytes
must change the spec and the vectors in the same commit). The version-1 to -4 vectors are
files of earlier versions, kept as they were: they must read bit-exactly forever."""

import hashlib
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import qpack
from qpack.codecs import raw, uniform

VECTORS = Path(__file__).resolve().parents[1] / "specs" / "vectors"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())
spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
make_vectors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_vectors)
LEGACY = sorted(make_vectors.legacy_inputs())
CURRENT = sorted(make_vectors.vector_inputs())


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector_decodes_to_spec_values(name):
    with qpack.QpkReader(VECTORS / f"{name}.qpk") as reader:
        assert reader.keys() == list(EXPECTED[name]["tensors"])
        for key, record in EXPECTED[name]["tensors"].items():
            tensor = reader.tensor(key)
            assert str(tensor.dtype).removeprefix("torch.") == record["dtype"]
            assert list(tensor.shape) == record["shape"]
            got = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            if "value_bytes_hex" in record:
                assert got.hex() == record["value_bytes_hex"], key
            else:  # long values: their length, first bytes and SHA-256 (make_vectors.value_record)
                assert (len(got), got[:64].hex()) == (record["value_bytes"], record["value_bytes_head_hex"]), key
                assert hashlib.sha256(got).hexdigest() == record["value_bytes_sha256"], key
            if "payload_hex" in record:
                assert reader.read_payload(key).numpy().tobytes().hex() == record["payload_hex"]
            if "rans_indices_packed_hex" in record:  # the spec's rANS decoding of the stored bytes
                assert reader.entry(key).compression == "rans" and reader.version in (2, 3, 4, 5)
                assert reader.read_payload(key).numpy().tobytes().hex() == record["rans_indices_packed_hex"]
            if "version" in record:  # version 3 to 5: what the spec's reading found in the header
                entry = reader.entry(key)
                assert reader.version == record["version"] == int(name[1])
                assert (entry.compression, entry.param_dtype) == (record["compression"], record["param_dtype"])
            if record["encoding"] == "derived":  # version 4: no payload, rebuilt from its source
                entry = reader.entry(key)
                assert entry.encoding == "derived" and entry.length == 0
                assert entry.params == {"source": record["source"], "rule": "nonzero"}
            if "params_hex" in record:  # the writer's min/max are the spec's outward rounding
                assert {k: v.hex() for k, v in reader.entry(key).params.items()} == record["params_hex"]


def test_vectors_cover_old_versions_and_every_version_5_feature():
    assert set(LEGACY) | set(CURRENT) == set(EXPECTED) and not set(LEGACY) & set(CURRENT)
    versions = set()
    for name in LEGACY:
        with qpack.QpkReader(VECTORS / f"{name}.qpk") as reader:
            versions.add(reader.version)
    assert versions == {1, 2, 3, 4}
    records = [r for name in CURRENT for r in EXPECTED[name]["tensors"].values()]
    assert {r["compression"] for r in records} >= {"none", "zstd_planes", "rans"}
    assert {r["param_dtype"] for r in records if r["encoding"] != "raw"} == {"float16", "float32", "uint8"}
    assert {r["encoding"] for r in records if r["param_dtype"] == "float16"} == {"uniform", "kmeans"}
    assert all(r["header_compressed"] for r in records)
    derived = [r for r in records if r["encoding"] == "derived"]
    assert {r["dtype"] for r in derived} == {"float32", "bool", "uint8"}
    assert {r["version"] for r in records} == {5}


@pytest.mark.parametrize("name", CURRENT)
def test_writer_reproduces_vector_bytes(name, tmp_path):
    state, options = make_vectors.vector_inputs()[name]
    qpack.pack(state, tmp_path / "v.qpk", **options)
    assert (tmp_path / "v.qpk").read_bytes() == (VECTORS / f"{name}.qpk").read_bytes()


def test_vector_inputs_match_the_spec_values():
    # the expected values were computed by a numpy re-implementation of the spec, and the
    # writer's inputs still give them
    state, _ = make_vectors.legacy_inputs()["uniform_b2"]
    rebuilt, _ = make_vectors.spec_uniform(state["w"].numpy(), 2, 1)
    assert rebuilt.reshape(-1).tolist()[:4] == [-1.0, -0.333333313465118408203125, 0.33333337306976318359375, 1.0]


def test_float16_worked_example_of_the_spec():
    # spec 3.2: values in [-0.1, 0.3], 2 bits, float16 min rounded down and max rounded up
    lo, hi = make_vectors.float16_outward(np.float32([-0.1]), np.float32([0.3]))
    assert lo.astype(np.float16).tobytes().hex() == "67ae" and hi.astype(np.float16).tobytes().hex() == "cd34"
    ours = uniform.as_float16({"min": torch.tensor([-0.1]), "max": torch.tensor([0.3])})
    assert ours["min"].item() == lo[0] == -0.10003662109375 and ours["max"].item() == hi[0] == 0.300048828125
    step = uniform.step_of(ours["min"], ours["max"], 2)
    assert step.view(torch.int32).item() == 0x3E089000
    levels = uniform.dequantize(torch.arange(4), ours, 2, (4,), torch.float32)
    assert levels.tolist() == [-0.10003662109375, 0.0333251953125, 0.16668701171875, 0.300048828125]


def test_uint8_worked_example_of_the_spec():
    # spec 3.2: two rows, minima -0.5, -0.25 and maxima 0.5, 1.0
    lo, hi = np.float32([-0.5, -0.25]), np.float32([0.5, 1.0])
    new_lo, new_hi, a, b, base = make_vectors.spec_uint8_params(lo, hi)
    assert base.view(np.uint32).tolist() == [0xBF000000, 0x3A808081, 0x3F000000, 0x3B008081]
    assert a.tolist() == b.tolist() == [0, 255] and new_lo.tolist() == [-0.5, -0.25] and new_hi.tolist() == [0.5, 1.0]
    decoded, stored = uniform.as_uint8({"min": torch.from_numpy(lo), "max": torch.from_numpy(hi)})
    assert stored["base"].tobytes() == base.tobytes() and stored["min"].tolist() == [0, 255]
    assert decoded["min"].tolist() == [-0.5, -0.25] and decoded["max"].tolist() == [0.5, 1.0]


def test_byte_planes_worked_example_of_the_spec():
    data = np.float32([1.0, 2.0]).tobytes()
    planes = raw.split_planes(data, 4)
    assert planes.hex() == "0000000080003f40"
    assert raw.join_planes(torch.frombuffer(bytearray(planes), dtype=torch.uint8), 4).numpy().tobytes() == data
