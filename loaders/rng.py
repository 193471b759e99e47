"""Counter-based randomness: every random choice is a hash of its coordinates.

The plan never keeps a random-number generator whose state would have to be
carried across workers, ranks or checkpoints. Instead each decision is a pure
function of ``(seed, what, batch, ...)`` through a 64-bit mixing hash
(SplitMix64's finaliser), vectorised over numpy ``uint64`` arrays. It is not
cryptographic; it is stable across platforms, numpy versions and processes,
which Python's salted ``hash()`` is not.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
_MASK64 = (1 << 64) - 1
_INV_2_53 = 1.0 / (1 << 53)

# Stream tags keep the hashes of different decisions independent.
TAG_COUNTS = 1
TAG_SLOTS = 2
TAG_PERMUTATION = 3
TAG_MULTINOMIAL = 4
TAG_SHARDS = 5
TAG_IMPORTANCE = 6
TAG_ACCEPT = 7


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser applied elementwise to a ``uint64`` array (wraps mod 2**64)."""
    x = x + _GOLDEN  # the one new array; the rest works in place
    x ^= x >> _S30
    x *= _MUL1
    x ^= x >> _S27
    x *= _MUL2
    x ^= x >> _S31
    return x


def key(*parts: int) -> int:
    """Fold integer coordinates into one 64-bit key (a Python int)."""
    h = np.zeros(1, dtype=np.uint64)
    for part in parts:
        h = mix64(h ^ np.uint64(part & _MASK64))
    return int(h[0])


def hash_array(k: int, values: np.ndarray) -> np.ndarray:
    """Hash each element of ``values`` under key ``k``; returns ``uint64``."""
    return mix64(np.asarray(values, dtype=np.uint64) ^ np.uint64(k))


def uniform(k: int, values: np.ndarray) -> np.ndarray:
    """Uniform floats in [0, 1) from the top 53 bits of ``hash_array``."""
    return (hash_array(k, values) >> np.uint64(11)).astype(np.float64) * _INV_2_53
