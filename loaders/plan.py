"""The plan: which samples make up global batch ``b``. Pure functions, no I/O.

The sample order is a function of ``(seed, batch index, weights in force)``
and nothing else, so every worker and rank can compute any part of it alone:

1. **Counts.** From the weights of the live domains, batch ``b`` takes
   ``counts[d]`` samples of domain ``d``. Systematic sampling (default) puts
   ``G`` evenly spaced points, offset by one uniform draw, on the cumulative
   weights: each count is ``floor`` or ``ceil`` of ``G * w[d]``. Multinomial
   sampling is the high-variance alternative.
2. **Cursors.** ``cursors[d]`` counts the samples taken from ``d`` before
   batch ``b``; the batch takes the next ``counts[d]`` of them.
3. **Per-domain order.** The ``j``-th sample ever taken from ``d`` is
   ``permute(j % N_d, key(seed, d, j // N_d))``: a fresh shuffle each epoch.
4. **Slot order.** The ``G`` samples are shuffled by a permutation keyed by
   ``(seed, b)``, so domains interleave within the batch.
5. **Repeat caps.** A domain whose cursor reaches ``max_epochs * N_d`` is
   exhausted: it drops out and the others are renormalised. A batch that
   would overrun a cap takes what is left and re-draws the shortfall among
   the remaining domains. When no live domain has positive weight the stream
   ends (no partial batch is ever produced).

A checkpoint of the plan is just ``(batch, cursors)``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from loaders import rng
from loaders.permutation import half_bits, permute

UNLIMITED = 1 << 62  # cap of a domain without max_epochs
SAMPLING_METHODS = ("systematic", "multinomial")
_FAST_FORWARD_CELLS = 1 << 20  # batches x domains evaluated per vectorised chunk


class StreamEnded(Exception):
    """No live domain with positive weight is left to fill batch ``batch``."""

    def __init__(self, batch: int):
        super().__init__(f"every domain with positive weight is exhausted at batch {batch}")
        self.batch = batch


class WeightSchedule(Protocol):
    """Where the plan gets the weights in force for a batch."""

    def weights_at(self, batch: int) -> np.ndarray:
        """Weights (non-negative, summing to 1) used to draw ``batch``."""

    def constant_until(self, batch: int) -> int:
        """First batch after ``batch`` whose weights may differ (lets the plan skip ahead in bulk)."""


class StaticSchedule:
    """The same weights for every batch."""

    def __init__(self, weights: np.ndarray):
        self.weights = np.asarray(weights, dtype=np.float64)

    def weights_at(self, batch: int) -> np.ndarray:
        return self.weights

    def constant_until(self, batch: int) -> int:
        return UNLIMITED


@dataclass(frozen=True)
class PlanSpec:
    """What the plan needs to know about the mixture, fixed for a run."""

    sizes: np.ndarray  # (k,) samples per domain
    caps: np.ndarray  # (k,) most samples ever taken per domain (UNLIMITED if none)
    seed: int
    global_batch_size: int
    sampling: str = "systematic"

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", np.asarray(self.sizes, dtype=np.int64))
        object.__setattr__(self, "caps", np.asarray(self.caps, dtype=np.int64))
        if self.sampling not in SAMPLING_METHODS:
            raise ValueError(f"sampling must be one of {SAMPLING_METHODS}, got {self.sampling!r}")
        if self.global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {self.global_batch_size}")
        if (self.sizes < 1).any():
            raise ValueError(f"every domain needs at least one sample, got sizes {self.sizes.tolist()}")
        # Derived once: the per-domain Feistel block sizes and the hash keys of each decision.
        object.__setattr__(self, "_half", np.array([half_bits(int(n)) for n in self.sizes], dtype=np.uint64))
        object.__setattr__(self, "_counts_key", rng.key(self.seed, rng.TAG_COUNTS))
        object.__setattr__(self, "_slots_key", rng.key(self.seed, rng.TAG_SLOTS))
        object.__setattr__(self, "_perm_key", rng.key(self.seed, rng.TAG_PERMUTATION))

    @property
    def num_domains(self) -> int:
        return len(self.sizes)


@dataclass
class PlanState:
    """Position in the stream: the next batch and the samples taken so far per domain."""

    batch: int
    cursors: np.ndarray

    @classmethod
    def start(cls, num_domains: int) -> PlanState:
        return cls(0, np.zeros(num_domains, dtype=np.int64))

    def copy(self) -> PlanState:
        return PlanState(self.batch, self.cursors.copy())

    def state_dict(self) -> dict:
        return {"batch": int(self.batch), "cursors": [int(c) for c in self.cursors]}

    @classmethod
    def from_state_dict(cls, state: dict) -> PlanState:
        return cls(int(state["batch"]), np.asarray(state["cursors"], dtype=np.int64))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PlanState)
            and self.batch == other.batch
            and np.array_equal(self.cursors, other.cursors)
        )


@dataclass
class BatchPlan:
    """The slots of one global batch (or of one rank's slice of it), in training order."""

    batch: int
    domains: np.ndarray  # (n,) domain index of each slot
    indices: np.ndarray  # (n,) sample index within its domain
    counts: np.ndarray  # (k,) samples per domain in the whole global batch


# ----------------------------------------------------------------------------- counts


def systematic_counts(weights: np.ndarray, total: int, u: np.ndarray | float) -> np.ndarray:
    """Counts of ``total`` evenly spaced points (offset ``u`` in [0, 1)) per weight interval.

    ``u`` may be a column of offsets, one per batch; the result then has a row per batch.
    Each count is ``floor`` or ``ceil`` of ``total * w``; zero weights get zero.
    """
    cumulative = np.cumsum(weights)
    # Trailing zero weights add exactly 0.0, so after this division every domain from
    # the last positive one on sits exactly at 1.0 and no zero weight gets a point.
    cumulative /= cumulative[-1]
    edges = np.ceil(cumulative * total - np.asarray(u)[..., None])
    # In exact arithmetic the last edge is ceil(total - u) = total; pin it so rounding cannot lose a point.
    edges[..., cumulative == 1.0] = total
    return np.diff(edges, axis=-1, prepend=0.0).astype(np.int64)


def _draw(spec: PlanSpec, weights: np.ndarray, total: int, batch: int, round_: int) -> np.ndarray:
    if spec.sampling == "systematic":
        u = rng.uniform(rng.key(spec._counts_key, round_), np.array([batch]))[0]
        return systematic_counts(weights, total, u)
    generator = np.random.default_rng([spec.seed, rng.TAG_MULTINOMIAL, batch, round_])
    return generator.multinomial(total, weights / weights.sum()).astype(np.int64)


def allocate(spec: PlanSpec, cursors: np.ndarray, weights: np.ndarray, batch: int) -> np.ndarray:
    """Samples per domain for ``batch``, honouring the repeat caps. Raises ``StreamEnded``."""
    remaining = spec.caps - cursors
    live_weights = np.where(remaining > 0, weights, 0.0)
    counts = np.zeros(spec.num_domains, dtype=np.int64)
    need = spec.global_batch_size
    # Each extra round happens only because a domain ran dry, so there are at most k + 1.
    for round_ in range(spec.num_domains + 1):
        if not live_weights.sum() > 0:
            raise StreamEnded(batch)
        drawn = _draw(spec, live_weights, need, batch, round_)
        taken = np.minimum(drawn, remaining - counts)
        counts += taken
        need -= int(taken.sum())
        if need == 0:
            return counts
        live_weights = np.where(counts < remaining, live_weights, 0.0)
    raise AssertionError("unreachable: every round exhausts at least one domain")


# ----------------------------------------------------------------------------- batches


def advance(spec: PlanSpec, state: PlanState, weights: np.ndarray) -> np.ndarray:
    """Move ``state`` past its batch without building it; returns the batch's counts."""
    counts = allocate(spec, state.cursors, weights, state.batch)
    state.cursors += counts
    state.batch += 1
    return counts


def plan_batch(
    spec: PlanSpec,
    state: PlanState,
    weights: np.ndarray,
    rank: int = 0,
    world_size: int = 1,
) -> BatchPlan:
    """Build batch ``state.batch`` (this rank's contiguous slice of it) and advance ``state``."""
    batch, cursors = state.batch, state.cursors.copy()
    counts = advance(spec, state, weights)
    size = spec.global_batch_size

    # Slot order: shuffle the domain-sorted list of takes, then keep this rank's slice.
    slot_keys = rng.hash_array(int(rng.hash_array(spec._slots_key, np.array([batch]))[0]), np.arange(size))
    order = np.argsort(slot_keys, kind="stable")
    per_rank = size // world_size
    take = order[rank * per_rank : (rank + 1) * per_rank]

    # Which take is each slot: domain d's takes are cursors[d], cursors[d] + 1, ...
    starts = np.cumsum(counts) - counts
    domains = np.repeat(np.arange(spec.num_domains), counts)[take]
    j = cursors[domains] + (take - starts[domains])
    sizes = spec.sizes[domains]
    epochs = j // sizes
    keys = rng.mix64(rng.mix64(np.uint64(spec._perm_key) ^ domains.astype(np.uint64)) ^ epochs.astype(np.uint64))
    indices = permute(j % sizes, sizes, keys, spec._half[domains])
    return BatchPlan(batch=batch, domains=domains, indices=indices, counts=counts)


def fast_forward(spec: PlanSpec, state: PlanState, to_batch: int, schedule: WeightSchedule) -> PlanState:
    """Advance ``state`` (in place, and returned) to ``to_batch``.

    Runs of constant weights are done in vectorised chunks under systematic
    sampling, so skipping a million batches of a few domains takes milliseconds.
    """
    if to_batch < state.batch:
        raise ValueError(f"cannot fast-forward backwards from batch {state.batch} to {to_batch}")
    while state.batch < to_batch:
        weights = schedule.weights_at(state.batch)
        end = min(to_batch, schedule.constant_until(state.batch))
        if spec.sampling == "systematic":
            _skip_constant(spec, state, weights, end)
        if state.batch < end:  # the batch where a domain runs dry, or any multinomial batch
            advance(spec, state, weights)
    return state


def _skip_constant(spec: PlanSpec, state: PlanState, weights: np.ndarray, end: int) -> None:
    """Advance through ``[state.batch, end)`` in bulk, stopping before any batch that touches a cap."""
    chunk = max(1, _FAST_FORWARD_CELLS // spec.num_domains)
    while state.batch < end:
        live_weights = np.where(state.cursors < spec.caps, weights, 0.0)
        if not live_weights.sum() > 0:
            raise StreamEnded(state.batch)
        batches = np.arange(state.batch, min(end, state.batch + chunk))
        u = rng.uniform(rng.key(spec._counts_key, 0), batches)
        totals = state.cursors + np.cumsum(systematic_counts(live_weights, spec.global_batch_size, u), axis=0)
        reaches_cap = (totals >= spec.caps).any(axis=1)
        clean = int(np.argmax(reaches_cap)) if reaches_cap.any() else len(batches)
        if clean:
            state.cursors = totals[clean - 1].copy()
            state.batch += clean
        if clean < len(batches):
            return  # the caller steps the capped batch exactly, then the live set changes
