"""rANS entropy coding of index streams (spec section 4.1, compression ``"rans"``).

The indices are split round-robin over N lanes (index i belongs to lane i mod N, step
i div N). Each lane is an rANS coder with a 32-bit state in [2^16, 2^32), probabilities
quantized to 2^15 and 16-bit renormalisation, so a symbol moves at most one word. All lanes
share one word stream, read in step order and, within a step, in lane order. That makes
every step one set of numpy operations over the lanes: the Python loop runs over steps (at
most 2^16 of them, a limit the reader checks), never over indices.

Three implementations of the same loop, equal bit for bit (the tests compare them):

- the compiled kernels of :mod:`qpack.rans_jit` (numba), used when numba is installed and
  ``QPACK_NO_JIT`` is not set: 300-400 M indices/s per core;
- the numpy loops here, the reference and the fallback;
- :func:`decode_torch`, the numpy loop in torch operations, which decodes on an accelerator
  (``qpack.load(device="cuda")``) so that only stored bytes cross the bus.

Payload layout, little-endian:

    u32 lanes N | u32 alphabet A | A x u16 frequency | N x u32 state | W x u16 word

Decoding ends with every word read and every lane back at 2^16, the encoder's start state:
a corrupted stream that still passes the CRC cannot decode silently to other indices.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from .jit import kernels

__all__ = ["PROB_BITS", "STATE_LOW", "MAX_STEPS", "WRITER_STEPS", "RansError", "normalize", "coded_bits",
           "choose_lanes", "encoded_size", "encode", "decode", "decode_torch"]

#: frequencies sum to 2^PROB_BITS
PROB_BITS = 15
_TOTAL = 1 << PROB_BITS
#: lane states live in [STATE_LOW, 2^32); 16-bit words move in and out
STATE_LOW = 1 << 16
_WORD_BITS = 16
#: a payload has at most this many steps (lanes >= ceil(numel / MAX_STEPS)), spec R19: each
#: step costs a reader a few numpy calls, so this bounds the work a payload's bytes can ask for;
#: qpack's writer has used at most this many since the first release that wrote rANS
MAX_STEPS = 1 << 13
#: header bytes before the frequencies
_FIXED = 8
#: the writer gives lane states about this share of the coded bytes ...
_LANE_SHARE = 0.005
#: ... but uses at most this many steps: each step costs a few microseconds of numpy calls,
#: so very skewed indices (few coded bytes) get more lanes, 4 bytes per 8,192 indices
WRITER_STEPS = MAX_STEPS


class RansError(ValueError):
    """A rANS payload that does not follow spec section 4.1."""


def normalize(counts: np.ndarray) -> np.ndarray | None:
    """Frequencies summing to 2^15, at least 1 for every symbol that occurs, near ``counts``.

    Every present symbol first gets 1, the rest of the total is shared in proportion to the
    counts, and what rounding down leaves goes to the largest remainders. Returns None when
    more than 2^15 distinct symbols occur (no valid table exists).
    """
    counts = np.asarray(counts, dtype=np.int64)
    present = counts > 0
    used = int(np.count_nonzero(present))
    if used == 0 or used > _TOTAL:
        return None
    share = counts * ((_TOTAL - used) / float(counts.sum()))
    freq = np.floor(share).astype(np.int64) + present
    left = _TOTAL - int(freq.sum())
    if left > 0:  # at most `used`: each floor lost less than one
        remainder = np.where(present, share - np.floor(share), -1.0)
        freq[np.argsort(-remainder, kind="stable")[:left]] += 1
    return freq


def coded_bits(counts: np.ndarray, freq: np.ndarray) -> float:
    """Bits the symbols cost under ``freq`` (the lanes' start and end states aside)."""
    counts = np.asarray(counts, dtype=np.int64)
    used = counts > 0
    return float(-(counts[used] * np.log2(freq[used] / _TOTAL)).sum())


def choose_lanes(numel: int, payload_bits: float) -> int:
    """Lanes for ``numel`` indices: few enough that their states cost about 0.5 % of the
    coded bits, and enough that decoding takes at most 8,192 steps."""
    by_share = int(payload_bits / 8 * _LANE_SHARE / 4)
    return max(1, min(numel, max(by_share, -(-numel // WRITER_STEPS))))


def encoded_size(numel: int, counts: np.ndarray) -> int | None:
    """Bytes :func:`encode` will take for indices with these counts (within a few bytes)."""
    freq = normalize(counts)
    if freq is None:
        return None
    bits = coded_bits(counts, freq)
    lanes = choose_lanes(numel, bits)
    alphabet = int(np.flatnonzero(freq)[-1]) + 1
    return _FIXED + 2 * alphabet + 4 * lanes + 2 * math.ceil(bits / _WORD_BITS)


def encode(indices: np.ndarray, counts: np.ndarray | None = None) -> bytes | None:
    """The rANS payload of ``indices`` (a 1-D array of non-negative integers).

    ``counts`` (how often each value occurs) is computed when not given. Returns None when no
    frequency table exists (more than 2^15 distinct values).
    """
    indices = np.ascontiguousarray(indices).reshape(-1)
    numel = indices.size
    if numel == 0:
        return None
    if counts is None:
        counts = np.bincount(indices)
    freq = normalize(counts)
    if freq is None:
        return None
    alphabet = int(np.flatnonzero(freq)[-1]) + 1
    freq = freq[:alphabet]
    start = np.concatenate(([0], np.cumsum(freq)[:-1]))
    lanes = choose_lanes(numel, coded_bits(counts[:alphabet], freq))
    jit = _kernels()
    if jit is not None:
        state, words = _encode_jit(jit, indices, lanes, freq, start)
    else:
        state, words = _encode_numpy(indices, lanes, freq, start)
    return b"".join((np.array([lanes, alphabet], "<u4").tobytes(), freq.astype("<u2").tobytes(),
                     state.astype("<u4").tobytes(), words.tobytes()))


def _encode_jit(jit: Any, indices: np.ndarray, lanes: int, freq: np.ndarray,
                start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if indices.dtype not in _JIT_INDEX_TYPES:
        indices = indices.astype(np.int64)
    state = np.full(lanes, STATE_LOW, dtype=np.int64)
    words = np.empty(indices.size, dtype="<u2")  # at most one word per index
    begin = jit.encode_into(indices, lanes, freq, start.astype(np.int64), state, words)
    return state, words[begin:]


def _encode_numpy(indices: np.ndarray, lanes: int, freq: np.ndarray,
                  start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The reference encoder: one set of numpy operations per step, over all lanes."""
    numel = indices.size
    steps = -(-numel // lanes)
    state = np.full(lanes, STATE_LOW, dtype=np.int64)
    chunks: list[np.ndarray] = []
    # the decoder reads step by step from the first; the encoder therefore runs backwards
    for step in range(steps - 1, -1, -1):
        first = step * lanes
        symbols = indices[first:first + lanes]
        active = state[:symbols.size]
        f, s = freq[symbols], start[symbols]
        # a symbol of frequency f needs its state below f * 2^17 before it is coded
        spill = np.flatnonzero(active >= f << (PROB_BITS + 2))
        chunks.append((active[spill] & 0xFFFF).astype("<u2"))
        active[spill] >>= _WORD_BITS
        quotient = active // f
        active += quotient * (_TOTAL - f) + s  # (x // f) * 2^15 + x % f + start
    words = np.concatenate(chunks[::-1]) if chunks else np.empty(0, "<u2")
    return state, words


def decode(payload: bytes | memoryview, numel: int, bits: int) -> np.ndarray:
    """The ``numel`` indices (each below 2^bits) a rANS payload holds.

    Every length and count is checked before the data is touched (spec R19); the decode
    must end with all words read and every lane at its start state.

    Raises:
        RansError: the payload does not follow spec section 4.1.
    """
    freq, state, words = _parse(payload, numel, bits)
    out = np.empty(numel, dtype=np.uint8 if freq.size <= 256 else np.uint16)
    jit = _kernels()
    if jit is not None:
        _decode_jit(jit, out, freq, state, words)
    else:
        _decode_numpy(out, freq, state, words)
    if np.any(state != STATE_LOW):
        raise RansError("a lane did not end at its start state (the stream is corrupted)")
    return out


def _parse(payload: bytes | memoryview, numel: int, bits: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The checked frequencies, lane states (both int64 copies) and words (a view) of a payload."""
    data = memoryview(payload).cast("B")
    if numel < 1:
        raise RansError("no indices to decode")
    if len(data) < _FIXED:
        raise RansError(f"{len(data)} bytes, shorter than the {_FIXED}-byte rANS header")
    lanes, alphabet = (int(v) for v in np.frombuffer(data, "<u4", count=2))
    if not 1 <= lanes <= numel or -(-numel // lanes) > MAX_STEPS:
        raise RansError(f"{lanes} lanes for {numel} indices (need 1..numel lanes and at most {MAX_STEPS} steps)")
    if not 1 <= alphabet <= 1 << bits:
        raise RansError(f"alphabet of {alphabet} symbols for {bits}-bit indices")
    states_at = _FIXED + 2 * alphabet
    words_at = states_at + 4 * lanes
    if len(data) < words_at or (len(data) - words_at) % 2:
        raise RansError(f"{len(data)} bytes do not hold {alphabet} frequencies, {lanes} states and whole words")
    word_count = (len(data) - words_at) // 2
    if word_count > numel:
        raise RansError(f"{word_count} words for {numel} indices (at most one word per index)")
    freq = np.frombuffer(data, "<u2", count=alphabet, offset=_FIXED).astype(np.int64)
    if int(freq.sum()) != _TOTAL:
        raise RansError(f"frequencies sum to {int(freq.sum())}, not {_TOTAL}")
    state = np.frombuffer(data, "<u4", count=lanes, offset=states_at).astype(np.int64)
    if int(state.min()) < STATE_LOW:
        raise RansError(f"a lane state is below {STATE_LOW}")
    words = np.frombuffer(data, "<u2", count=word_count, offset=words_at)
    return freq, state, words


def _slot_tables(freq: np.ndarray, symbol_type: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per slot of [0, 2^15): its symbol, the symbol's frequency, and ``slot - start``."""
    symbol_of_slot = np.repeat(np.arange(freq.size, dtype=np.int64), freq)
    freq_of_slot = freq[symbol_of_slot]
    # x' = f * (x >> 15) + (slot - start): the second term depends on the slot alone
    bias_of_slot = np.arange(_TOTAL, dtype=np.int64) - (np.cumsum(freq) - freq)[symbol_of_slot]
    return symbol_of_slot.astype(symbol_type), freq_of_slot, bias_of_slot


def _decode_jit(jit: Any, out: np.ndarray, freq: np.ndarray, state: np.ndarray, words: np.ndarray) -> None:
    read = jit.decode_into(out, state, words, freq)
    if read > words.size:
        raise RansError("the word stream ends early")
    if read != words.size:
        raise RansError(f"{words.size - read} words left after the last index")


def _decode_numpy(out: np.ndarray, freq: np.ndarray, state: np.ndarray, words: np.ndarray) -> None:
    """The reference decoder: one set of numpy operations per step, over all lanes."""
    symbol_of_slot, freq_of_slot, bias_of_slot = _slot_tables(freq, out.dtype)
    numel, lanes, word_count = out.size, state.size, words.size
    words = words.astype(np.int64)
    read = 0
    for first in range(0, numel, lanes):
        active = state[:min(lanes, numel - first)]
        slot = active & (_TOTAL - 1)
        out[first:first + active.size] = symbol_of_slot[slot]
        active >>= PROB_BITS
        active *= freq_of_slot[slot]
        active += bias_of_slot[slot]
        refill = np.flatnonzero(active < STATE_LOW)
        if refill.size:
            if read + refill.size > word_count:
                raise RansError("the word stream ends early")
            active[refill] = (active[refill] << _WORD_BITS) | words[read:read + refill.size]
            read += refill.size
    if read != word_count:
        raise RansError(f"{word_count - read} words left after the last index")


def decode_torch(payload: bytes | memoryview, numel: int, bits: int,
                 device: str | torch.device = "cpu") -> torch.Tensor:
    """:func:`decode` on ``device``: the indices as a 1-D tensor there (uint8 when the
    alphabet has at most 256 symbols, else int32), equal to :func:`decode`'s bit for bit.

    The payload is checked here as :func:`decode` checks it; then only its stored parts (the
    frequency table, the lane states and the words) cross to the device, where each step of
    all lanes is one set of torch operations, one lane per thread. Nothing waits on the
    device until the end: a word's position is the running count of refills (a cumulative
    sum over the step's lanes), and a stream that ends early shows in the final count.

    Raises:
        RansError: the payload does not follow spec section 4.1.
    """
    freq, state, words = _parse(payload, numel, bits)
    device = torch.device(device)
    # int16 carries the words' bits across (torch has no full uint16 arithmetic)
    stored = torch.from_numpy(np.array(words.view(np.int16))).to(device, non_blocking=True)
    f = torch.from_numpy(freq).to(device)
    x = torch.from_numpy(state).to(device)
    word_count = stored.numel()
    # at least one word, so the (clamped) gathers below always have something to read
    words_t = stored.to(torch.int64).bitwise_and_(0xFFFF) if word_count else torch.zeros(1, dtype=torch.int64,
                                                                                        device=device)
    out_type = torch.uint8 if freq.size <= 256 else torch.int32
    symbol_of_slot = torch.repeat_interleave(torch.arange(freq.size, device=device), f, output_size=_TOTAL)
    freq_of_slot = f[symbol_of_slot]
    bias_of_slot = torch.arange(_TOTAL, device=device) - (torch.cumsum(f, 0) - f)[symbol_of_slot]
    symbol_of_slot = symbol_of_slot.to(out_type)
    lanes = x.numel()
    steps = -(-numel // lanes)
    out = torch.empty(steps * lanes, dtype=out_type, device=device)
    rows = out.view(steps, lanes)
    read = torch.zeros(1, dtype=torch.int64, device=device)
    last = words_t.numel() - 1
    for step in range(steps):
        count = min(lanes, numel - step * lanes)
        active = x if count == lanes else x[:count]
        slot = active.bitwise_and(_TOTAL - 1)
        torch.index_select(symbol_of_slot, 0, slot, out=rows[step, :count])
        active = torch.addcmul(bias_of_slot[slot], freq_of_slot[slot], active.bitwise_right_shift(PROB_BITS))
        need = active < STATE_LOW
        taken = torch.cumsum(need, 0)
        position = (taken + (read - 1)).clamp_(0, last)
        refilled = active.bitwise_left_shift(_WORD_BITS).bitwise_or_(words_t[position])
        active = torch.where(need, refilled, active)
        read = read + taken[-1:]
        x = active if count == lanes else torch.cat((active, x[count:]))
    read_count = int(read)  # the one wait on the device
    if read_count > word_count:
        raise RansError("the word stream ends early")
    if read_count != word_count:
        raise RansError(f"{word_count - read_count} words left after the last index")
    if bool(torch.any(x != STATE_LOW)):
        raise RansError("a lane did not end at its start state (the stream is corrupted)")
    return out[:numel]


_JIT_INDEX_TYPES = tuple(np.dtype(t) for t in (np.uint8, np.uint16, np.int16, np.int32, np.int64))


def _kernels() -> Any:
    """The compiled kernels (:mod:`qpack.rans_jit`), or None for the numpy path."""
    return kernels("qpack.rans_jit")
