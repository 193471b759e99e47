"""Counter-based randomness: every random choice is a hash of its coordinates.

The plan never keeps a random-number generator whose state would have to be
carried across workers, ranks or checkpoints. Instead each decision is a pure
function of ``(seed, what, batch, ...)`` through a 64-bit mixing hash
(SplitMix64's finaliser, ``plan_kernels.mix64``), vectorised over numpy
``uint64`` arrays here and compiled in the plan's loops. It is not
cryptographic; it is stable across platforms, numpy versions and processes,
which Python's salted ``hash()`` is not.
"""

from __future__ import annotations

import numpy as np

from onlinemix.loaders.plan_kernels import INV_2_53, mix64

_MASK64 = (1 << 64) - 1

# Stream tags keep the hashes of different decisions independent.
TAG_COUNTS = 1
TAG_SLOTS = 2
TAG_PERMUTATION = 3
TAG_MULTINOMIAL = 4
TAG_SHARDS = 5
TAG_IMPORTANCE = 6
TAG_ACCEPT = 7


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
    return (hash_array(k, values) >> np.uint64(11)).astype(np.float64) * INV_2_53
