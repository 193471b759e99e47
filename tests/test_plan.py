import functools
import operator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from onlinemix.loaders import plan as plan_module
from onlinemix.loaders import plan_kernels
from onlinemix.loaders.permutation import permute
from onlinemix.loaders.plan import (
    UNLIMITED,
    PlanSpec,
    PlanState,
    StaticSchedule,
    StreamEnded,
    advance,
    count_batches,
    fast_forward,
    plan_batch,
    plan_batches,
    systematic_counts,
)
from onlinemix.loaders.rng import mix64


def spec(sizes=(100, 50, 30), caps=None, seed=3, batch=16, sampling="systematic"):
    caps = [UNLIMITED] * len(sizes) if caps is None else caps
    return PlanSpec(np.array(sizes), np.array(caps), seed, batch, sampling)


def test_systematic_counts_hand_computed():
    # cumulative 32 * [0.5, 0.8, 1.0] = [16, 25.6, 32]; minus u = 0.25 and ceil: [16, 26, 32]
    assert systematic_counts(np.array([0.5, 0.3, 0.2]), 32, 0.25).tolist() == [16, 10, 6]
    # u = 0.7: ceil([15.3, 24.9, 31.3]) = [16, 25, 32]
    assert systematic_counts(np.array([0.5, 0.3, 0.2]), 32, 0.7).tolist() == [16, 9, 7]


@settings(max_examples=200, deadline=None)
@given(
    raw=st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1.0)), min_size=1, max_size=12).filter(lambda w: sum(w) > 0),
    total=st.integers(1, 4096),
    u=st.floats(0.0, 1.0, exclude_max=True),
)
def test_systematic_counts_are_floor_or_ceil_and_sum_to_total(raw, total, u):
    weights = np.array(raw) / sum(raw)
    counts = systematic_counts(weights, total, u)
    assert counts.sum() == total
    expected = weights * total
    assert np.all(counts >= np.floor(expected - 1e-9)) and np.all(counts <= np.ceil(expected + 1e-9))
    assert np.all(counts[weights == 0] == 0)


def systematic_formula(weights, total, u):
    """Systematic counts as array formulas (the definition, and the plan's arithmetic before it was compiled)."""
    cumulative = weights.cumsum(axis=-1)
    cumulative /= cumulative[..., -1:]
    edges = np.ceil(cumulative * total - u[..., None])
    edges[cumulative == 1.0] = total
    return np.diff(edges.astype(np.int64), prepend=0, axis=-1)


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), k=st.integers(1, 40), total=st.integers(1, 5000))
def test_compiled_counts_equal_the_array_formulas_bit_for_bit(seed, k, total):
    """The compiled loops must not move a single sample: same floats, same order of operations."""
    rng = np.random.default_rng(seed)
    # Decimal weights and offsets of 0 put edges within an ulp of an integer, where rounding decides a sample.
    weights = np.where(
        rng.random((50, k)) < 0.5, rng.dirichlet(np.full(k, 0.3), size=50), rng.integers(0, 10, (50, k)) / 10
    )
    weights[rng.random(weights.shape) < 0.2] = 0.0  # zero weights, trailing ones included
    weights[:, rng.integers(k)] += 0.1  # every row fillable
    u = np.where(rng.random(50) < 0.5, 0.0, rng.random(50))
    one_at_a_time = np.array([systematic_counts(w, total, offset) for w, offset in zip(weights, u)])
    assert np.array_equal(one_at_a_time, systematic_formula(weights, total, u))
    s = PlanSpec(np.full(k, 10**9), np.full(k, UNLIMITED), seed, total)
    counted = count_batches(s, PlanState.start(k), weights)  # offsets hashed from (seed, batch)
    assert np.array_equal(counted, systematic_formula(weights, total, plan_module._offsets(s, np.arange(50), 0)))


def test_plan_counts_follow_weights_and_zero_weight_never_drawn():
    s = spec(sizes=(100, 50, 30, 10))
    weights = np.array([0.55, 0.3, 0.15, 0.0])
    state = PlanState.start(4)
    for _ in range(200):
        plan = plan_batch(s, state, weights)
        assert plan.counts.sum() == 16 and len(plan.domains) == 16
        assert np.all(plan.counts >= np.floor(16 * weights)) and np.all(plan.counts <= np.ceil(16 * weights))
        assert np.bincount(plan.domains, minlength=4).tolist() == plan.counts.tolist()
    assert state.cursors[3] == 0


def test_each_epoch_of_a_domain_takes_every_sample_once_in_a_new_order():
    # 5 + 5 samples a batch: epochs of 40 and 20 samples end on batch boundaries
    s = spec(sizes=(40, 20), batch=10)
    state = PlanState.start(2)
    taken = {0: [], 1: []}
    for _ in range(24):
        plan = plan_batch(s, state, np.array([0.5, 0.5]))
        for d in (0, 1):
            taken[d].append(plan.indices[plan.domains == d].tolist())
    for d, size in ((0, 40), (1, 20)):
        per_epoch = size // 5
        epochs = [
            functools.reduce(operator.iadd, taken[d][e * per_epoch : (e + 1) * per_epoch], [])
            for e in range(120 // size)
        ]
        assert all(sorted(epoch) == list(range(size)) for epoch in epochs), f"domain {d}"
        assert epochs[0] != epochs[1]  # reshuffled each epoch


def test_take_index_follows_the_documented_formula():
    """The compiled lookup is ``permute(j % N_d, mix64(((d << 32) | j // N_d) ^ key))``, here written
    with the numpy hash and one ``permute`` call per (domain, epoch), over several epochs of domains
    of very different sizes (a 2**40-sample one included)."""
    s = PlanSpec(np.array([7, 50, 300, 2**40 + 3]), np.array([UNLIMITED] * 4), 5, 16)
    rng = np.random.default_rng(0)
    domains = rng.integers(0, 4, size=2000)
    j = rng.integers(0, 3 * s.sizes[domains])
    j[:4] = [0, 6, 7, 2**40 + 2]  # an epoch's first and last takes, and the next epoch's first
    domains[:4] = [0, 0, 0, 3]
    key = np.uint64(s._perm_key)
    indices = np.array([plan_kernels.take_index(d, t, s.sizes, s._bits, key) for d, t in zip(domains, j)])
    for d in range(4):
        for epoch in np.unique(j[domains == d] // s.sizes[d]):
            at = (domains == d) & (j // s.sizes[d] == epoch)
            key = mix64(np.array([(d << 32) | int(epoch)], dtype=np.uint64) ^ np.uint64(s._perm_key))[0]
            assert np.array_equal(indices[at], permute(j[at] % s.sizes[d], int(s.sizes[d]), int(key))), (d, epoch)


@pytest.mark.parametrize("rank, world_size, workers", [(0, 1, 1), (1, 2, 1), (2, 4, 3)])
def test_short_plan_calls_equal_one_long_call(rank, world_size, workers):
    """Plan calls of a few batches (as with online weights) give the same batches as one call for all of
    them, for any rank slice and with a worker's share of the batches (keep)."""
    weights = np.random.default_rng(1).dirichlet(np.ones(3), size=150)

    def plans(rows_per_call):
        s, state, out = spec(batch=16), PlanState.start(3), []
        for first in range(0, len(weights), rows_per_call):
            keep = (workers, workers - 1)
            out += plan_batches(s, state, weights[first : first + rows_per_call], rank, world_size, keep)
        return [(p.batch, p.domains.tolist(), p.indices.tolist(), p.counts.tolist()) for p in out]

    long = plans(150)
    assert plans(1) == plans(5) == long
    assert [batch for batch, *_ in long] == list(range(workers - 1, 150, workers))
    with pytest.raises(ValueError, match=r"0 <= residue < every, got \(2, 2\)"):
        plan_batches(spec(), PlanState.start(3), weights[:1], keep=(2, 2))


@pytest.mark.parametrize("sampling", ["systematic", "multinomial"])
def test_workers_shares_of_the_batches_make_up_the_whole_stream_through_caps(sampling):
    """Batches counted one at a time (multinomial, or touching a repeat cap) are kept by exactly one
    worker's share too: the shares of 3 workers, merged, are the whole stream, up to its end."""
    weights = np.random.default_rng(4).dirichlet(np.ones(3), size=60)

    def plans(keep):
        s, state, out = spec(sizes=(40, 25, 30), caps=(80, 50, 60), sampling=sampling), PlanState.start(3), []
        try:
            while state.batch < len(weights):
                out += plan_batches(s, state, weights[state.batch : state.batch + 7], 1, 2, keep)
        except StreamEnded:
            pass
        return [(p.batch, p.domains.tolist(), p.indices.tolist(), p.counts.tolist()) for p in out], state

    whole, end = plans((1, 0))
    shares = [plans((3, residue)) for residue in range(3)]
    assert sorted(batch for share, _ in shares for batch in share) == whole
    assert all(state == end for _, state in shares) and 10 < end.batch < 60  # the caps end the stream


def test_slot_order_is_a_keyed_shuffle_of_the_batch():
    """Slot ``s`` of batch ``b`` holds the batch's sorted take ``permute(s)`` under ``mix64(b ^ key)``:
    a batch's samples sorted by (domain, take) and put through that permutation are the plan's slots."""
    s, state = spec(sizes=(100, 50, 30), batch=24), PlanState.start(3)
    for plan in plan_batches(s, state, np.random.default_rng(2).dirichlet(np.ones(3), size=6)):
        sorted_takes = np.repeat(np.arange(3), plan.counts)
        key = mix64(np.array([plan.batch], dtype=np.uint64) ^ np.uint64(s._slots_key))[0]
        order = permute(np.arange(24), 24, int(key))
        assert plan.domains.tolist() == sorted_takes[order].tolist()
        assert sorted(order.tolist()) == list(range(24)) and order.tolist() != list(range(24))


def test_long_calls_are_planned_a_few_batches_per_pass_with_the_same_result(monkeypatch):
    """With large batches or many domains a long call is planned a few batches per compiled pass; a pass
    that stops early at a repeat cap ends the call there, and the caller's next call goes on from the state."""
    weights = np.random.default_rng(3).dirichlet(np.ones(3), size=40)

    def plans():
        s = spec(sizes=(40, 25, 300), caps=(80, 25, UNLIMITED), batch=16)  # passes are sized when it is made
        assert s._pass_rows == plan_module._PASS_SLOTS // 16
        state, out = PlanState.start(3), []
        while state.batch < len(weights):
            out += plan_batches(s, state, weights[state.batch :], rank=1, world_size=2)
        return [(p.batch, p.domains.tolist(), p.indices.tolist()) for p in out]

    whole = plans()
    monkeypatch.setattr(plan_module, "_PASS_SLOTS", 3 * 16)  # 3 batches per pass
    assert plans() == whole
    assert [batch for batch, *_ in whole] == list(range(40))


def test_same_seed_same_plan_other_seed_other_plan():
    def first(seed):
        state = PlanState.start(3)
        plan = plan_batch(spec(seed=seed), state, np.array([0.4, 0.4, 0.2]))
        return plan.domains.tolist(), plan.indices.tolist()

    assert first(1) == first(1)
    assert first(1) != first(2)


def test_rank_slices_partition_the_global_batch():
    s = spec(batch=24)
    weights = np.array([0.5, 0.25, 0.25])
    whole = plan_batch(s, PlanState.start(3), weights)
    parts = [plan_batch(s, PlanState.start(3), weights, rank=r, world_size=4) for r in range(4)]
    assert np.concatenate([p.domains for p in parts]).tolist() == whole.domains.tolist()
    assert np.concatenate([p.indices for p in parts]).tolist() == whole.indices.tolist()


@pytest.mark.parametrize("sampling", ["systematic", "multinomial"])
def test_fast_forward_equals_stepping_through_exhaustion(sampling):
    s = spec(sizes=(40, 25, 300), caps=(80, 25, UNLIMITED), batch=16, sampling=sampling)
    weights = np.array([0.5, 0.3, 0.2])
    stepped = PlanState.start(3)
    for target in (1, 7, 30, 45, 120):
        while stepped.batch < target:
            advance(s, stepped, weights)
        jumped = fast_forward(s, PlanState.start(3), target, StaticSchedule(weights))
        assert jumped == stepped, target


def test_repeat_caps_stop_a_domain_exactly_and_renormalise_the_rest():
    s = spec(sizes=(40, 25, 300), caps=(80, 25, UNLIMITED), batch=16)
    weights = np.array([0.5, 0.3, 0.2])
    state = PlanState.start(3)
    history = []
    for _ in range(60):
        history.append(advance(s, state, weights))
    assert state.cursors[0] == 80 and state.cursors[1] == 25
    assert all(c.sum() == 16 for c in history)
    # once both capped domains are done, every sample comes from the last one
    assert history[-1].tolist() == [0, 0, 16]


def test_stream_ends_when_no_weighted_domain_is_left():
    s = spec(sizes=(20, 20), caps=(20, 40), batch=10)
    state = PlanState.start(2)
    with pytest.raises(StreamEnded) as ended:
        for _ in range(100):
            advance(s, state, np.array([0.5, 0.5]))
    assert ended.value.batch == 6  # 60 samples in all, 10 a batch
    assert state.cursors.tolist() == [20, 40]
    # a zero-weight domain does not keep the stream alive
    state = PlanState.start(2)
    with pytest.raises(StreamEnded):
        for _ in range(100):
            advance(s, state, np.array([1.0, 0.0]))
    assert state.cursors.tolist() == [20, 0]


def test_fast_forward_rejects_going_backwards():
    state = fast_forward(spec(), PlanState.start(3), 5, StaticSchedule(np.array([0.2, 0.3, 0.5])))
    with pytest.raises(ValueError, match="backwards"):
        fast_forward(spec(), state, 2, StaticSchedule(np.array([0.2, 0.3, 0.5])))


def test_bad_spec_is_an_error():
    with pytest.raises(ValueError, match="sampling"):
        spec(sampling="stratified")
    with pytest.raises(ValueError, match="at least one sample"):
        spec(sizes=(10, 0))


def test_shard_sizes_must_cover_the_domain():
    with pytest.raises(ValueError, match="domain 1: shard sizes must be >= 1 and sum to its 10 samples"):
        PlanSpec([5, 10], [UNLIMITED, UNLIMITED], 0, 4, shards=(None, np.array([4, 5])))
    with pytest.raises(ValueError, match="shards has 1 entries for 2 domains"):
        PlanSpec([5, 10], [UNLIMITED, UNLIMITED], 0, 4, shards=(None,))
