"""A keyed bijection of ``[0, n)`` in O(1) memory: a Feistel network with cycle walking.

Shuffling a domain of 10**10 samples with an index array would cost 80 GB;
this costs nothing to build and a few vectorised passes per lookup. The
network permutes ``[0, 2**m)``, the smallest power of two at or above ``n``,
split into a high and a low part of ``ceil(m/2)`` and ``floor(m/2)`` bits;
each round XORs one part with a keyed hash of the other, which is invertible
whatever the widths. An output at or beyond ``n`` is fed through again
("cycle walking"): still a bijection of ``[0, n)``, and since ``2**m < 2n``
fewer than two passes on average.

Every argument may be an array: one call permutes samples of many domains
(each with its own ``n`` and key), so a batch costs the same few numpy calls
whether it draws from 4 domains or 10,000.
"""

from __future__ import annotations

import numpy as np

from loaders.rng import mix64

ROUNDS = 4
_ROUND_TAGS = [mix64(np.array([r], dtype=np.uint64))[0] for r in range(ROUNDS)]
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_THIRTY_TWO = np.uint64(32)


def _round(half: np.ndarray, round_key: np.ndarray) -> np.ndarray:
    """The round function: multiply-shift hashing of a half block (at most 32 bits) under a 64-bit key.

    The key is a full 64-bit hash per element, so a cheap multiply-shift is
    enough to make each round a keyed pseudo-random function of the half.
    """
    mixed = (half ^ round_key) * _MULTIPLIER
    return mixed ^ (mixed >> _THIRTY_TWO)


def block_bits(n: int) -> int:
    """``m`` such that ``2**m`` is the smallest power of two >= ``n`` (at least 1)."""
    return max(1, (n - 1).bit_length())


def permute(
    indices: np.ndarray,
    n: int | np.ndarray,
    key: int | np.ndarray,
    bits: int | np.ndarray | None = None,
) -> np.ndarray:
    """Image of each ``indices[i]`` (in ``[0, n[i])``) under the permutation named by ``key[i]``.

    ``n`` and ``key`` broadcast against ``indices``; ``bits`` is ``block_bits(n)``
    and may be passed in when the caller has it precomputed. Returns ``int64``.
    The same ``(n, key)`` always gives the same permutation.
    """
    x = np.asarray(indices, dtype=np.uint64)
    shape = x.shape
    x = x.ravel()  # cycle walking works on flat positions
    n = np.broadcast_to(np.asarray(n, dtype=np.uint64), shape).ravel()
    if bits is None:
        bits = np.array([block_bits(int(v)) for v in n], dtype=np.uint64)
    bits = np.broadcast_to(np.asarray(bits, dtype=np.uint64), shape).ravel()
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), shape).ravel()
    if x.size and (x >= n).any():
        raise ValueError("permute: every index must lie in [0, n)")

    one = np.uint64(1)
    low_bits = bits >> one
    low_mask = (one << low_bits) - one
    high_mask = (one << (bits - low_bits)) - one
    round_keys = [key ^ tag for tag in _ROUND_TAGS]

    def network(v: np.ndarray, at: np.ndarray | slice) -> np.ndarray:
        shift = low_bits[at]
        high, low = v >> shift, v & low_mask[at]
        for r in range(0, ROUNDS, 2):
            high ^= _round(low, round_keys[r][at]) & high_mask[at]
            low ^= _round(high, round_keys[r + 1][at]) & low_mask[at]
        return (high << shift) | low

    out = network(x, slice(None))
    walking = np.flatnonzero(out >= n)
    while walking.size:
        out[walking] = network(out[walking], walking)
        walking = walking[out[walking] >= n[walking]]
    return out.astype(np.int64).reshape(shape)
