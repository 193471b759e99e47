"""ODM (Albalak et al., 2023, "Efficient Online Data Mixing"): EXP3 with the training loss as reward.

Domains are arms; a domain's reward is its training loss (high loss = much to
learn). After step ``t``, for each domain ``d`` seen in the step, with mean
loss ``L_d`` and ``π(d)`` the weight it was drawn with::

    R_d = α R_d + (1 - α) · L_d / π(d)          (importance-weighted, smoothed)
    ε_t = min(1/k, sqrt(ln k / (k t)))            (the paper's exploration schedule)
    π(d) = (1 - k ε_{t+1}) · softmax(ε_t R)_d + ε_{t+1}

During ``warmup`` steps the rewards are collected but the weights stay at
their initial values. ``π(d)`` is the current weight; with the loader's lag
the batch was drawn ``lag`` versions earlier (a small bias, documented).
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
    name = "odm"

    def __init__(self, initial: torch.Tensor, alpha: float = 0.9, warmup: int = 0, **kwargs):
        super().__init__(initial, **kwargs)
        if not 0 <= alpha < 1 or warmup < 0:
            raise ValueError(f"need 0 <= alpha < 1 and warmup >= 0, got alpha={alpha}, warmup={warmup}")
        self.alpha, self.warmup = alpha, warmup
        self.rewards = torch.zeros_like(self.weights)

    def schedule(self, step: int) -> dict[str, float]:
        k, t = self.num_domains, step - self.warmup
        explore = exploration(k, t + 1)
        return {"temperature": exploration(k, t), "explore": explore, "keep": 1 - k * explore}

    def phase(self) -> bool:
        return self.steps <= self.warmup  # warming up: weights held

    def update(self) -> torch.Tensor:
        losses, present = self.stats.take()
        observed = torch.lerp(losses / self.weights, self.rewards, self.alpha)  # α R + (1 - α) L / π
        self.rewards = torch.where(present, observed, self.rewards)
        if self.phase():
            return self.initial
        now = self.now
        return torch.softmax(self.rewards * now["temperature"], dim=0).mul_(now["keep"]).add_(now["explore"])

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"rewards": self.rewards}
