"""The memorisation guard: a domain whose held-out loss rises is held at most at its starting weight.

Held-out losses reach the controller through ``observe_heldout`` (smoothed by ``heldout_ema``); a domain whose
smoothed loss has risen more than ``heldout_tolerance`` above its lowest gives up what it has above its starting
weight to the others, in proportion to theirs, until its held-out loss reaches a new lowest.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import make_example, run_ranks

from onlinemix import MixedDataset, ODMController, OnlineMixer, StaticController
from onlinemix.mixing.limits import MemorisationGuard

NAN = math.nan
PRIOR = torch.tensor([0.5, 0.25, 0.25])


def held(controller) -> MemorisationGuard:
    """The controller's memorisation guard (the limit that holds domains)."""
    guard = controller.limit(MemorisationGuard)
    assert guard is not None
    return guard


def favouring(weights: list[float], **options) -> StaticController:
    """A controller whose published weights are ``weights`` (above the prior where the guard may hold them)."""
    c = StaticController(PRIOR, **options)
    c.weights = torch.tensor(weights)
    return c


def test_held_out_losses_are_smoothed_and_their_lowest_kept_hand_computed():
    c = favouring([0.6, 0.2, 0.2], heldout_ema=0.5, heldout_tolerance=0.02)
    c.observe_heldout(torch.tensor([2.0, NAN, 3.0]))  # the second domain not measured yet
    assert (
        held(c).heldout[0] == 2.0
        and math.isnan(held(c).heldout[1])
        and held(c).heldout_best.tolist() == [2.0, math.inf, 3.0]
    )
    c.observe_heldout(torch.tensor([2.1, 1.0, 2.9]))
    assert held(c).heldout.tolist() == pytest.approx(
        [2.05, 1.0, 2.95]
    )  # 0.5 * new + 0.5 * old; first of domain 1 as is
    assert held(c).heldout_best.tolist() == pytest.approx([2.0, 1.0, 2.95])
    assert c.memorised().tolist() == [True, False, False]  # 2.05 > 2.0 + 0.02
    c.observe_heldout(torch.tensor([2.0, NAN, NAN]))  # 2.025: back under the tolerance, but no new lowest
    assert held(c).heldout[0].item() == pytest.approx(2.025) and c.memorised().tolist() == [True, False, False]
    c.observe_heldout(torch.tensor([1.9, NAN, NAN]))  # 0.5 * 1.9 + 0.5 * 2.025 = 1.9625: a new lowest frees it
    assert held(c).heldout_best[0].item() == pytest.approx(1.9625) and c.memorised().tolist() == [False, False, False]


def test_only_a_domain_drawn_above_its_start_counts_as_memorised():
    # both held-out losses rise; domain 0 is drawn above its start (memorised), domain 1 below it (forgotten)
    c = favouring([0.8, 0.1, 0.1], heldout_ema=0.0)
    c.observe_heldout(torch.tensor([2.0, 2.0, 2.0]))
    c.observe_heldout(torch.tensor([2.5, 2.5, 2.0]))
    assert c.memorised().tolist() == [True, False, False]
    # so what domain 0 gives up reaches domain 1 too (were 1 held as well, only domain 2 would take it)
    assert held(c)(torch.tensor([0.8, 0.1, 0.1])).tolist() == pytest.approx([0.5, 0.25, 0.25])
    at_start = favouring([0.5, 0.25, 0.25], heldout_ema=0.0)
    at_start.observe_heldout(torch.tensor([2.0, 2.0, 2.0]))
    at_start.observe_heldout(torch.tensor([2.5, 2.5, 2.5]))
    assert at_start.memorised().tolist() == [False, False, False]


def test_the_guard_caps_a_memorised_domain_at_its_start_and_gives_the_rest_to_the_others():
    c = favouring([0.7, 0.1, 0.2], heldout_ema=0.0)
    proposal = torch.tensor([0.7, 0.1, 0.2])
    assert torch.equal(held(c)(proposal), proposal)  # nothing measured: unchanged
    c.observe_heldout(torch.tensor([2.0, 2.0, 2.0]))
    c.observe_heldout(torch.tensor([2.5, 1.5, 1.5]))  # domain 0's held-out loss rose by 0.5
    # 0.7 -> 0.5; the 0.2 taken goes to the others in proportion 1 : 2
    assert held(c)(proposal).tolist() == pytest.approx([0.5, 0.1 + 0.2 / 3, 0.2 + 0.4 / 3])
    assert torch.equal(held(c)(torch.tensor([0.3, 0.3, 0.4])), torch.tensor([0.3, 0.3, 0.4]))  # below: kept


def odm_chasing_domain_0(**options) -> ODMController:
    """ODM after 30 steps of domain 0 losing far more than the others: it puts most weight there."""
    c = ODMController(torch.full((3,), 1 / 3), reward_scale=1.0, **options)
    for _ in range(30):
        c.observe(torch.tensor([6.0, 1.0, 1.0]), torch.tensor([0, 1, 2]))
        c.step()
    return c


def test_a_controller_chasing_a_memorised_domain_is_held_at_its_start_until_held_out_loss_falls_again():
    chasing = odm_chasing_domain_0()
    assert chasing.weights[0] > 0.6
    c = odm_chasing_domain_0(heldout_ema=0.0)
    c.observe_heldout(torch.tensor([2.0, 2.0, 2.0]))
    c.observe_heldout(torch.tensor([2.3, 1.9, 1.9]))  # domain 0 rises: memorised
    c.observe(torch.tensor([6.0, 1.0, 1.0]), torch.tensor([0, 1, 2]))
    w = c.step()
    assert w[0].item() == pytest.approx(1 / 3) and w.sum().item() == pytest.approx(1.0)
    assert w[1] / w[2] == pytest.approx(1.0)
    c.observe_heldout(torch.tensor([1.95, 1.9, 1.9]))  # domain 0 at a new lowest: free again
    c.observe(torch.tensor([6.0, 1.0, 1.0]), torch.tensor([0, 1, 2]))
    assert c.step()[0] > 0.6


def test_guard_state_is_checkpointed_and_resumes_exactly():
    c = odm_chasing_domain_0(heldout_ema=0.0)
    c.observe_heldout(torch.tensor([2.0, 2.0, 2.0]))
    c.observe_heldout(torch.tensor([2.3, 1.9, 1.9]))
    resumed = ODMController(torch.full((3,), 1 / 3), reward_scale=1.0, heldout_ema=0.0)
    resumed.load_state_dict(c.state_dict())
    assert torch.equal(held(resumed).heldout_best, held(c).heldout_best) and resumed.memorised().tolist() == [
        True,
        False,
        False,
    ]
    for controller in (c, resumed):
        controller.observe(torch.tensor([6.0, 1.0, 1.0]), torch.tensor([0, 1, 2]))
    assert torch.equal(c.step(), resumed.step())


def test_bad_held_out_input_and_settings_are_errors():
    c = StaticController(PRIOR)
    with pytest.raises(ValueError, match=r"held-out losses must have shape \(3,\), got \(2,\)"):
        c.observe_heldout(torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match=r"heldout_tolerance >= 0 and 0 <= heldout_ema < 1, got -1\.0, 0\.5"):
        StaticController(PRIOR, heldout_tolerance=-1.0)
    with pytest.raises(ValueError, match=r"got 0\.02, 1\.0"):
        StaticController(PRIOR, heldout_ema=1.0)


def _rank_heldout(rank: int, world: int, config: str) -> list[float]:
    dataset = MixedDataset.from_config(config, num_batches=4)
    mixer = OnlineMixer(StaticController(PRIOR, heldout_ema=0.0), dataset, lag=1)
    mixer.observe_heldout(torch.tensor([1.0 + rank, 4.0 * rank, NAN]))  # each rank scored its own windows
    return held(mixer.controller).heldout.tolist()


def test_ranks_average_their_held_out_losses(tmp_path):
    config = str(make_example(tmp_path))
    for record in run_ranks(2, tmp_path / "ranks", _rank_heldout, config=config):
        assert record[:2] == [1.5, 2.0] and math.isnan(record[2])  # (1 + 2) / 2, (0 + 4) / 2: the same on both


def test_the_epoch_budget_caps_each_weight_by_what_the_run_can_draw_hand_computed():
    c = StaticController(torch.full((3,), 1 / 3), repeat_budget=4)
    # 10 samples a step over 100 steps; domains of 10, 100 and 1,000 samples: 4 epochs allow weights of
    # 4 * size / 1,000 = 0.04, 0.4 and 4, raised to the starting weight where that is more: 1/3, 0.4, 1
    c.count_epochs(10, [10, 100, 1000], steps=100)
    assert held(c).epoch_cap.tolist() == pytest.approx([1 / 3, 0.4, 1.0])
    # 0.8 -> 1/3 frees 0.4667 for domains 1 and 2 (3 : 1): domain 1 reaches 0.5, over its 0.4, and the 0.1
    # above it goes to domain 2: 0.05 + 0.4667 / 4 + 0.1
    guarded = held(c)(torch.tensor([0.8, 0.15, 0.05]))
    assert guarded.tolist() == pytest.approx([1 / 3, 0.4, 0.05 + (0.8 - 1 / 3) / 4 + 0.1], abs=1e-6)


def test_the_mixer_tells_the_controller_how_long_the_run_is(tmp_path):
    config = make_example(tmp_path)
    dataset = MixedDataset.from_config(config, num_batches=40)
    mixer = OnlineMixer(ODMController(torch.full((3,), 1 / 3), repeat_budget=2.0), dataset, lag=1)
    sizes = dataset.spec.sizes.astype(float)
    expected = np.maximum(2.0 * sizes / (dataset.spec.global_batch_size * 40), 1 / 3).clip(max=1)
    assert held(mixer.controller).epoch_cap.tolist() == pytest.approx(expected.tolist())
    unlimited = OnlineMixer(ODMController(torch.full((3,), 1 / 3)), MixedDataset.from_config(config), lag=1)
    assert held(unlimited.controller).epoch_cap is None  # an endless run: only the hold after the budget is spent
    told = OnlineMixer(ODMController(torch.full((3,), 1 / 3), repeat_budget=2.0), MixedDataset.from_config(config),
                       lag=1, steps=40)  # fmt: skip
    assert held(told.controller).epoch_cap.tolist() == pytest.approx(expected.tolist())  # the trainer's own step count
    with pytest.raises(ValueError, match="steps must be an integer >= 1"):
        OnlineMixer(ODMController(torch.full((3,), 1 / 3)), MixedDataset.from_config(config), lag=1, steps=0)
