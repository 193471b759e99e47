"""The minimum ratio: no weight below a fraction of its starting weight."""

from __future__ import annotations

import torch

from onlinemix.mixing.limits.base import Limit
from onlinemix.mixing.limits.settings import fraction


class MinRatio(Limit):
    """Every domain keeps at least ``ratio`` times its starting weight, plus its share of what is left, in
    proportion to how far it was above its bound (unchanged where every weight is already at or above it).

    The trust region lets a controller take most of a small domain's weight for a small divergence; this bound
    caps what any domain can lose, and with it the harm to an objective the controller does not see: a held-out
    target whose loss goes with the log of the weight on its kind loses at most its sensitivity times
    ``ln(1 / ratio)``.
    """

    name = "min_ratio"

    def __init__(self, ratio: float):
        self.ratio = fraction(ratio, "min_ratio")

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        bound = self.ratio * self.initial
        excess = (weights / weights.sum() - bound).clamp(min=0)
        # Σ excess ≥ 1 - ratio > 0: what the weights hold above the bounds is at least what the bounds leave
        return bound + (1 - self.ratio) * excess / excess.sum()

    def describe(self) -> str:
        return f"min_ratio {self.ratio:g}"
