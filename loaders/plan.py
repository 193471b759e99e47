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
   A domain in *shard order* (``PlanSpec.shards``) is shuffled a shard at a
   time instead: each epoch is a permutation of its shards, each read front
   to back, so its reads are sequential (for stores where random access is
   slow). Determinism is the same; only the granularity of the shuffle differs.
   A domain *resampled by importance* (``PlanSpec.resampled``) is drawn each
   epoch by Gumbel-top-k instead: the epoch is the ``size`` samples with the
   largest ``beta * log w_i + G_i``, ``G_i`` a Gumbel variable hashed from
   ``(seed, domain, epoch, i)``, in decreasing order of that key: successive
   draws without replacement with probability ∝ ``exp(beta * log w)``.
4. **Slot order.** The ``G`` samples, sorted by domain and take, are shuffled
   by the Feistel permutation of ``[0, G)`` keyed by ``(seed, b)``, so domains
   interleave within the batch and across the ranks' slices of it.
5. **Repeat caps.** A domain whose cursor reaches ``max_epochs * N_d`` is
   exhausted: it drops out and the others are renormalised. A batch that
   would overrun a cap takes what is left and re-draws the shortfall among
   the remaining domains. When no live domain has positive weight the stream
   ends (no partial batch is ever produced).

A checkpoint of the plan is just ``(batch, cursors)``.

Over 400 lines on purpose: the five steps above are one pure function whose parts share their invariants (a
count taken is a cursor moved is a sample drawn), and they read best together; the compiled loops are in
``plan_kernels.py``, the permutations in ``permutation.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from onlinemix.loaders import plan_kernels, rng
from onlinemix.loaders.permutation import block_bits, permute

UNLIMITED = 1 << 62  # cap of a domain without max_epochs
SAMPLING_METHODS = ("systematic", "multinomial")
_CHUNK_CELLS = 1 << 20  # most batches x domains counted per call by fast_forward
_PASS_SLOTS = 1 << 14  # most batches x slots planned per compiled pass (see plan_batches)
_PASS_CELLS = 1 << 15  # most batches x domains planned per compiled pass


class StreamEnded(Exception):
    """No live domain with positive weight is left to fill batch ``batch``."""

    def __init__(self, batch: int):
        super().__init__(f"every domain with positive weight is exhausted at batch {batch}")
        self.batch = batch


class WeightSchedule(Protocol):
    """Where the plan gets the weights in force for each batch."""

    def weights_for(self, start: int, stop: int) -> np.ndarray:
        """Weights of batches ``start .. stop - 1``: a ``(rows, k)`` array, one row per batch.

        Each row is non-negative and sums to 1. A schedule whose later weights
        are not known yet (online mixing) may return fewer rows, but at least one.
        """


class StaticSchedule:
    """The same weights for every batch."""

    def __init__(self, weights: np.ndarray):
        self.weights = np.asarray(weights, dtype=np.float64)

    def weights_for(self, start: int, stop: int) -> np.ndarray:
        """The same weights for every batch in ``batches``."""
        return np.broadcast_to(self.weights, (stop - start, len(self.weights)))


@dataclass(frozen=True)
class ResampledOrder:
    """How a domain is drawn by importance (DSIR weights from a sidecar, see ``loaders/importance/sidecars.py``).

    ``log_weights`` has one entry per sample of the source (``-inf``: never
    drawn); each epoch draws ``size`` of the others, the plan's size for the
    domain. ``beta`` tempers the weights (0: uniform without replacement, 1:
    the raw DSIR weights, whose effective sample size is often near 1).
    """

    log_weights: np.ndarray
    beta: float
    size: int

    def __post_init__(self) -> None:
        drawable = int(np.isfinite(self.log_weights).sum())
        if not 1 <= self.size <= drawable:
            raise ValueError(f"an epoch of {self.size} samples needs 1 to {drawable} samples with a finite weight")
        if not (math.isfinite(self.beta) and self.beta >= 0):
            raise ValueError(f"beta must be finite and >= 0, got {self.beta}")


@dataclass(frozen=True)
class PlanSpec:
    """What the plan needs to know about the mixture, fixed for a run."""

    sizes: np.ndarray  # (k,) samples per domain
    caps: np.ndarray  # (k,) most samples ever taken per domain (UNLIMITED if none)
    seed: int
    global_batch_size: int
    sampling: str = "systematic"
    # Per domain: ``None`` (a fresh permutation of all samples each epoch) or the sample count of
    # each of its shards, in storage order (shard order: a permutation of the shards each epoch).
    shards: tuple[np.ndarray | None, ...] | None = None
    # Per domain: ``None`` or a ``ResampledOrder`` (its ``size`` is then the domain's size here).
    resampled: tuple[ResampledOrder | None, ...] | None = None

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
        object.__setattr__(self, "_bits", np.array([block_bits(int(n)) for n in self.sizes], dtype=np.uint64))
        object.__setattr__(self, "_counts_key", rng.key(self.seed, rng.TAG_COUNTS))
        object.__setattr__(self, "_slots_key", rng.key(self.seed, rng.TAG_SLOTS))
        object.__setattr__(self, "_perm_key", rng.key(self.seed, rng.TAG_PERMUTATION))
        object.__setattr__(self, "_slot_bits", block_bits(self.global_batch_size))
        keys = [self._counts_key, self._slots_key, self._perm_key]  # in plan_kernels' order (COUNTS_KEY, ...)
        object.__setattr__(self, "_keys", np.array(keys, dtype=np.uint64))
        passes = min(_PASS_SLOTS // self.global_batch_size, _PASS_CELLS // len(self.sizes))
        object.__setattr__(self, "_pass_rows", max(1, passes))  # most batches per compiled pass (plan_batches)
        shards = self.shards or (None,) * len(self.sizes)
        if len(shards) != len(self.sizes):
            raise ValueError(f"shards has {len(shards)} entries for {len(self.sizes)} domains")
        for d, counts in enumerate(shards):
            if counts is not None and (np.any(np.asarray(counts) < 1) or np.sum(counts) != self.sizes[d]):
                raise ValueError(f"domain {d}: shard sizes must be >= 1 and sum to its {self.sizes[d]} samples")
        object.__setattr__(self, "shards", tuple(None if c is None else np.asarray(c, dtype=np.int64) for c in shards))
        object.__setattr__(self, "_sharded", [d for d, counts in enumerate(self.shards) if counts is not None])
        resampled = self.resampled or (None,) * len(self.sizes)
        if len(resampled) != len(self.sizes):
            raise ValueError(f"resampled has {len(resampled)} entries for {len(self.sizes)} domains")
        for d, order in enumerate(resampled):
            if order is not None and (order.size != self.sizes[d] or self.shards[d] is not None):
                raise ValueError(f"domain {d}: a resampled domain has its epoch size as size and no shard order")
        object.__setattr__(self, "resampled", tuple(resampled))
        object.__setattr__(self, "_resampled", [d for d, order in enumerate(resampled) if order is not None])
        object.__setattr__(self, "_shard_orders", {})  # (domain, epoch) -> (order, ends): a cache, not state
        object.__setattr__(self, "_epoch_orders", {})  # (domain, epoch) -> resampled order: a cache, not state

    @property
    def num_domains(self) -> int:
        """How many domains the plan draws from."""
        return len(self.sizes)


@dataclass
class PlanState:
    """Position in the stream: the next batch and the samples taken so far per domain."""

    batch: int
    cursors: np.ndarray

    @classmethod
    def start(cls, num_domains: int) -> PlanState:
        """The position before batch 0."""
        return cls(0, np.zeros(num_domains, dtype=np.int64))

    def copy(self) -> PlanState:
        """An independent copy."""
        return PlanState(self.batch, self.cursors.copy())

    def state_dict(self) -> dict:
        """Plain ints: the batch and the per-domain cursors."""
        return {"batch": int(self.batch), "cursors": [int(c) for c in self.cursors]}

    @classmethod
    def from_state_dict(cls, state: dict) -> PlanState:
        """The position ``state_dict`` returned."""
        return cls(int(state["batch"]), np.asarray(state["cursors"], dtype=np.int64))

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, PlanState) and self.batch == other.batch and np.array_equal(self.cursors, other.cursors)
        )


@dataclass(slots=True)
class BatchPlan:
    """The slots of one global batch (or of one rank's slice of it), in training order."""

    batch: int
    domains: np.ndarray  # (n,) domain index of each slot
    indices: np.ndarray  # (n,) sample index within its domain
    counts: np.ndarray  # (k,) samples per domain in the whole global batch


# ----------------------------------------------------------------------------- counts


def systematic_counts(weights: np.ndarray, total: int, u: float) -> np.ndarray:
    """Counts of ``total`` evenly spaced points (offset ``u`` in [0, 1)) per weight interval.

    Each count is ``floor`` or ``ceil`` of ``total * w`` (up to float rounding);
    zero weights get zero (``plan_kernels.systematic_row`` says how).
    """
    counts = np.empty(len(weights), dtype=np.int64)
    plan_kernels.systematic_row(np.ascontiguousarray(weights, dtype=np.float64), total, float(u), counts)
    return counts


def _offsets(spec: PlanSpec, batches: np.ndarray, round_: int) -> np.ndarray:
    """The systematic-sampling offset in [0, 1) of each batch (re-drawn per exhaustion round)."""
    return rng.uniform(spec._counts_key if round_ == 0 else rng.key(spec._counts_key, round_), batches)


def _draw(spec: PlanSpec, weights: np.ndarray, total: int, batch: int, round_: int) -> np.ndarray:
    if spec.sampling == "systematic":
        return systematic_counts(weights, total, _offsets(spec, np.array([batch]), round_)[0])
    generator = np.random.default_rng([spec.seed, rng.TAG_MULTINOMIAL, batch, round_])
    return generator.multinomial(total, weights / weights.sum()).astype(np.int64)


def allocate(spec: PlanSpec, cursors: np.ndarray, weights: np.ndarray, batch: int) -> np.ndarray:
    """Samples per domain for one batch, honouring the repeat caps. Raises ``StreamEnded``."""
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


def count_batches(spec: PlanSpec, state: PlanState, weights: np.ndarray) -> np.ndarray:
    """Counts of the next ``len(weights)`` batches (a row each), advancing ``state``.

    Systematic counts are made in one compiled pass up to the first batch that
    would touch a repeat cap, so there may be fewer rows than weights; when the
    very first batch touches a cap it is counted alone, exactly (always at
    least one row).
    """
    return _count(spec, state, weights)[0]


def _count(spec: PlanSpec, state: PlanState, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``count_batches``, and the cursors before each counted batch (a row each)."""
    if spec.sampling == "systematic":
        counts, before = plan_kernels.count_rows(
            np.ascontiguousarray(weights, dtype=np.float64),
            spec.global_batch_size,
            state.batch,
            spec._keys[plan_kernels.COUNTS_KEY],
            state.cursors,
            spec.caps,
        )
        if len(counts):
            state.cursors = before[-1] + counts[-1]
            state.batch += len(counts)
            return counts, before
    return _count_exactly(spec, state, weights[0])


def _count_exactly(spec: PlanSpec, state: PlanState, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One batch counted by ``allocate`` (multinomial sampling, or a batch that touches a repeat cap), as
    ``_count`` returns it."""
    before = state.cursors[None, :]
    single = allocate(spec, state.cursors, weights, state.batch)
    state.cursors = state.cursors + single
    state.batch += 1
    return single[None, :], before


# ----------------------------------------------------------------------------- batches


def plan_batches(
    spec: PlanSpec,
    state: PlanState,
    weights: np.ndarray,
    rank: int = 0,
    world_size: int = 1,
    keep: tuple[int, int] = (1, 0),
) -> list[BatchPlan]:
    """Plan the next ``len(weights)`` batches (fewer if a domain runs dry), advancing ``state`` (its
    cursors in place: a ``PlanState.copy()`` keeps a position).

    Returns this rank's slice of each batch ``b`` with ``b % keep[0] == keep[1]``
    (a DataLoader worker's share; all of them by default); the others are
    only counted. Two compiled loops (``plan_kernels.py``) do the work, in one
    call: one counts the batches, the other gives each slot its domain, take
    and sample.
    """
    # Large batches or many domains: a few batches per pass, so that each pass's arrays stay small (128-256
    # KB each) and the allocator reuses their memory; larger ones arrive as fresh pages from the OS on
    # every call, which measured up to 2x the cost per batch (10,000 domains: 257-266 -> 132-139 µs).
    if len(weights) > spec._pass_rows:
        plans = []
        for lo in range(0, len(weights), spec._pass_rows):
            first, block = state.batch, weights[lo : lo + spec._pass_rows]
            plans += plan_batches(spec, state, block, rank, world_size, keep)
            if state.batch - first < len(block):  # stopped early at a cap: the caller goes on
                break
        return plans
    every, residue = keep
    if not 0 <= residue < every:
        raise ValueError(f"keep=(every, residue) needs 0 <= residue < every, got {keep}")
    per_rank = spec.global_batch_size // world_size
    layout = (spec.global_batch_size, spec._slot_bits, rank * per_rank, per_rank, every, residue)
    first = state.batch
    if spec.sampling == "systematic":
        counted, counts, domains, j, indices = plan_kernels.plan_rows(
            np.ascontiguousarray(weights, dtype=np.float64),
            first,
            state.cursors,  # advanced in place
            spec.caps,
            spec.sizes,
            spec._bits,
            spec._keys,
            *layout,
        )
        state.batch += counted
    if state.batch == first:  # multinomial, or the first batch touches a cap: count it alone, exactly
        counts, before = _count_exactly(spec, state, weights[0])
        counts, domains, j, indices = plan_kernels.kept_slots(
            counts, before, first, spec.sizes, spec._bits, spec._keys, *layout
        )
    if spec._sharded or spec._resampled:
        _special_orders(spec, domains, j, indices)
    batches = range(first + (residue - first) % every, state.batch, every)
    return [BatchPlan(b, d, i, c) for b, d, i, c in zip(batches, domains, indices, counts)]


def _special_orders(spec: PlanSpec, domains: np.ndarray, j: np.ndarray, indices: np.ndarray) -> None:
    """Rewrite (in place) the ``indices`` of domains in shard order or resampled by importance."""
    sizes = spec.sizes[domains]
    epochs, positions = j // sizes, j % sizes
    for d in spec._sharded:  # a list, not a loop over all domains: 10,000 domains stay cheap
        _in_shard_order(spec, d, domains, epochs, positions, indices)
    for d in spec._resampled:
        mine = domains == d
        for epoch in np.unique(epochs[mine]):
            at = mine & (epochs == epoch)
            indices[at] = resampled_order(spec, d, int(epoch))[positions[at]]


def resampled_order(spec: PlanSpec, domain: int, epoch: int) -> np.ndarray:
    """The samples epoch ``epoch`` of a resampled ``domain`` draws, in order (Gumbel-top-k, see above)."""
    cache = spec._epoch_orders
    if (domain, epoch) not in cache:
        order = spec.resampled[domain]
        drawable = np.flatnonzero(np.isfinite(order.log_weights))
        u = rng.uniform(rng.key(spec._perm_key, rng.TAG_IMPORTANCE, domain, epoch), drawable)
        with np.errstate(divide="ignore"):  # u = 0 gives a key of -inf: drawn last
            keys = order.beta * order.log_weights[drawable] - np.log(-np.log(u))
        top = np.argpartition(-keys, order.size - 1)[: order.size]
        top = top[np.argsort(-keys[top], kind="stable")]
        if len(cache) >= 8:  # whole-domain arrays: keep few; epochs only move forward
            cache.clear()
        cache[(domain, epoch)] = drawable[top]
    return cache[(domain, epoch)]


def shard_order(spec: PlanSpec, domain: int, epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """The shards of ``domain`` in the order epoch ``epoch`` reads them, and where each ends (in samples)."""
    cache = spec._shard_orders
    if (domain, epoch) not in cache:
        counts = spec.shards[domain]
        n = len(counts)
        key = rng.key(spec._perm_key, rng.TAG_SHARDS, domain, epoch)
        order = permute(np.arange(n, dtype=np.int64), np.int64(n), np.uint64(key), np.uint64(block_bits(n)))
        if len(cache) >= 64:  # epochs only move forward: old entries are not needed again soon
            cache.clear()
        cache[(domain, epoch)] = (order, np.cumsum(counts[order]))
    return cache[(domain, epoch)]


def _in_shard_order(
    spec: PlanSpec, d: int, domains: np.ndarray, epochs: np.ndarray, positions: np.ndarray, indices: np.ndarray
) -> None:
    """Rewrite ``indices`` of domain ``d`` (in place): position ``p`` of an epoch is the ``p``-th sample
    of the concatenation of the shards in that epoch's order."""
    mine = domains == d
    if not mine.any():
        return
    counts = spec.shards[d]
    shard_starts = np.cumsum(counts) - counts
    for epoch in np.unique(epochs[mine]):
        at = mine & (epochs == epoch)
        order, ends = shard_order(spec, d, int(epoch))
        p = positions[at]
        rank = np.searchsorted(ends, p, side="right")  # which shard of the epoch holds position p
        shard = order[rank]
        indices[at] = shard_starts[shard] + p - (ends[rank] - counts[shard])


def plan_batch(spec: PlanSpec, state: PlanState, weights: np.ndarray, rank: int = 0, world_size: int = 1) -> BatchPlan:
    """Plan the single batch ``state.batch`` with ``weights`` and advance ``state``."""
    return plan_batches(spec, state, np.asarray(weights)[None, :], rank, world_size)[0]


def advance(spec: PlanSpec, state: PlanState, weights: np.ndarray) -> np.ndarray:
    """Move ``state`` past one batch without building it; returns the batch's counts."""
    return count_batches(spec, state, np.asarray(weights)[None, :])[0]


def cursors_before(spec: PlanSpec, state: PlanState, weights: np.ndarray) -> np.ndarray:
    """The cursors before each of the next ``len(weights)`` batches from ``state``, and after the last counted:
    ``(rows + 1, k)``, one compiled count pass (``state`` itself is not moved). Fewer rows where the stream
    ends first. For iterators that checkpoint mid-chunk (``MixedIterator.state_dict``)."""
    position = state.copy()
    rows = [position.cursors.copy()]
    try:
        while position.batch - state.batch < len(weights):
            counts = count_batches(spec, position, weights[position.batch - state.batch :])
            rows.extend(rows[-1] + np.cumsum(counts, axis=0))
    except StreamEnded:
        pass
    return np.stack(rows)


def fast_forward(spec: PlanSpec, state: PlanState, to_batch: int, schedule: WeightSchedule) -> PlanState:
    """Advance ``state`` (in place, and returned) to ``to_batch``, counting in chunks (one compiled pass each).

    Skipping a million batches of a few domains takes milliseconds.
    """
    if to_batch < state.batch:
        raise ValueError(f"cannot fast-forward backwards from batch {state.batch} to {to_batch}")
    chunk = max(1, _CHUNK_CELLS // spec.num_domains)
    while state.batch < to_batch:
        count_batches(spec, state, schedule.weights_for(state.batch, min(to_batch, state.batch + chunk)))
    return state
