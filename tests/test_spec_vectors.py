"""The spec's test vectors: qpack decodes each to the values the spec gives, byte for byte,
and the writer still produces the committed bytes (a change that alters bytes must change
the spec and the vectors in the same commit)."""

import importlib.util
import json
from pathlib import Path

import pytest
import torch

import qpack

VECTORS = Path(__file__).resolve().parents[1] / "specs" / "vectors"
EXPECTED = json.loads((VECTORS / "expected.json").read_text())
spec = importlib.util.spec_from_file_location("make_vectors", VECTORS / "make_vectors.py")
make_vectors = importlib.util.module_from_spec(spec)
spec.loader.exec_module(make_vectors)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_vector_decodes_to_spec_values(name):
    with qpack.QpkReader(VECTORS / f"{name}.qpk") as reader:
        assert reader.keys() == list(EXPECTED[name]["tensors"])
        for key, record in EXPECTED[name]["tensors"].items():
            tensor = reader.tensor(key)
            assert str(tensor.dtype).removeprefix("torch.") == record["dtype"]
            assert list(tensor.shape) == record["shape"]
            got = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b""
            assert got.hex() == record["value_bytes_hex"], key
            if "payload_hex" in record:
                assert reader.read_payload(key).numpy().tobytes().hex() == record["payload_hex"]
            if "rans_indices_packed_hex" in record:  # the spec's rANS decoding of the stored bytes
                assert reader.entry(key).compression == "rans" and reader.version == 2
                assert reader.read_payload(key).numpy().tobytes().hex() == record["rans_indices_packed_hex"]


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_writer_reproduces_vector_bytes(name, tmp_path):
    state, options = make_vectors.vector_inputs()[name]
    qpack.pack(state, tmp_path / "v.qpk", **options)
    assert (tmp_path / "v.qpk").read_bytes() == (VECTORS / f"{name}.qpk").read_bytes()


def test_vector_inputs_match_the_spec_values():
    # the expected values were computed by a numpy re-implementation of the spec, and the
    # writer's inputs still give them
    state, _ = make_vectors.vector_inputs()["uniform_b2"]
    rebuilt, _ = make_vectors.spec_uniform(state["w"].numpy(), 2, 1)
    assert rebuilt.reshape(-1).tolist()[:4] == [-1.0, -0.333333313465118408203125, 0.33333337306976318359375, 1.0]
