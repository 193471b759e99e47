import math

import numpy as np
import pytest
import torch

from onlinemix.mixing.controllers import (
    ADOController,
    ClusterBanditController,
    DGAController,
    DoReMiController,
    ODMController,
    ScheduledController,
    StaticController,
    gradient_alignment,
    neighbour_similarity,
)
from onlinemix.mixing.controllers.odm import exploration
from onlinemix.mixing.stats import DomainStats, ema

UNIFORM3 = torch.full((3,), 1 / 3)


def test_domain_stats_means_masks_and_problem_counts():
    stats = DomainStats(3)
    stats.add(torch.tensor([1.0, 3.0, 5.0, float("nan")]), torch.tensor([0, 0, 2, 2]))
    per_token = torch.tensor([[1.0, 9.0], [4.0, 6.0]])
    stats.add(per_token, torch.tensor([2, 7]), mask=torch.tensor([[1, 0], [1, 1]]))
    means, present = stats.take()
    assert means.tolist() == [2.0, 0.0, 3.0]  # domain 2: (5 + 1) / 2; the NaN and the id 7 are left out
    assert present.tolist() == [True, False, True]
    assert stats.problems.tolist() == [1.0, 1.0, 0.0]  # a NaN, a bad id, no rejected weights
    assert stats.take()[1].tolist() == [False, False, False]  # reset
    with pytest.raises(ValueError, match="do not match domains"):
        stats.add(torch.ones(3), torch.tensor([0, 1]))


def test_ema_keeps_absent_domains():
    out = ema(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]), torch.tensor([True, False]), 0.5)
    assert out.tolist() == [2.0, 1.0]


def test_doremi_update_hand_computed():
    c = DoReMiController(UNIFORM3, eta=1.0, smoothing=0.1, trust_region=None)  # the update alone
    losses, reference = torch.tensor([3.0, 2.0, 1.0, 4.0]), torch.tensor([1.0, 1.0, 2.0, 4.0])
    c.observe(losses, torch.tensor([0, 0, 1, 2]), reference=reference)
    w = c.step()
    # excess: domain 0 mean(2, 1) = 1.5, domain 1 max(0, -1) = 0, domain 2 0
    alpha = torch.tensor([math.exp(1.5), 1.0, 1.0])
    expected = 0.9 * alpha / alpha.sum() + 0.1 / 3
    assert torch.allclose(w, expected)
    assert torch.allclose(c.average, expected)
    c.step()  # nothing observed: each domain keeps its latest excess, λ = (1.5, 0, 0)
    alpha = expected * torch.tensor([math.exp(1.5), 1.0, 1.0])
    second = 0.9 * alpha / alpha.sum() + 0.1 / 3
    assert torch.allclose(c.weights, second)
    assert torch.allclose(c.average, (expected + second) / 2)
    c.observe(torch.tensor([2.5]), torch.tensor([1]), reference=torch.tensor([2.0]))  # domain 1 alone: 0.5
    alpha = second * torch.exp(torch.tensor([1.5, 0.5, 0.0]))
    assert torch.allclose(c.step(), 0.9 * alpha / alpha.sum() + 0.1 / 3)
    old = {key: value for key, value in c.state_dict().items() if key != "excess"}  # saved before it was kept
    resumed = DoReMiController(UNIFORM3, eta=1.0, smoothing=0.1, trust_region=None)
    with pytest.warns(UserWarning, match="no doremi state 'excess' .* starts from its initial value"):
        resumed.load_state_dict(old)
    assert torch.equal(resumed.excess, torch.zeros(3)) and torch.equal(resumed.weights, c.weights)


def test_odm_exp3_update_hand_computed():
    c = ODMController(UNIFORM3, reward_scale=0.5)
    rewards = torch.zeros(3)
    for step in range(1, 6):  # domain 1 alone, mean loss 3: each step adds 0.5 * 1 * 3 / π_1 to R_1
        rewards[1] += 0.5 * 3.0 / c.weights[1]
        c.observe(torch.tensor([2.0, 4.0]), torch.tensor([1, 1]))
        w = c.step()
        eps, previous = exploration(3, step), exploration(3, step - 1)
        assert torch.allclose(c.rewards, rewards)
        assert torch.allclose(w, (1 - 3 * eps) * torch.softmax(previous * rewards, 0) + eps)
    assert exploration(3, 3) == pytest.approx(1 / 3) and exploration(3, 5) == pytest.approx(math.sqrt(math.log(3) / 15))
    assert w[1] > 0.34 > w[0] == w[2]  # past t = k ln k the exploration rate decays and the weights move


def test_odm_moves_toward_high_loss_domains_as_training_goes_on():
    """The failure this pins: with smoothed (not summed) rewards every weight stayed within 0.01 of uniform for
    1,000 steps. Summed, a loss gap of one nat between two of six domains is a factor e^(0.1 sqrt(1000 ln 6 / 6))
    ≈ 5.6 between their weights after 1,000 steps."""
    k, batch = 6, 60
    c = ODMController(torch.full((k,), 1 / k))
    mean_loss = torch.linspace(2.0, 3.0, k)
    generator = torch.Generator().manual_seed(0)
    for _ in range(1000):
        counts = torch.round(c.weights * batch).long().clamp(min=1)  # the batch follows the weights
        domains = torch.repeat_interleave(torch.arange(k), counts)
        c.observe(mean_loss[domains] + 0.3 * torch.randn(len(domains), generator=generator), domains)
        c.step()
    ratio = (c.weights[-1] / c.weights[0]).item()
    assert 3.5 < ratio < 9, ratio
    assert torch.all(c.weights[1:] > c.weights[:-1])  # ordered by loss


def test_importance_gain_adds_the_target_similarity_to_the_feedback():
    # ODM: the reward of domain 1 is 0.5 * (L + γ s) / π with L = mean(2, 4), s = mean(-10, -30), γ = 0.05
    c = ODMController(UNIFORM3, reward_scale=0.5, importance_gain=0.05)
    c.observe(
        torch.tensor([[2.0, 2.0], [4.0, 4.0]]),
        torch.tensor([1, 1]),
        torch.ones(2, 2),
        importance=torch.tensor([-10.0, -30.0]),
    )
    c.step()
    assert torch.allclose(c.rewards, torch.tensor([0.0, 0.5 * (3.0 + 0.05 * -20.0) * 3, 0.0]))
    # DoReMi: the clipped excess loss plus γ s, per sample
    d = DoReMiController(UNIFORM3, eta=1.0, smoothing=0.0, importance_gain=0.1)
    d.observe(
        torch.tensor([3.0, 1.0]),
        torch.tensor([0, 2]),
        reference=torch.tensor([1.0, 2.0]),
        importance=torch.tensor([5.0, 10.0]),
    )
    alpha = torch.tensor([math.exp(2.0 + 0.5), 1.0, math.exp(0.0 + 1.0)])
    assert torch.allclose(d.step(), alpha / alpha.sum())
    with pytest.raises(ValueError, match=r"importance_gain=0\.05 needs observe"):
        c.observe(torch.ones(2), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"importance \(3,\) needs one value per sample"):
        c.observe(torch.ones(2), torch.tensor([0, 1]), importance=torch.ones(3))


def test_odm_warmup_holds_initial_weights():
    c = ODMController(torch.tensor([0.5, 0.3, 0.2]), warmup=2)
    for _ in range(2):
        c.observe(torch.tensor([5.0]), torch.tensor([2]))
        assert torch.allclose(c.step(), torch.tensor([0.5, 0.3, 0.2]))
    assert c.rewards.sum() == 0  # nothing counts during the warm-up
    for _ in range(4):
        c.observe(torch.tensor([5.0]), torch.tensor([2]))
        c.step()
    assert c.rewards[2] > 0 and c.weights[2] > 0.2  # above its prior


def test_ado_fits_each_domains_power_law_exactly():
    c = ADOController(torch.tensor([0.5, 0.5]), warmup=20, ignore=10, min_ratio=None)  # the update alone
    domains = torch.tensor([0] * 16 + [1] * 16)
    for t in range(1, 201):
        loss = torch.tensor([1.0 + 3.0 * t**-0.3, 2.0 + 1.0 * t**-0.6])
        c.observe(loss[domains], domains)
        c.step()
    epsilon, beta, alpha = c.fit()
    torch.testing.assert_close(epsilon, torch.tensor([1.0, 2.0], dtype=torch.float64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(beta, torch.tensor([3.0, 1.0], dtype=torch.float64), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(alpha, torch.tensor([0.3, 0.6], dtype=torch.float64))
    assert c.weights[0] > 0.75  # domain 0's loss still falls ~15x faster: 0.3 * 3 * 200^-0.3 vs 0.6 * 200^-0.6


def test_ado_reference_update_hand_computed():
    """With ``credit=True, shrinkage=False``: the authors' update, credit term included."""
    prior = torch.tensor([0.2, 0.8])
    c = ADOController(
        torch.tensor([0.5, 0.5]), prior=prior, warmup=4, ignore=0, mix=0.25, history=0.5, shrinkage=False, credit=True,
        min_ratio=None,
    )  # fmt: skip
    domains = torch.tensor([0, 1, 1, 1])  # shares 1/4, 3/4 every step
    for t in range(1, 5):
        c.observe(torch.tensor([2.0 + t**-0.5, 1.0 + 4 * t**-0.2])[domains], domains)
        assert torch.allclose(c.step(), torch.tensor([0.5, 0.5]))  # warm-up
    c.observe(torch.tensor([2.0 + 5**-0.5, 1.0 + 4 * 5**-0.2])[domains], domains)
    w = c.step()
    h = torch.tensor([0.5, 0.5])
    for _ in range(5):
        h = 0.5 * torch.tensor([0.25, 0.75]) + 0.5 * h
    slope = torch.tensor([0.5 * 1.0 * 5**-0.5, 0.2 * 4.0 * 5**-0.2])  # α β t^-α of the exact fits
    rho = prior * slope * torch.sqrt(h * (1 - h))
    assert torch.allclose(c.preference, rho, rtol=1e-4)
    average = torch.lerp(torch.tensor([0.5, 0.5]), rho / rho.sum(), 1 / 5)  # the initial weights count 4 steps
    assert torch.allclose(w, torch.lerp(average, rho / rho.sum(), 0.25), rtol=1e-4)


def test_ado_shrinks_each_slope_by_its_evidence_hand_computed():
    """The default update: each fitted slope pulled toward the prior-weighted mean by τ² / (τ² + v), computed here
    from the least-squares formulas in numpy (one exponent, so no choice of α)."""
    alpha, steps = 0.5, 12
    counts = np.array([1.0, 2.0, 5.0])  # samples of each domain a step
    floors, scales, wobble = np.array([1.0, 2.0, 0.5]), np.array([3.0, 1.0, 2.0]), np.array([0.05, 0.2, 0.01])
    prior = torch.tensor([0.5, 0.25, 0.25])
    c = ADOController(torch.full((3,), 1 / 3), prior=prior, warmup=1, ignore=0, exponents=(alpha,))
    domains = torch.tensor([0] + [1] * 2 + [2] * 5)
    t = np.arange(1, steps + 1, dtype=np.float64)
    losses = floors + scales * t[:, None] ** -alpha + wobble * (-1.0) ** t[:, None]  # (steps, 3)
    for step in range(steps):
        c.observe(torch.tensor(losses[step], dtype=torch.float32)[domains], domains)
        c.step()
    x = t**-alpha
    slope, variance = np.zeros(3), np.zeros(3)
    for d in range(3):
        w, y = counts[d], losses[:, d]
        X = np.stack([np.ones_like(x), x], axis=1)
        (epsilon, beta), *_ = np.linalg.lstsq(X * np.sqrt(w), y * np.sqrt(w), rcond=None)
        assert epsilon > 0 and beta > 0  # the unconstrained fit: no clamping in this test
        residual = (w * (y - epsilon - beta * x) ** 2).sum()
        beta_variance = residual / (steps - 2) / (w * ((x - x.mean()) ** 2).sum())
        scale = alpha * steps**-alpha
        slope[d], variance[d] = scale * beta, scale**2 * beta_variance
    mu = prior.double().numpy()
    mean = (mu * slope).sum()
    true_spread = max((mu * (slope - mean) ** 2).sum() - (mu * variance).sum(), 0.0)
    assert true_spread > 0
    reliability = true_spread / (true_spread + variance)
    shrunk = mean + reliability * (slope - mean)
    torch.testing.assert_close(c.reliability, torch.tensor(reliability, dtype=torch.float32), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(c.preference, prior * torch.tensor(shrunk, dtype=torch.float32), rtol=1e-4, atol=1e-6)
    assert reliability[1] < reliability[0] < reliability[2]  # the noisiest, least-drawn domain trusted least


def test_ado_counts_a_domain_without_enough_data_as_the_mean_slope():
    """A domain drawn on fewer than three steps has no slope to trust: it gets the others' mean, not zero (with
    ``shrinkage=False`` it is starved: β = 0 without data)."""
    domains = torch.tensor([0, 1])  # domain 2 never drawn
    for shrinkage, expected in ((True, True), (False, False)):
        c = ADOController(torch.full((3,), 1 / 3), warmup=1, ignore=0, shrinkage=shrinkage)
        for t in range(1, 30):
            c.observe(torch.tensor([1.0 + 2.0 * t**-0.4, 1.5 + 1.0 * t**-0.3]), domains)
            c.step()
        assert c.observations.tolist() == [29.0, 29.0, 0.0]
        slopes = c.slopes()
        assert (slopes[2] > 0).item() is expected
        if shrinkage:
            torch.testing.assert_close(slopes[2], slopes[:2].mean())  # the prior is uniform over all three
            assert c.reliability[2] == 0


def test_ado_prefers_the_prior_when_no_loss_falls():
    c = ADOController(
        torch.tensor([0.5, 0.5]), prior=torch.tensor([0.9, 0.1]), warmup=1, ignore=0, mix=1.0, min_ratio=None
    )
    for _ in range(5):
        c.observe(torch.tensor([2.0, 3.0]), torch.tensor([0, 1]))  # flat losses: β = 0 everywhere
        c.step()
    assert torch.allclose(c.weights, torch.tensor([0.9, 0.1]))
    with pytest.raises(ValueError, match="prior must be 2 non-negative weights"):
        ADOController(torch.tensor([0.5, 0.5]), prior=torch.tensor([1.0, -1.0]))
    with pytest.raises(ValueError, match="shrinkage and credit must be true or false, got 'no' and False"):
        ADOController(torch.tensor([0.5, 0.5]), shrinkage="no")  # a YAML string is not a switch


def test_bandit_update_hand_computed():
    prior = torch.tensor([0.5, 0.25, 0.25])
    rewards, domains = torch.tensor([1.0, 3.0, 2.0]), torch.tensor([0, 1, 1])
    mean, spread = 2.0, math.sqrt((1 + 9 + 4) / 3 - 4)  # over every reward so far

    def expected(estimates, bonus):
        logits = [math.log(p) + (e - mean) / spread + b for p, e, b in zip(prior.tolist(), estimates, bonus)]
        return torch.softmax(torch.tensor(logits), dim=0)

    alone = ClusterBanditController(prior, temperature=1.0, exploration=0.0)
    alone.observe(torch.zeros(3), domains, reward=rewards)  # the reward, not the loss, is what counts
    # cluster 2 was never drawn: its estimate is the overall mean
    torch.testing.assert_close(alone.step(), expected([1.0, 2.5, 2.0], [0, 0, 0]))

    sharing = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0], [0.0, 0.5, 0.5]])
    shared = ClusterBanditController(prior, sharing, temperature=1.0, exploration=1.0)
    shared.observe(torch.zeros(3), domains, reward=rewards)
    pulls = [1.5, 2.0, 1.0]  # reward sums [1, 5, 0] and pulls [1, 2, 0] pooled by the rows of `sharing`
    bonus = [math.sqrt(math.log(1 + 3) / (1 + n)) for n in pulls]
    torch.testing.assert_close(shared.step(), expected([3 / 1.5, 5 / 2, 2.5 / 1], bonus))


def test_bandit_credit_reaches_undrawn_neighbours_and_the_prior_keeps_clusters_out():
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])  # two pairs of neighbours
    similarity = neighbour_similarity(features, neighbours=2)
    assert torch.allclose(similarity.sum(dim=1), torch.ones(4))
    assert (similarity.argmax(dim=1) == torch.arange(4)).all()  # a cluster counts its own samples most
    assert similarity[0, 2] == 0 and similarity[0, 1] > 0
    bandit = ClusterBanditController(torch.tensor([0.3, 0.2, 0.3, 0.2]), similarity, exploration=0.0)
    for _ in range(5):  # cluster 0 pays, cluster 2 does not; 1 and 3 are never drawn
        bandit.observe(torch.zeros(4), torch.tensor([0, 0, 2, 2]), reward=torch.tensor([2.0, 2.2, 0.0, 0.1]))
        weights = bandit.step()
    assert weights[1] > 0.2 > weights[3]  # undrawn, but its neighbour paid
    out = ClusterBanditController(torch.tensor([0.5, 0.5, 0.0, 0.0]), similarity, exploration=1.0)
    out.observe(torch.zeros(4), torch.tensor([0, 1, 2, 3]), reward=torch.tensor([0.0, 0.0, 5.0, 5.0]))
    assert torch.equal(out.step()[2:], torch.zeros(2))  # the prior left them out: no reward brings them in


def test_bandit_rejects_bad_settings():
    with pytest.raises(ValueError, match="temperature > 0"):
        ClusterBanditController(UNIFORM3, temperature=0.0)
    with pytest.raises(ValueError, match="non-negative \\(3, 3\\) matrix"):
        ClusterBanditController(UNIFORM3, torch.eye(2))
    with pytest.raises(ValueError, match="each row of similarity must sum to 1"):
        ClusterBanditController(UNIFORM3, torch.ones(3, 3))
    with pytest.raises(ValueError, match="neighbours must be in \\[1, 3\\]"):
        neighbour_similarity(torch.rand(3, 2), neighbours=4)
    with pytest.raises(ValueError, match="one value per sample"):
        ClusterBanditController(UNIFORM3).observe(torch.zeros(2), torch.tensor([0, 1]), reward=torch.zeros(3))


def test_dga_mirror_descent_with_ema_every_t_steps():
    c = DGAController(UNIFORM3, eta=2.0, ema=0.5, every=2)
    c.observe_alignment(torch.tensor([1.0, 0.0, -1.0]))
    assert torch.allclose(c.step(), UNIFORM3)  # step 1: not an update step
    w = c.step()
    proposal = torch.softmax(torch.log(UNIFORM3) + 2.0 * torch.tensor([1.0, 0.0, -1.0]), 0)
    assert torch.allclose(w, 0.5 * UNIFORM3 + 0.5 * proposal)


def test_gradient_alignment_matches_hand_gradients():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))

    def loss_fn(m, x):  # loss = w . x  -> gradient = x
        return m(x).sum()

    a = gradient_alignment(
        model, loss_fn, [torch.tensor([[1.0, 0.0]]), None, torch.tensor([[3.0, 1.0]])], torch.tensor([[2.0, 5.0]])
    )
    assert a.tolist() == [2.0, 0.0, 11.0]
    assert model.weight.grad is None


def test_scheduled_linear_and_constant():
    waypoints = [(0, [1.0, 0.0]), (10, [0.0, 1.0])]
    linear = ScheduledController(waypoints, "linear")
    for _ in range(5):
        linear.step()
    assert torch.allclose(linear.weights, torch.tensor([0.5, 0.5]))
    constant = ScheduledController(waypoints, "constant")
    for _ in range(12):
        constant.step()
    assert torch.allclose(constant.weights, torch.tensor([0.0, 1.0]))
    with pytest.raises(ValueError, match="step 0"):
        ScheduledController([(5, [1.0, 0.0])])


def test_min_prob_floor_and_static():
    c = StaticController(torch.tensor([1.0, 0.0, 0.0]), min_prob=0.1)
    for _ in range(3):
        c.step()
    assert torch.allclose(c.weights, torch.tensor([0.8, 0.1, 0.1]))
    assert torch.allclose(StaticController.from_temperature([100, 400], 2.0).weights, torch.tensor([1 / 3, 2 / 3]))
    with pytest.raises(ValueError, match="min_prob"):
        StaticController(UNIFORM3, min_prob=0.5)


def test_state_dict_round_trip_continues_identically():
    a = ODMController(UNIFORM3)
    for step in range(3):
        a.observe(torch.tensor([1.0 + step, 2.0]), torch.tensor([0, 2]))
        a.step()
    b = ODMController(UNIFORM3)
    b.load_state_dict({k: v.clone() if torch.is_tensor(v) else v for k, v in a.state_dict().items()})
    for c in (a, b):
        c.observe(torch.tensor([5.0]), torch.tensor([1]))
        c.step()
    assert torch.equal(a.weights, b.weights) and torch.equal(a.rewards, b.rewards)
    with pytest.raises(ValueError, match="controller 'odm'"):
        DoReMiController(UNIFORM3).load_state_dict(a.state_dict())


SYNC_METHODS = ("item", "cpu", "tolist", "numpy", "__bool__", "__float__", "__int__", "__index__", "__array__")


@pytest.fixture
def no_host_sync(monkeypatch):
    """Make every tensor method that would move a value to the host raise."""

    def forbid(name):
        def raiser(*args, **kwargs):
            raise AssertionError(f"host synchronisation: Tensor.{name}() called")

        return raiser

    def install():
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, forbid(name))

    return install


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def build(name: str, k: int, device: str = "cpu", **kwargs):
    """Each controller, configured so that every phase of its update() is reached within a few steps."""
    uniform = torch.full((k,), 1 / k, device=device)
    return {
        "static": lambda: StaticController(uniform, min_prob=0.01, **kwargs),
        "scheduled": lambda: ScheduledController([(0, [1.0] * k), (3, [2] + [1] * (k - 1))], device=device, **kwargs),
        "doremi": lambda: DoReMiController(uniform, eta=0.5, importance_gain=0.01, **kwargs),
        "odm": lambda: ODMController(uniform, warmup=1, min_prob=0.001, importance_gain=0.01, **kwargs),
        "dga": lambda: DGAController(uniform, every=2, **kwargs),
        "ado": lambda: ADOController(uniform, warmup=2, ignore=1, importance_gain=0.01, **kwargs),
        "bandit": lambda: ClusterBanditController(
            uniform,
            neighbour_similarity(torch.rand(k, 4, generator=torch.Generator().manual_seed(0)), 3),
            warmup=1,
            importance_gain=0.01,
            **kwargs,
        ),
    }[name]()


def feed(controller, name: str, losses: torch.Tensor, domains: torch.Tensor) -> None:
    """One step's feedback: a plain and a masked (per-token) micro-batch, then the update."""
    tokens = losses[:, None].expand(-1, 5)
    mask = (torch.arange(5, device=losses.device) < domains[:, None] % 6).float()  # some rows fully masked
    importance = -10 * domains.float()  # a DSIR-like per-sample log weight (used where importance_gain is set)
    controller.observe(losses, domains, reference=losses * 0.5, importance=importance)
    controller.observe(tokens, domains, mask, reference=tokens * 0.5, importance=importance)
    if name == "dga":
        controller.observe_alignment((domains[: controller.num_domains] % 3).float() - 1)  # finite, varies
    controller.step()


ALL = ["static", "scheduled", "doremi", "odm", "dga", "ado", "bandit"]


@pytest.mark.parametrize("name", ALL)
def test_observe_and_step_never_sync_with_the_host(name, no_host_sync):
    k = 8
    controller = build(name, k)
    losses, domains = torch.rand(64), torch.randint(0, k, (64,))
    no_host_sync()
    with pytest.raises(AssertionError, match="host synchronisation"):
        torch.ones(1).item()  # the trap is set
    for _ in range(4):
        feed(controller, name, losses, domains)
    assert controller.weights.shape == (k,)


@CUDA
@pytest.mark.parametrize("graph", [False, True])
@pytest.mark.parametrize("name", ALL)
def test_no_sync_on_cuda(name, graph):
    k = 64
    controller = build(name, k, "cuda", graph=graph)
    losses, domains = torch.rand(4096, device="cuda"), torch.randint(0, k, (4096,), device="cuda")
    for _ in range(3):  # a graphed controller captures each input shape and phase on first use, which syncs
        feed(controller, name, losses, domains)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            feed(controller, name, losses, domains)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@CUDA
@pytest.mark.parametrize("name", ALL)
def test_cuda_graphs_replay_the_eager_updates(name):
    k = 16
    eager, graphed = build(name, k, "cuda"), build(name, k, "cuda", graph=True)
    generator = torch.Generator(device="cuda").manual_seed(0)
    for step in range(7):
        batch = 256 if step % 3 else 200  # a second input shape: a second capture
        losses = torch.rand(batch, device="cuda", generator=generator) * 3
        losses[step] = float("nan")
        domains = torch.randint(-1, k + 1, (batch,), device="cuda", generator=generator)  # some ids out of range
        for controller in (eager, graphed):
            feed(controller, name, losses, domains)
        # float atomics in scatter_add_ may sum in another order: equal up to rounding, not bit for bit
        torch.testing.assert_close(graphed.weights, eager.weights, rtol=1e-5, atol=1e-7)
    assert torch.equal(graphed.stats.problems, eager.stats.problems)
    resumed = build(name, k, "cuda", graph=True)
    resumed.load_state_dict(graphed.state_dict())
    for controller in (graphed, resumed):
        feed(controller, name, losses, domains)
    torch.testing.assert_close(resumed.weights, graphed.weights, rtol=1e-5, atol=1e-7)


def test_graphs_need_cuda():
    with pytest.raises(ValueError, match="graph=True needs the controller on a CUDA device"):
        ODMController(UNIFORM3, graph=True)


def test_compiled_accumulation_is_one_graph_and_equals_eager():
    losses = torch.rand(256)
    losses[3] = float("inf")
    domains = torch.randint(0, 8, (256,))
    eager, compiled = (DoReMiController(torch.full((8,), 1 / 8), compile=c) for c in (False, "eager"))
    for controller in (eager, compiled):
        for _ in range(3):
            controller.observe(losses, domains, reference=losses * 0.5)
            controller.observe(
                losses[:, None].expand(256, 4), domains, torch.ones(256, 4), reference=losses[:, None].expand(256, 4)
            )
            controller.step()
    assert torch.equal(eager.weights, compiled.weights)
    assert torch.equal(eager.stats.problems, compiled.stats.problems)


def test_dga_distribution_reweighting_moves_weights_over_basis_rows():
    basis = torch.tensor([[0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.25, 0.75]])
    c = DGAController(torch.tensor([0.5, 0.5]), eta=1.0, ema=0.0, basis=basis)
    assert torch.allclose(c.weights, torch.tensor([0.25, 0.25, 0.125, 0.375]))
    c.observe_alignment(torch.tensor([math.log(3.0), 0.0]))  # row 0 aligns better: alpha -> [3/4, 1/4]
    assert torch.allclose(c.step(), torch.tensor([0.375, 0.375, 0.0625, 0.1875]))
    with pytest.raises(ValueError, match=r"alignment must have shape \(2,\)"):
        c.observe_alignment(torch.zeros(4))
    with pytest.raises(ValueError, match="each row of basis must be a distribution"):
        DGAController(torch.tensor([1.0]), basis=torch.tensor([[0.5, 0.6]]))
    with pytest.raises(ValueError, match=r"basis must be \(m, k\) with m = 2"):
        DGAController(torch.tensor([0.5, 0.5]), basis=torch.ones(3, 2) / 2)


def test_dga_aligns_less_often_once_its_updates_stop_moving_the_weights_hand_computed():
    # a 0.01-nat trust region: after the first update the weights sit at its boundary and the same alignment
    # moves them no more, so the steps between updates double, 2 -> 4 -> 8 (max_every); a new direction moves
    # them again and brings the interval back to 2
    c = DGAController(UNIFORM3, eta=2.0, ema=0.0, every=2, max_every=8, trust_region=0.01)
    due = []
    for step in range(1, 31):
        due.append(c.alignment_due())
        if due[-1]:
            c.observe_alignment(torch.tensor([1.0, 0.0, -1.0]) if step < 24 else torch.tensor([-1.0, 0.0, 1.0]))
        c.step()
    updates = [step for step, is_due in enumerate(due, 1) if is_due]
    # 2 moves them (the interval stays 2), 4 does not (-> 4), nor 8 (-> 8), nor 16 (8 at most); 24 turns them to
    # the boundary's other side (back to 2), where 26 moves them no more (-> 4): 30
    assert updates == [2, 4, 8, 16, 24, 26, 30], updates
    resumed = DGAController(UNIFORM3, eta=2.0, ema=0.0, every=2, max_every=8, trust_region=0.01)
    resumed.load_state_dict(c.state_dict())
    assert (resumed.interval, resumed.last_update) == (c.interval, c.last_update)
    assert [resumed.alignment_due() for _ in range(1)] == [c.alignment_due()]
