"""A keyed bijection of ``[0, n)`` in O(1) memory: a Feistel network with cycle walking.

Shuffling a domain of 10**10 samples with an index array would cost 80 GB;
this costs nothing to build and a few vectorised passes per lookup. The
network permutes ``[0, 4**h)`` (the smallest power of four at or above ``n``);
an output at or beyond ``n`` is fed through again ("cycle walking"), which
stays a bijection of ``[0, n)`` and needs under 4 passes on average.

Every argument may be an array: one call permutes samples of many domains
(each with its own ``n`` and key), so a batch costs the same few numpy calls
whether it draws from 4 domains or 10,000.
"""

from __future__ import annotations

import numpy as np

from loaders.rng import hash_array, mix64

ROUNDS = 4


def half_bits(n: int) -> int:
    """Bits in each half of the Feistel block that covers ``[0, n)``."""
    return (max(2, (n - 1).bit_length()) + 1) // 2


def permute(
    indices: np.ndarray,
    n: int | np.ndarray,
    key: int | np.ndarray,
    half: int | np.ndarray | None = None,
) -> np.ndarray:
    """Image of each ``indices[i]`` (in ``[0, n[i])``) under the permutation named by ``key[i]``.

    ``n`` and ``key`` broadcast against ``indices``; ``half`` is ``half_bits(n)``
    and may be passed in when the caller has it precomputed. Returns ``int64``.
    The same ``(n, key)`` always gives the same permutation.
    """
    x = np.asarray(indices, dtype=np.uint64)
    n = np.broadcast_to(np.asarray(n, dtype=np.uint64), x.shape)
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), x.shape)
    if half is None:
        half = np.array([half_bits(int(v)) for v in n.ravel()], dtype=np.uint64).reshape(x.shape)
    half = np.broadcast_to(np.asarray(half, dtype=np.uint64), x.shape)
    if x.size and (x >= n).any():
        raise ValueError("permute: every index must lie in [0, n)")

    def network(v: np.ndarray, h: np.ndarray, k: np.ndarray) -> np.ndarray:
        mask = (np.uint64(1) << h) - np.uint64(1)
        left, right = v >> h, v & mask
        for r in range(ROUNDS):
            round_key = hash_array(r, k)
            left, right = right, left ^ (mix64(right ^ round_key) & mask)
        return (left << h) | right

    out = network(x, half, key)
    walking = np.flatnonzero(out >= n)
    while walking.size:
        out[walking] = network(out[walking], half[walking], key[walking])
        walking = walking[out[walking] >= n[walking]]
    return out.astype(np.int64)
