"""A keyed bijection of ``[0, n)`` in O(1) memory: a Feistel network with cycle walking.

Shuffling a domain of 10**10 samples with an index array would cost 80 GB;
this costs nothing to build and a few nanoseconds per lookup. The
network permutes ``[0, 2**m)``, the smallest power of two at or above ``n``,
split into a high and a low part of ``ceil(m/2)`` and ``floor(m/2)`` bits;
each round XORs one part with a keyed hash of the other, which is invertible
whatever the widths. An output at or beyond ``n`` is fed through again
("cycle walking"): still a bijection of ``[0, n)``, and since ``2**m < 2n``
fewer than two passes on average.

Every argument may be an array: one call permutes samples of many domains
(each with its own ``n`` and key). The network itself is
``plan_kernels.feistel``, compiled and run one element at a time, cycle
walking included, so a plan call that permutes a few hundred samples pays
no numpy call overhead.
"""

from __future__ import annotations

import numpy as np

from onlinemix.loaders.plan_kernels import permute_each


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
    x = x.ravel()
    n = np.broadcast_to(np.asarray(n, dtype=np.uint64), shape).ravel()
    if bits is None:
        bits = np.array([block_bits(int(v)) for v in n], dtype=np.uint64)
    bits = np.broadcast_to(np.asarray(bits, dtype=np.uint64), shape).ravel()
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), shape).ravel()
    if x.size and (x >= n).any():
        raise ValueError("permute: every index must lie in [0, n)")
    out = np.empty(x.size, dtype=np.int64)
    permute_each(x, n, key, bits, out)
    return out.reshape(shape)
