"""Compiled rANS kernels (numba) for the payload layout of spec section 4.1.

:mod:`qpack.rans` validates a payload and then calls these loops, which do exactly what its
numpy reference does, one index at a time in the order the spec defines (step by step, lane
by lane within a step), so the result is the same bit for bit. Importing this module imports
numba (about 0.3 s), so :mod:`qpack.rans` imports it only on the first rANS decode or encode;
``QPACK_NO_JIT=1`` or a missing numba keeps the numpy path.

The loops are compiled on their first call and cached on disk (``cache=True``): next to this
file when its folder is writable, otherwise in numba's per-user cache folder (or
``NUMBA_CACHE_DIR``). They release the GIL, so ``qpack.load``'s threads decode tensors in
parallel.
"""

from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["decode_into", "encode_into"]

_PROB_BITS = 15
_SLOT_MASK = (1 << _PROB_BITS) - 1
_STATE_LOW = 1 << 16


_U16 = np.uint32(16)
_U15 = np.uint32(15)


@njit(cache=True, nogil=True, boundscheck=False)
def decode_into(out: np.ndarray, state: np.ndarray, words: np.ndarray,
                freq: np.ndarray) -> int:  # pragma: no cover - compiled
    """Decode ``out.size`` indices; returns the number of words read, or ``words.size + 1``
    when the stream ran out.

    ``state`` (one per lane, validated by the caller: in [2^16, 2^32)) is updated in place;
    ``freq`` is the validated table (it sums to 2^15).
    """
    # per slot: its symbol, and its frequency (low 16 bits) with slot - start (bits 16..30)
    symbol_of_slot = np.empty(1 << _PROB_BITS, out.dtype)
    entry_of_slot = np.empty(1 << _PROB_BITS, np.uint32)
    slot = 0
    for symbol in range(freq.size):
        f = freq[symbol]
        for k in range(f):
            symbol_of_slot[slot] = symbol
            entry_of_slot[slot] = np.uint32(f) | (np.uint32(k) << _U16)
            slot += 1
    numel = out.size
    lanes = state.size
    word_count = words.size
    read = 0
    first = 0
    while first < numel:
        count = min(lanes, numel - first)
        if read + count <= word_count:
            # the whole step's refills are in the stream: no bounds check, and a branch-free
            # refill (whether a lane needs a word is as unpredictable as the data)
            for lane in range(count):
                x = np.uint32(state[lane])
                slot = x & np.uint32(_SLOT_MASK)
                out[first + lane] = symbol_of_slot[slot]
                entry = entry_of_slot[slot]
                x = (entry & np.uint32(0xFFFF)) * (x >> _U15) + (entry >> _U16)
                refilled = (x << _U16) | np.uint32(words[read])
                need = x < np.uint32(_STATE_LOW)
                x = refilled if need else x
                read += need
                state[lane] = x
        else:
            for lane in range(count):
                x = np.uint32(state[lane])
                slot = x & np.uint32(_SLOT_MASK)
                out[first + lane] = symbol_of_slot[slot]
                entry = entry_of_slot[slot]
                x = (entry & np.uint32(0xFFFF)) * (x >> _U15) + (entry >> _U16)
                if x < np.uint32(_STATE_LOW):
                    if read >= word_count:
                        return word_count + 1
                    x = (x << _U16) | np.uint32(words[read])
                    read += 1
                state[lane] = x
        first += count
    return read


@njit(cache=True, nogil=True, boundscheck=False)
def encode_into(indices: np.ndarray, lanes: int, freq: np.ndarray, start: np.ndarray,
                state: np.ndarray, words: np.ndarray) -> int:  # pragma: no cover - compiled
    """Encode ``indices`` over ``lanes`` lanes, backwards; returns where the words begin.

    ``state`` (one per lane, all 2^16) ends as the payload's lane states; the word stream is
    ``words[begin:]``, filled from the end (``words`` has one slot per index, the most a
    stream can take). Lanes run in reverse within a step so the words of a step land in lane
    order, and each step's words before the next step's: the order the decoder reads.
    """
    alphabet = freq.size
    spill_at = np.empty(alphabet, np.int64)  # f * 2^17 is 2^32 for a lone symbol
    reciprocal = np.empty(alphabet, np.float64)
    for symbol in range(alphabet):
        spill_at[symbol] = np.int64(freq[symbol]) << (_PROB_BITS + 2)
        reciprocal[symbol] = 1.0 / freq[symbol] if freq[symbol] else 0.0
    numel = indices.size
    position = words.size
    for step in range((numel + lanes - 1) // lanes - 1, -1, -1):
        first = step * lanes
        for lane in range(min(lanes, numel - first) - 1, -1, -1):
            symbol = indices[first + lane]
            f = np.int64(freq[symbol])
            x = np.int64(state[lane])
            # a symbol of frequency f needs its state below f * 2^17 before it is coded
            if x >= spill_at[symbol]:
                position -= 1
                words[position] = x & 0xFFFF
                x >>= 16
            # x // f through the reciprocal (a division costs several times more); the
            # product is within 2^-20 of x / f, so the quotient is off by at most one
            quotient = np.int64(np.float64(x) * reciprocal[symbol])
            remainder = x - quotient * f
            if remainder < 0:
                quotient -= 1
                remainder += f
            elif remainder >= f:
                quotient += 1
                remainder -= f
            state[lane] = (quotient << _PROB_BITS) + remainder + start[symbol]
    return position
