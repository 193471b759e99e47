"""ODM (Albalak et al., 2023, "Efficient Online Data Mixing"): EXP3 with the training loss as reward.

Domains are arms; a sample's reward is its training loss (high loss = much
left to learn). As in the authors' reference code, each domain accumulates its
importance-weighted rewards, and the weights are a softmax of the sums under
the paper's decaying exploration rate::

    R_d += s · (n_d / n) · L_d / π(d)          (cumulative, importance-weighted)
    ε_t  = min(1/k, sqrt(ln k / (k t)))
    π(d) = (1 - k ε_t) · softmax(log μ + ε_{t-1} R)_d + k ε_t μ_d

with ``n_d / n`` the share of the step's samples that came from ``d`` (each
sample is one pull of its arm, drawn with probability ``π(d)``, so the
estimate of every domain's loss is unbiased whether the batch holds one
domain or all of them) and ``s`` = ``reward_scale`` (0.1, the reference's
"scale down reward so that cumulative reward doesn't explode").

Why cumulative: ``ε_t R_d`` then grows like ``s · L_d · sqrt(t ln k / k)``, so
a loss difference between two domains moves their weights further the longer
training runs. An earlier version of this controller smoothed the reward with
an exponential moving average instead of summing it; ``ε_t`` times a bounded
reward shrinks toward 0 and every weight stayed within 0.01 of uniform for a
thousand steps, whatever the losses (``tests/test_controllers.py`` pins both).

**The starting weights are the prior** ``μ``: they enter every update, in the
softmax and in the exploration term, so ``R = 0`` gives ``π = μ`` and equal
rewards keep it there; rewards move the weights away from ``μ``, not from
uniform. (The reference starts from uniform, where the two agree: ``log μ`` is
a constant and ``k ε μ_d = ε``. An earlier version of this controller returned
to exactly uniform at its first update whatever the file's weights were.)

During ``warmup`` steps nothing is accumulated and the weights stay at their
initial values. ``π(d)`` is the current weight; with the loader's lag the
batch was drawn ``lag`` versions earlier (a small bias, documented).
"""

from __future__ import annotations

import math

import torch

from onlinemix.mixing.controllers.base import Controller


def exploration(num_domains: int, t: int) -> float:
    """ε_t = min(1/k, sqrt(ln k / (k t))), and 1/k for t = 0."""
    if t <= 0:
        return 1.0 / num_domains
    return min(1.0 / num_domains, math.sqrt(math.log(num_domains) / (num_domains * t)))


class ODMController(Controller):
    """EXP3 over the domains with the training loss as reward (see the module docstring).

    Args:
        initial: the starting weights ``μ``: the weights during warm-up, and the prior every update starts from.
        reward_scale: ``s``, multiplies every reward before it is summed. Larger
            moves the weights sooner and further toward high-loss domains.
        warmup: optimizer steps with the initial weights, before any reward counts.
        **kwargs: ``Controller``'s (``min_prob``, ``device``, ``importance_gain``, ``graph``...).
    """

    name = "odm"

    def __init__(self, initial: torch.Tensor, reward_scale: float = 0.1, warmup: int = 0, **kwargs):
        super().__init__(initial, **kwargs)
        if not (math.isfinite(reward_scale) and reward_scale > 0) or warmup < 0:
            raise ValueError(f"need reward_scale > 0 and warmup >= 0, got reward_scale={reward_scale}, warmup={warmup}")
        self.reward_scale, self.warmup = reward_scale, warmup
        self.rewards = torch.zeros_like(self.weights)
        # log μ; a domain the prior leaves out (weight 0) stays out: exp(-inf) = 0 in the softmax
        self.log_prior = torch.log(self.initial)

    def schedule(self, step: int) -> dict[str, float]:
        k, t = self.num_domains, step - self.warmup
        explore = k * exploration(k, t)  # the share of the weight spread by the prior
        return {"temperature": exploration(k, t - 1), "explore": explore, "keep": 1 - explore}

    def phase(self) -> bool:
        return self.steps <= self.warmup  # warming up: weights held

    def update(self) -> torch.Tensor:
        losses, counts = self.stats.take_counts()
        if self.phase():
            return self.initial
        share = counts / counts.sum().clamp(min=1)
        self.rewards = self.rewards + self.reward_scale * share * losses / self.weights
        now = self.now
        preference = torch.softmax(self.log_prior + self.rewards * now["temperature"], dim=0)
        return preference * now["keep"] + now["explore"] * self.initial

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"rewards": self.rewards}
