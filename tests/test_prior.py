"""A controller's starting weights are its prior: ODM starts from them and keeps them in every update; a trust
region bounds how far any controller can move from them; DGA averages noisy alignments before they move it."""

from __future__ import annotations

import math

import pytest
import torch
import yaml
from conftest import make_example

from onlinemix import (
    ADOController,
    DGAController,
    DoReMiController,
    MixedDataset,
    ODMController,
    OnlineMixer,
    ScheduledController,
)
from onlinemix.loaders.config import ConfigError
from onlinemix.mixing.controllers.odm import exploration
from onlinemix.mixing.limits import MinRatio, TrustRegion

PRIOR = torch.tensor([0.5, 0.3, 0.2])


def kl(p: torch.Tensor, q: torch.Tensor) -> float:
    return float((p * (p / q).log()).sum())


def test_odm_starts_from_its_prior_and_keeps_it_in_every_update_hand_computed():
    c = ODMController(PRIOR, reward_scale=0.5)
    rewards = torch.zeros(3)
    for step in range(1, 7):  # domain 1 alone, mean loss 3: each step adds 0.5 * 1 * 3 / π_1 to R_1
        rewards[1] += 0.5 * 3.0 / c.weights[1]
        c.observe(torch.tensor([2.0, 4.0]), torch.tensor([1, 1]))
        w = c.step()
        eps, previous = exploration(3, step), exploration(3, step - 1)
        preference = torch.softmax(PRIOR.log() + previous * rewards, 0)
        assert torch.allclose(w, (1 - 3 * eps) * preference + 3 * eps * PRIOR), step
        if step == 1:  # the first update: exactly the prior (it used to be uniform)
            assert torch.allclose(w, PRIOR)
    assert w[1] > PRIOR[1] and w[0] / w[2] == pytest.approx(0.5 / 0.2, rel=1e-5)  # the others keep their ratio


def test_odm_with_equal_rewards_stays_at_its_prior():
    c = ODMController(PRIOR, reward_scale=0.1)
    for _ in range(50):
        domains = torch.arange(3).repeat_interleave(torch.round(c.weights * 30).long())
        c.observe(torch.full((len(domains),), 2.0), domains)  # rewards ∝ share / π: equal in expectation
        c.step()
    assert torch.allclose(c.weights, PRIOR, atol=0.02)


def test_odm_excludes_a_domain_its_prior_leaves_out():
    c = ODMController(torch.tensor([0.5, 0.5, 0.0]))
    for _ in range(10):
        c.observe(torch.tensor([9.0]), torch.tensor([0]))
        assert c.step()[2] == 0


def proposal_of(alignment: torch.Tensor, **options) -> tuple[DGAController, torch.Tensor]:
    """A DGA controller after one step with ``alignment`` (η = 1, no EMA: the proposal is softmax(log μ + a));
    without a trust region unless ``options`` gives one."""
    c = DGAController(PRIOR, eta=1.0, ema=0.0, **{"trust_region": None, **options})
    c.observe_alignment(alignment)
    return c, c.step()


def test_inside_the_trust_region_a_proposal_is_unchanged():
    alignment = torch.tensor([0.1, 0.0, -0.1])
    _, free = proposal_of(alignment)
    assert kl(free, PRIOR) < 0.01
    _, bounded = proposal_of(alignment, trust_region=0.01)
    assert torch.allclose(bounded, free)


def test_outside_the_trust_region_a_proposal_is_pulled_back_to_its_boundary_along_the_geodesic():
    alignment = torch.tensor([-2.0, 0.5, 3.0])
    _, free = proposal_of(alignment)
    assert kl(free, PRIOR) > 1.0
    _, w = proposal_of(alignment, trust_region=0.25)
    assert kl(w, PRIOR) == pytest.approx(0.25, abs=1e-5)
    # w ∝ μ^(1-τ) p^τ with p ∝ μ e^a: log(w / μ) = τ a + const, the same τ for every domain
    shift = (w / PRIOR).log()
    tau = (shift[2] - shift[0]) / (alignment[2] - alignment[0])
    assert 0 < tau < 1
    assert (shift[1] - shift[0]) / (alignment[1] - alignment[0]) == pytest.approx(float(tau), rel=1e-4)


def test_a_trust_region_keeps_a_long_run_near_the_prior_where_it_would_collapse():
    free = DGAController(PRIOR, eta=1.0, ema=0.0, trust_region=None)
    bounded = DGAController(PRIOR, eta=1.0, ema=0.0, trust_region=0.1)
    default = DGAController(PRIOR, eta=1.0, ema=0.0)  # every adaptive controller's: 0.5 nats
    for _ in range(30):
        for c in (free, bounded, default):
            c.observe_alignment(torch.tensor([1.0, 0.0, 0.0]))
            c.step()
    assert free.weights[0] > 0.999
    assert kl(bounded.weights, PRIOR) == pytest.approx(0.1, abs=1e-4) and bounded.weights[0] < 0.8
    assert kl(default.weights, PRIOR) == pytest.approx(0.5, abs=1e-4) and default.weights[0] < 0.96


def test_every_adaptive_controller_is_bounded_by_default_and_replayed_weights_are_not():
    doremi = DoReMiController(PRIOR, eta=5.0)
    for _ in range(20):  # domain 2 lags its reference by 2 nats every step: unbounded, it would take everything
        doremi.observe(torch.tensor([1.0, 1.0, 3.0]), torch.tensor([0, 1, 2]), reference=torch.ones(3))
        doremi.step()
    assert kl(doremi.weights, PRIOR) == pytest.approx(0.5, abs=1e-4) and doremi.weights[2] < 0.75
    replay = ScheduledController([(0, [0.5, 0.3, 0.2]), (2, [0.0, 0.0, 1.0])])
    for _ in range(2):
        replay.step()
    assert torch.equal(replay.weights, torch.tensor([0.0, 0.0, 1.0]))  # infinitely far from its start: as recorded


@pytest.mark.parametrize("value", [0, -1.0, "wide"])
def test_a_trust_region_must_be_positive(value):
    with pytest.raises(ValueError, match="trust_region must be a number of nats > 0"):
        ODMController(PRIOR, trust_region=value)


def test_the_trust_region_is_a_mixing_key_of_the_mixture_file(tmp_path):
    config = make_example(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["mixing"] = {"controller": "odm", "trust_region": 0.2, "min_ratio": 0.7, "reward_scale": 5.0}
    config.write_text(yaml.safe_dump(raw))
    dataset = MixedDataset.from_config(config)
    mixer = OnlineMixer.from_config(config, dataset)
    assert (mixer.controller.limit(TrustRegion).nats, mixer.controller.limit(MinRatio).ratio) == (0.2, 0.7)
    for _ in range(20):
        mixer.controller.observe(torch.tensor([9.0, 1.0]), torch.tensor([2, 0]))
        mixer.controller.step()
    assert kl(mixer.controller.weights, PRIOR) <= 0.2 + 1e-5
    # unbounded by min_ratio, domains 0 and 1 would end at 0.32 and 0.19: both are held at 0.7 of their start
    torch.testing.assert_close(mixer.controller.weights[:2], 0.7 * PRIOR[:2])
    raw["mixing"]["trust_region"] = -1
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"mixing \(odm controller\): trust_region must be"):
        OnlineMixer.from_config(config, dataset)


def test_dga_averages_alignments_before_they_move_the_weights_hand_computed():
    c = DGAController(PRIOR, eta=2.0, ema=0.0, alignment_ema=0.75)
    mixture, smoothed = PRIOR.clone(), torch.zeros(3)
    for a in ([1.0, 0.0, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 1.0]):
        a = torch.tensor(a)
        smoothed = 0.75 * smoothed + 0.25 * a
        mixture = torch.softmax(mixture.log() + 2.0 * smoothed, 0)
        c.observe_alignment(a)
        assert torch.allclose(c.step(), mixture, atol=1e-6)
    # one alignment for domain 0, then two for domain 2: unsmoothed, domain 2 would lead by far
    assert c.weights[2] / c.weights[0] < 0.2 / 0.5 * math.exp(2.0 * 1.0)


def test_dga_with_averaged_alignments_resumes_exactly():
    a = DGAController(PRIOR, eta=2.0, alignment_ema=0.5)
    alignments = [torch.tensor([0.3, -0.1, 0.2]) * (i + 1) for i in range(6)]
    for alignment in alignments[:3]:
        a.observe_alignment(alignment)
        a.step()
    b = DGAController(PRIOR, eta=2.0, alignment_ema=0.5)
    b.load_state_dict(a.state_dict())
    for alignment in alignments[3:]:
        for c in (a, b):
            c.observe_alignment(alignment)
            c.step()
    assert torch.equal(a.weights, b.weights)


@pytest.mark.parametrize("value", [-0.1, 1.0])
def test_dga_alignment_ema_must_be_in_0_1(value):
    with pytest.raises(ValueError, match=r"0 <= alignment_ema < 1; got 1.0, 0.9, 1, " + str(value)):
        DGAController(PRIOR, alignment_ema=value)


class Proposing(ODMController):
    """A controller whose every update proposes the same weights: what ``step()`` makes of them is the base's."""

    def __init__(self, proposal: list[float], **options):
        super().__init__(torch.full((4,), 0.25), **{"trust_region": None, **options})
        self.proposal = torch.tensor(proposal)

    def update(self) -> torch.Tensor:
        return self.proposal


@pytest.mark.parametrize(
    ("proposal", "expected"),
    [
        ([0.7, 0.1, 0.1, 0.1], [0.4, 0.2, 0.2, 0.2]),  # bounds 0.2 each; the 0.2 left goes to the one above its own
        ([0.5, 0.3, 0.15, 0.05], [0.35, 0.25, 0.2, 0.2]),  # excesses 0.3 and 0.1 share the 0.2 left 3:1
        ([0.3, 0.3, 0.2, 0.2], [0.3, 0.3, 0.2, 0.2]),  # at or above every bound: unchanged
    ],
)
def test_min_ratio_keeps_every_weight_above_its_share_of_the_start_hand_computed(proposal, expected):
    c = Proposing(proposal, min_ratio=0.8)
    c.observe(torch.tensor([1.0]), torch.tensor([0]))
    torch.testing.assert_close(c.step(), torch.tensor(expected))
    assert torch.equal(Proposing(proposal).step(), torch.tensor(proposal))  # no bound by default (but ADO's)


def test_ado_keeps_nine_tenths_of_every_starting_weight_by_default():
    bounded, free = ADOController(PRIOR, warmup=1, ignore=0), ADOController(PRIOR, warmup=1, ignore=0, min_ratio=None)
    for t in range(1, 40):  # domain 0's loss falls fast, the others' are flat
        for c in (bounded, free):
            c.observe(torch.tensor([1.0 + 3.0 * t**-0.5, 2.0, 2.0]), torch.tensor([0, 1, 2]))
            c.step()
    assert free.weights[2] < 0.5 * PRIOR[2]
    torch.testing.assert_close(bounded.weights[1:], 0.9 * PRIOR[1:])
    assert bounded.limit(MinRatio).ratio == 0.9 and free.limit(MinRatio) is None


@pytest.mark.parametrize("value", [0, 1, 1.5, "most"])
def test_min_ratio_must_be_a_fraction(value):
    with pytest.raises(ValueError, match=rf"min_ratio must be a fraction in \(0, 1\) \(or None\), got {value!r}"):
        ODMController(PRIOR, min_ratio=value)
