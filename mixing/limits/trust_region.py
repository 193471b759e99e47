"""The trust region: every published mixture within ``KL(w ‖ starting weights) ≤ δ`` nats of the prior."""

from __future__ import annotations

import torch

from onlinemix.mixing.limits.base import Limit
from onlinemix.mixing.limits.settings import positive_number

BISECTION_STEPS = 24  # τ to 2^-24: a fixed count, no branch on a value


class TrustRegion(Limit):
    """A proposal further than ``nats`` from the starting weights is pulled back along the geodesic
    ``w_τ ∝ initial^(1-τ) · w^τ`` to the boundary (``τ`` by bisection on the device, no host sync).

    For scale: 70% of the weight on one of 7 domains (the rest even) is 0.80 nats from uniform, 90% is 1.44,
    50% is 0.35; with 256 domains, all the weight spread over 155 of them is 0.5. Smaller is safer and moves
    less: no signal, however noisy, takes the mixture far from the prior the user chose.
    """

    name = "trust_region"

    def __init__(self, nats: float):
        self.nats = positive_number(nats, "trust_region", "a number of nats")

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` unchanged inside the region; outside, the largest ``τ`` whose point is inside."""
        allowed = self.initial > 0  # a domain the prior leaves out stays out, exactly
        log_prior = torch.log(self.initial.clamp(min=1e-30))
        log_proposal = torch.log((weights / weights.sum()).clamp(min=1e-30))

        def point(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = torch.where(allowed, log_prior + tau * (log_proposal - log_prior), -torch.inf)
            w = torch.softmax(logits, dim=0)
            divergence = torch.where(allowed, w * (torch.log_softmax(logits, dim=0) - log_prior), 0.0)
            return w, divergence.sum()

        low, high = weights.new_zeros(()), weights.new_ones(())
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            inside = point(middle)[1] <= self.nats
            low, high = torch.where(inside, middle, low), torch.where(inside, high, middle)
        whole, divergence = point(weights.new_ones(()))
        return torch.where(divergence <= self.nats, whole, point(low)[0])

    def describe(self) -> str:
        return f"trust_region {self.nats:g} nats"
