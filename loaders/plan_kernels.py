"""The plan's compiled code (numba): the hash, the Feistel network, and two loops per batch.

With online weights a plan call covers only the few batches whose weights
are published (``lag + 1`` of them, often fewer), so what it costs is mostly
per call, not per sample. As vectorised numpy, counting and laying out five
batches took some fifty numpy calls, a sort of hashes per batch (the slot
order) and a Feistel network run as a dozen array passes: as much as
sixty-four batches, even with caches. Written as plain loops and compiled,
a plan call is one call into this module (``plan_rows``) of a few µs plus
about 35 ns per slot, and it reads as what it does: per batch, count each
domain's samples (``count_rows``); then give each slot its domain, its take
and the take's sample (``slot_takes``).

The counts and sample indices are the same IEEE double and ``uint64``
arithmetic, in the same order, as the numpy formulas they replaced
(``systematic_counts``, ``rng.uniform``, ``permutation.permute``), so they
are bit for bit what they were; the tests compare them. Compiled code is
cached next to this file (``cache=True``): a new process loads it in
milliseconds instead of compiling again (a few seconds). Numba checks a
cached function against its own file only, not the files of the functions
it calls, so everything compiled lives here: an edit anywhere in it
recompiles all of it. ``rng.py`` and ``permutation.py`` are the numpy-facing
side of the same functions.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

import numpy as np
from numba import njit

_CACHED = any((Path(__file__).parent / "__pycache__").glob("plan_kernels.*.nbi"))
if not _CACHED and not os.environ.get("NUMBA_CACHE_DIR"):
    # The first process after an install (or an edit of this file) compiles these loops: some seconds, once.
    logging.getLogger("onlinemix").info(
        "compiling the plan's loops with numba (once: about 5-10 s; the machine code is cached beside %s)", __file__
    )

# ----------------------------------------------------------------------------- hashes

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_MUL2 = np.uint64(0x94D049BB133111EB)
_S30, _S27, _S31 = np.uint64(30), np.uint64(27), np.uint64(31)
INV_2_53 = 1.0 / (1 << 53)


def mix64(x: np.ndarray) -> np.ndarray:
    """SplitMix64 finaliser applied elementwise to a ``uint64`` array (wraps mod 2**64)."""
    x = x + _GOLDEN  # the one new array; the rest works in place
    x ^= x >> _S30
    x *= _MUL1
    x ^= x >> _S27
    x *= _MUL2
    x ^= x >> _S31
    return x


# The same function compiled for one ``np.uint64``: one definition of the hash for numpy and the loops.
mix64_scalar = njit(cache=True)(mix64)


@njit(cache=True)
def uniform_scalar(k: np.uint64, value: np.uint64) -> float:
    """``rng.uniform(k, [value])[0]``: the hash's top 53 bits as a double in [0, 1) (the conversion is exact)."""
    return np.float64(mix64_scalar(value ^ k) >> np.uint64(11)) * INV_2_53


# ----------------------------------------------------------------------------- Feistel network

ROUNDS = 4
_ROUND_TAGS = mix64(np.arange(ROUNDS, dtype=np.uint64))
_MULTIPLIER = np.uint64(0x9E3779B97F4A7C15)
_ONE, _THIRTY_TWO = np.uint64(1), np.uint64(32)


@njit(cache=True)
def feistel(index: np.uint64, n: np.uint64, key: np.uint64, bits: np.uint64) -> np.uint64:
    """The image of ``index`` (< ``n``) under the permutation of ``[0, n)`` named by ``key``;
    ``bits`` is ``block_bits(n)``.

    The round function is multiply-shift hashing of a half block (at most 32
    bits) under a 64-bit round key: the key is a full 64-bit hash, so a cheap
    hash is enough to make each round a keyed pseudo-random function.
    """
    low_bits = bits >> _ONE
    low_mask = (_ONE << low_bits) - _ONE
    high_mask = (_ONE << (bits - low_bits)) - _ONE
    v = index
    while True:  # cycle walking: feed an image outside [0, n) through again
        high, low = v >> low_bits, v & low_mask
        for r in range(0, ROUNDS, 2):
            mixed = (low ^ key ^ _ROUND_TAGS[r]) * _MULTIPLIER
            high ^= (mixed ^ (mixed >> _THIRTY_TWO)) & high_mask
            mixed = (high ^ key ^ _ROUND_TAGS[r + 1]) * _MULTIPLIER
            low ^= (mixed ^ (mixed >> _THIRTY_TWO)) & low_mask
        v = (high << low_bits) | low
        if v < n:
            return v


@njit(cache=True)
def permute_each(x: np.ndarray, n: np.ndarray, key: np.ndarray, bits: np.ndarray, out: np.ndarray) -> None:
    """``out[i] = feistel(x[i], n[i], key[i], bits[i])`` over flat arrays (``permutation.permute``)."""
    for i in range(x.shape[0]):
        out[i] = feistel(x[i], n[i], key[i], bits[i])


# ----------------------------------------------------------------------------- the plan's loops


@njit(cache=True)
def systematic_row(weights: np.ndarray, total: int, u: float, out: np.ndarray) -> None:
    """``out[d]``: the points of ``total`` evenly spaced ones (offset ``u``) in weight interval ``d``.

    The point ``i`` sits at ``(i + u) / total`` on the cumulative weights, so the
    points left of the end of interval ``d`` number ``ceil(total * c[d] - u)``
    with ``c`` the normalised cumulative weights. Where ``c`` is exactly 1 (the
    last positive weight and the zeros after it) the edge is pinned to
    ``total``: rounding cannot lose a point, and no zero weight gets one.
    """
    k = weights.shape[0]
    last = 0.0
    for d in range(k):
        last += weights[d]
    cumulative = 0.0
    previous_edge = 0
    for d in range(k):
        cumulative += weights[d]
        c = cumulative / last
        edge = total if c == 1.0 else np.int64(math.ceil(c * total - u))
        out[d] = edge - previous_edge
        previous_edge = edge


@njit(cache=True)
def count_rows(
    weights: np.ndarray, total: int, first: int, key: np.uint64, cursors: np.ndarray, caps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Systematic counts of batches ``first, first + 1, ...`` (a row of ``weights`` each), and the
    cursors before each. Batch ``b``'s offset is ``uniform(key, b)``.

    Stops before the first batch that has no live weight or that would take a
    domain to its cap: ``plan.allocate`` handles those exactly, one at a time.
    """
    rows, k = weights.shape
    counts = np.empty((rows, k), np.int64)
    before = np.empty((rows, k), np.int64)
    cursor = cursors.copy()
    live = np.empty(k)
    for r in range(rows):
        live_total = 0.0
        for d in range(k):
            live[d] = weights[r, d] if cursor[d] < caps[d] else 0.0
            live_total += live[d]
        if not live_total > 0:
            return counts[:r], before[:r]
        systematic_row(live, total, uniform_scalar(key, np.uint64(first + r)), counts[r])
        for d in range(k):
            if cursor[d] + counts[r, d] >= caps[d]:
                return counts[:r], before[:r]
        before[r] = cursor
        cursor += counts[r]
    return counts, before


@njit(cache=True)
def take_index(d: int, j: int, sizes: np.ndarray, bits: np.ndarray, key: np.uint64) -> int:
    """The sample index of take ``j`` of domain ``d``, in the per-epoch Feistel order: epoch
    ``e = j // N_d`` of the domain is permuted by the key ``mix64(((d << 32) | e) ^ key)``."""
    size = sizes[d]
    epoch_key = mix64_scalar(((np.uint64(d) << np.uint64(32)) | np.uint64(j // size)) ^ key)
    return feistel(np.uint64(j % size), np.uint64(size), epoch_key, bits[d])


@njit(cache=True)
def slot_takes(
    counts: np.ndarray,
    before: np.ndarray,
    batches: np.ndarray,
    total: int,
    total_bits: int,
    first_slot: int,
    slots_key: np.uint64,
    sizes: np.ndarray,
    bits: np.ndarray,
    key: np.uint64,
    domains: np.ndarray,
    j: np.ndarray,
    indices: np.ndarray,
) -> None:
    """Slots ``first_slot .. first_slot + slots - 1`` of each batch in ``batches`` (a row each), with
    ``slots = domains.shape[1]``: in ``domains`` the domain of each, in ``j`` which of that domain's
    takes it is, in ``indices`` that take's sample (``take_index``).

    Row ``r`` of a batch lists its takes sorted by domain: ``counts[r, 0]``
    takes of domain 0, then domain 1's, and so on; domain ``d``'s takes are
    its ``before[r, d]``-th sample onwards. Slot ``s`` of batch ``b`` holds
    sorted take ``feistel(s)``, the permutation of ``[0, total)`` (the global
    batch size; ``total_bits = block_bits(total)``) under the batch's key
    ``mix64(b ^ slots_key)``: a shuffle of the whole batch, of which a rank
    keeps a contiguous run of slots.
    """
    rows, k = counts.shape
    slots = domains.shape[1]
    owner = np.empty(total, np.int64)  # sorted take -> its domain
    shift = np.empty(k, np.int64)  # sorted take -> j of its domain: add this
    for r in range(rows):
        start = 0
        for d in range(k):
            owner[start : start + counts[r, d]] = d
            shift[d] = before[r, d] - start
            start += counts[r, d]
        batch_key = mix64_scalar(np.uint64(batches[r]) ^ slots_key)
        for i in range(slots):
            take = np.int64(feistel(np.uint64(first_slot + i), np.uint64(total), batch_key, np.uint64(total_bits)))
            d = owner[take]
            domains[r, i] = d
            j[r, i] = shift[d] + take
            indices[r, i] = take_index(d, j[r, i], sizes, bits, key)


# The hash keys of a plan, in the order ``plan_rows`` takes them (``PlanSpec._keys``).
COUNTS_KEY, SLOTS_KEY, PERMUTATION_KEY = 0, 1, 2


@njit(cache=True)
def kept_slots(
    counts: np.ndarray,
    before: np.ndarray,
    first: int,
    sizes: np.ndarray,
    bits: np.ndarray,
    keys: np.ndarray,
    total: int,
    total_bits: int,
    first_slot: int,
    slots: int,
    every: int,
    residue: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``slot_takes`` for the batches ``b`` (rows of ``counts``, from batch ``first``) with
    ``b % every == residue``: their counts, and their slots' domains, takes and samples.
    """
    start = (residue - first) % every  # the first kept row; the kept rows are views, never copies
    kept = counts[start::every]
    # Three arrays, not one block of three: a block grows past glibc's mmap threshold (128 KB) three
    # times sooner, and then every call faults in fresh pages (measured: 46 -> 65 µs per batch).
    domains = np.empty((kept.shape[0], slots), np.int64)
    j, indices = np.empty_like(domains), np.empty_like(domains)
    slot_takes(
        kept, before[start::every], first + np.arange(start, counts.shape[0], every), total, total_bits,
        first_slot, keys[SLOTS_KEY], sizes, bits, keys[PERMUTATION_KEY], domains, j, indices,
    )  # fmt: skip
    return kept, domains, j, indices


@njit(cache=True)
def plan_rows(
    weights: np.ndarray,
    first: int,
    cursors: np.ndarray,
    caps: np.ndarray,
    sizes: np.ndarray,
    bits: np.ndarray,
    keys: np.ndarray,
    total: int,
    total_bits: int,
    first_slot: int,
    slots: int,
    every: int,
    residue: int,
) -> tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """A plan call in one compiled call: ``count_rows`` from batch ``first`` (advancing ``cursors`` in
    place), then ``kept_slots``.

    Returns how many batches were counted, and ``kept_slots``' four arrays.
    One call instead of two: with online weights a call covers only a few
    batches, and what a call costs whatever its size is most of it.
    """
    counts, before = count_rows(weights, total, first, keys[COUNTS_KEY], cursors, caps)
    counted = counts.shape[0]
    if counted:
        cursors[:] = before[counted - 1] + counts[counted - 1]
    kept, domains, j, indices = kept_slots(
        counts, before, first, sizes, bits, keys, total, total_bits, first_slot, slots, every, residue
    )
    return counted, kept, domains, j, indices
