"""A bandit over many clusters (the Quad setting, Zhang et al., 2025): Boltzmann exploration around a prior, with
credit shared between neighbouring clusters and an optional upper-confidence bonus.

With hundreds or thousands of clusters a run draws each one a few dozen times: one cluster's own
samples say little about it. Neighbouring clusters (near in embedding or n-gram space) have similar
value, so each arm's estimate pools its neighbours' samples through a row-normalised similarity
``S`` (``neighbour_similarity`` builds one from cluster features)::

    n_d   = Σ_j S_dj · pulls_j                       (pulls shared with the neighbours)
    r_d   = Σ_j S_dj · reward_sum_j / n_d            (their mean reward; the overall mean where n_d = 0)
    z_d   = (r_d − r̄) / σ + c · sqrt(ln(1 + N) / (1 + n_d))      (standardised, plus an optimism bonus)
    w     = softmax(log μ + z / τ)

with ``r̄`` and ``σ`` the mean and standard deviation of every reward so far, ``N`` the pulls so far,
``μ`` the starting weights (the prior: e.g. DSIR's, ``w ∝ exp(−KL(target ‖ cluster) / T)``), ``c`` =
``exploration`` and ``τ`` = ``temperature``. Standardising makes ``τ`` mean the same whatever the reward's
scale: a cluster one standard deviation better than the average gains a factor ``e^(1/τ)`` over its prior.
The bonus lifts clusters few samples have spoken for; it shrinks as their neighbourhood is drawn. It is off by
default: the prior and the softmax already keep every cluster it allows in play, and with hundreds of clusters a
bonus divided by a small ``τ`` pours weight onto the many clusters the prior rules out (in the quality suite's
*many* scenario ``c = 1`` ended 0.05 nats worse on the target than ``c = 0``, seed 0).

The reward is a per-sample score passed as ``observe(..., reward=...)``, higher for samples worth more:
e.g. how much better a model of the target predicts the sample than a general model does
(``loss_general − loss_target``, CoLoR-Filter's conditional loss reduction), or a DSIR log importance
weight. Without one it is the training loss (as in ODM: high loss, much left to learn).
Rewards are pooled over the whole run (the estimate of a cluster's value sharpens, it does not drift);
``discount`` < 1 forgets old samples for a reward that changes as the model learns.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from onlinemix.mixing.controllers.base import Controller, ControllerContext
from onlinemix.mixing.stats import DomainStats


def neighbour_similarity(features: torch.Tensor, neighbours: int = 8) -> torch.Tensor:
    """The ``(k, k)`` credit-sharing matrix of ``ClusterBanditController``: each cluster shares with itself and
    its ``neighbours`` - 1 most similar clusters by cosine similarity of ``features`` (``(k, f)``: e.g. cluster
    centroids of embeddings, or hashed n-gram frequencies), in proportion to the (non-negative) similarity;
    each row sums to 1 and the cluster itself always weighs most."""
    features = torch.as_tensor(features, dtype=torch.float32)
    if features.ndim != 2 or len(features) < 1:
        raise ValueError(f"features must be a (clusters, dimensions) matrix, got shape {tuple(features.shape)}")
    if not 1 <= neighbours <= len(features):
        raise ValueError(f"neighbours must be in [1, {len(features)}] (the clusters), got {neighbours}")
    unit = torch.nn.functional.normalize(features, dim=1)
    similarity = (unit @ unit.T).clamp(min=0)
    similarity.fill_diagonal_(1.0)  # a cluster always counts its own samples fully
    top = similarity.topk(neighbours, dim=1)
    kept = torch.zeros_like(similarity).scatter_(1, top.indices, top.values)
    return kept / kept.sum(dim=1, keepdim=True)


class ClusterBanditController(Controller):
    """A softmax mixture around a prior, from rewards pooled with neighbouring clusters (and an optional
    upper-confidence bonus; see the module docstring).

    Args:
        initial: the prior ``μ`` over the clusters (e.g. DSIR's): the weights before any reward, and the base
            every update starts from (a cluster the prior leaves out stays out).
        similarity: ``(k, k)`` non-negative credit sharing, each row summing to 1 (``neighbour_similarity``);
            ``None``: none (each cluster is its own arm).
        temperature: ``τ``: a cluster one standard deviation of reward above the mean gains ``e^(1/τ)`` over its
            prior. Smaller concentrates the mixture on fewer clusters and trusts the estimates more; larger stays
            nearer the prior. (With a reward that separates the target's kind of cluster from the rest by a few
            standard deviations, 0.1 concentrates on those and ranks them.)
        exploration: ``c``: the optimism bonus in standard deviations at one pull (default 0: none). Larger draws
            clusters whose neighbourhood is little known more often before the estimates settle.
        discount: each step's factor on the pooled rewards and pulls (1: keep every sample). Below 1 for a
            reward that changes as training goes (e.g. the training loss): ``1 - 1/h`` remembers about ``h``
            steps.
        warmup: steps with the prior's weights while rewards are pooled (the bandit's first estimates are
            noisy; 0: from the first step).
        **kwargs: ``Controller``'s (``min_prob``, ``importance_gain``, ``repeat_budget``, ``device``, ``graph``...).
            ``trust_region`` is ``None`` by default (the other adaptive controllers: 0.5 nats). The region is
            there to stop a noisy signal swinging the mixture; the bandit's estimates pool every reward of the run
            (they sharpen, they do not swing) and ``τ`` already sets how far one standard deviation of reward moves
            a cluster from its prior. What keeps it off a small domain it would memorise is the epoch budget
            (``repeat_budget``), and the held-out probes where the trainer scores them. In the quality suite a
            0.5-nat region cost it 0.065 nats where the best mixture is all one domain (*targeted*).
    """

    name = "bandit"
    config_knobs = ("neighbours",)
    default_limits: ClassVar[dict[str, Any]] = {**Controller.default_limits, "trust_region": None}

    def __init__(
        self,
        initial: torch.Tensor,
        similarity: torch.Tensor | None = None,
        temperature: float = 0.1,
        exploration: float = 0.0,
        discount: float = 1.0,
        warmup: int = 0,
        **kwargs,
    ):
        super().__init__(initial, **kwargs)
        if not (temperature > 0 and exploration >= 0 and 0 < discount <= 1 and warmup >= 0):
            raise ValueError(
                "need temperature > 0, exploration >= 0, 0 < discount <= 1 and warmup >= 0, got "
                f"temperature={temperature}, exploration={exploration}, discount={discount}, warmup={warmup}"
            )
        self.temperature, self.exploration, self.discount, self.warmup = temperature, exploration, discount, warmup
        k = self.num_domains
        if similarity is not None:
            similarity = torch.as_tensor(similarity, dtype=torch.float32, device=self.device)
            if similarity.shape != (k, k) or (similarity < 0).any():
                raise ValueError(f"similarity must be a non-negative ({k}, {k}) matrix, got {tuple(similarity.shape)}")
            rows = similarity.sum(dim=1)
            if not torch.allclose(rows, torch.ones_like(rows), atol=1e-4):
                raise ValueError("each row of similarity must sum to 1 (see neighbour_similarity)")
        self.similarity = similarity
        self.squares = DomainStats(k, self.device)  # the rewards' squares: their spread standardises the scores
        self.reward_sums = torch.zeros_like(self.weights)
        self.square_sums = torch.zeros_like(self.weights)
        self.pulls = torch.zeros_like(self.weights)
        self.log_prior = torch.log(self.initial)  # -inf where the prior is 0: such a cluster stays out

    @classmethod
    def from_settings(
        cls, initial: torch.Tensor, knobs: dict[str, Any], context: ControllerContext
    ) -> ClusterBanditController:
        """From a mixture file: ``neighbours: N`` shares each domain's credit with its ``N - 1`` nearest by the
        importance estimator's n-gram profiles (``importance.estimator`` must be set)."""
        neighbours = knobs.pop("neighbours", None)
        if neighbours is not None:
            if context.features is None:
                raise ValueError("neighbours needs the domains' feature profiles (importance.estimator)")
            knobs["similarity"] = neighbour_similarity(torch.from_numpy(context.features()), neighbours)
        return cls(initial, device=context.device, **knobs)

    def record(self, losses, domains, mask=None, *, reward: torch.Tensor | None = None, **signals) -> None:
        values = losses if reward is None else reward
        if reward is not None and reward.shape[0] != domains.shape[0]:
            raise ValueError(f"reward {tuple(reward.shape)} needs one value per sample of {tuple(domains.shape)}")
        values = self.with_importance(values.detach().float(), signals)
        self.stats.add(values, domains, mask)
        self.squares.add(values * values, domains, mask)  # per-token rewards: σ is their spread over tokens

    def phase(self) -> bool:
        return self.steps <= self.warmup  # warming up: the prior's weights

    def update(self) -> torch.Tensor:
        means, counts = self.stats.take_counts()
        squares, _ = self.squares.take_counts()
        self.reward_sums = self.discount * self.reward_sums + means * counts
        self.square_sums = self.discount * self.square_sums + squares * counts
        self.pulls = self.discount * self.pulls + counts
        if self.phase():
            return self.initial
        return self.preference()

    def preference(self) -> torch.Tensor:
        """The mixture the pooled rewards give now: ``softmax(log μ + z / τ)``."""
        total = self.pulls.sum().clamp(min=1)
        mean = self.reward_sums.sum() / total
        spread = torch.sqrt((self.square_sums.sum() / total - mean * mean).clamp(min=1e-12))
        sums, pulls = self.reward_sums, self.pulls
        if self.similarity is not None:
            sums, pulls = self.similarity @ sums, self.similarity @ pulls
        estimate = torch.where(pulls > 0, sums / pulls.clamp(min=1e-12), mean)
        bonus = self.exploration * torch.sqrt(torch.log1p(total) / (1 + pulls))
        score = (estimate - mean) / spread + bonus
        return torch.softmax(self.log_prior + score / self.temperature, dim=0)

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"reward_sums": self.reward_sums, "square_sums": self.square_sums, "pulls": self.pulls}
