"""The plan's per-batch loops, compiled with numba.

With online weights a plan call covers only the few batches whose weights
are published (``lag + 1`` of them), so what it costs is mostly per call, not
per sample: as vectorised numpy, counting and laying out five batches took
some fifty numpy calls (~160 µs), as much as sixty-four batches. Written as
plain loops and compiled, the same work is three calls of a few µs each, and
it reads as what it does: per batch, count each domain's samples, then give
each slot its domain and its take.

Everything weight-free and heavy (hashes, the Feistel permutations, slot
orders) stays vectorised numpy in ``plan.py``; these kernels only consume its
results. The arithmetic is the same IEEE double arithmetic in the same order
as the numpy formulas they replace, so plans are bit for bit what they were.
Compiled code is cached next to this file (``cache=True``): a new process
loads it in milliseconds instead of compiling again (about a second).
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit


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
    weights: np.ndarray, total: int, offsets: np.ndarray, cursors: np.ndarray, caps: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Systematic counts of consecutive batches, a row each, and the cursors before each.

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
        systematic_row(live, total, offsets[r], counts[r])
        for d in range(k):
            if cursor[d] + counts[r, d] >= caps[d]:
                return counts[:r], before[:r]
        before[r] = cursor
        cursor += counts[r]
    return counts, before


@njit(cache=True)
def slot_takes(counts: np.ndarray, before: np.ndarray, take: np.ndarray, total: int) -> tuple[np.ndarray, np.ndarray]:
    """The domain of each slot and which of that domain's takes it is.

    Row ``r`` of a batch lists its takes sorted by domain: ``counts[r, 0]``
    takes of domain 0, then domain 1's, and so on; domain ``d``'s takes are
    its ``before[r, d]``-th sample onwards. Slot ``i`` holds sorted take
    ``take[r, i]`` (the shuffled slot order of this rank's slice). Each row of
    ``counts`` sums to ``total``, the global batch size.
    """
    rows, k = counts.shape
    slots = take.shape[1]
    domains = np.empty((rows, slots), np.int64)
    j = np.empty((rows, slots), np.int64)
    owner = np.empty(total, np.int64)  # sorted take -> its domain
    shift = np.empty(k, np.int64)  # sorted take -> j of its domain: add this
    for r in range(rows):
        start = 0
        for d in range(k):
            owner[start : start + counts[r, d]] = d
            shift[d] = before[r, d] - start
            start += counts[r, d]
        for i in range(slots):
            d = owner[take[r, i]]
            domains[r, i] = d
            j[r, i] = shift[d] + take[r, i]
    return domains, j


@njit(cache=True)
def gather_windows(table: np.ndarray, base: np.ndarray, domains: np.ndarray, j: np.ndarray, out: np.ndarray) -> int:
    """``out = table[d, j - base[d]]`` for each take (2-D arrays) inside its domain's window ``table[d]``;
    returns how many takes are not (their ``out`` is left as it was)."""
    width = table.shape[1]
    outside = 0
    for r in range(j.shape[0]):
        for i in range(j.shape[1]):
            d = domains[r, i]
            at = j[r, i] - base[d]
            if 0 <= at < width:
                out[r, i] = table[d, at]
            else:
                outside += 1
    return outside
