"""The probability floor: every weight at least ``min_prob``, by mixing in the uniform distribution."""

from __future__ import annotations

import torch

from onlinemix.mixing.epochs import EpochCount
from onlinemix.mixing.limits.base import Limit


class Floor(Limit):
    """``w ← (1 − k · min_prob) · w + min_prob``: every domain stays reachable. It applies to the starting
    weights too (the controller publishes them floored), and comes last: it is the one bound every published
    weight meets."""

    name = "min_prob"

    def __init__(self, min_prob: float):
        if isinstance(min_prob, bool) or not isinstance(min_prob, (int, float)) or not min_prob >= 0:
            raise ValueError(f"min_prob must be a number >= 0, got {min_prob!r}")
        self.min_prob = min_prob

    def bind(self, initial: torch.Tensor, epochs: EpochCount) -> None:
        super().bind(initial, epochs)
        k = initial.numel()
        if not 0 <= self.min_prob * k < 1:
            raise ValueError(f"min_prob {self.min_prob} x {k} domains must be in [0, 1)")

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        if self.min_prob == 0:
            return weights
        return (1 - self.initial.numel() * self.min_prob) * weights + self.min_prob

    def start(self, weights: torch.Tensor) -> torch.Tensor:
        return self(weights)

    def describe(self) -> str:
        return f"min_prob {self.min_prob:g}"
