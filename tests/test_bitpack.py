import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qpack.bitpack import pack_bits, packed_size, unpack_bits


def reference_pack(indices: np.ndarray, bits: int) -> bytes:
    """Slow, obviously correct packer straight from the spec: LSB-first bit stream."""
    out = bytearray(packed_size(len(indices), bits))
    for i, value in enumerate(indices.tolist()):
        for j in range(bits):
            if value >> j & 1:
                s = i * bits + j
                out[s // 8] |= 1 << (s % 8)
    return bytes(out)


@pytest.mark.parametrize("bits", range(1, 17))
@pytest.mark.parametrize("count", [0, 1, 7, 8, 9, 15, 16, 17, 255])
def test_matches_reference_and_round_trips(bits, count):
    rng = np.random.default_rng(bits * 1000 + count)
    indices = rng.integers(0, 1 << bits, count)
    packed = pack_bits(torch.from_numpy(indices), bits)
    assert packed.dtype == torch.uint8
    assert packed.numel() == (count * bits + 7) // 8
    assert packed.numpy().tobytes() == reference_pack(indices, bits)
    unpacked = unpack_bits(packed, bits, count)
    assert np.array_equal(unpacked.numpy(), indices)


@pytest.mark.parametrize("bits", range(1, 17))
def test_extreme_values(bits):
    top = (1 << bits) - 1
    indices = torch.tensor([top, 0, top, top, 0, 1, top, top - 1, top] * 3)
    assert torch.equal(unpack_bits(pack_bits(indices, bits), bits, indices.numel()).long(), indices)


def test_spec_worked_example():
    # specs/qpk-format.md section 4: bits 3, indices [5, 1, 7, 2] -> CD 05
    packed = pack_bits(torch.tensor([5, 1, 7, 2]), 3)
    assert packed.tolist() == [0xCD, 0x05]


def test_unused_high_bits_are_zero():
    packed = pack_bits(torch.tensor([1]), 1)
    assert packed.tolist() == [1]
    packed = pack_bits(torch.tensor([7, 7, 7]), 3)  # 9 bits -> second byte holds one bit
    assert packed.tolist() == [0xFF, 0x01]


@pytest.mark.parametrize("bits", [0, 17, -1])
def test_bad_bits(bits):
    with pytest.raises(ValueError):
        pack_bits(torch.tensor([0]), bits)


def test_short_buffer():
    with pytest.raises(ValueError):
        unpack_bits(torch.zeros(2, dtype=torch.uint8), 5, 4)


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(1, 16), data=st.data())
def test_round_trip_property(bits, data):
    values = data.draw(st.lists(st.integers(0, (1 << bits) - 1), max_size=100))
    indices = torch.tensor(values, dtype=torch.int64)
    assert unpack_bits(pack_bits(indices, bits), bits, len(values)).tolist() == values
