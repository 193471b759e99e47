"""Static weights (given, or by the temperature rule): the baseline every online method is measured against."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from onlinemix.mixing.controllers.base import Controller
from onlinemix.simplex import temperature_weights


class StaticController(Controller):
    """Keeps its initial weights; observing is allowed (and drained) but changes nothing."""

    name = "static"
    default_limits: ClassVar[dict[str, Any]] = {}  # the weights are the user's: no limit unless asked for

    @classmethod
    def from_temperature(cls, sizes: Sequence[int], temperature: float, **kwargs) -> StaticController:
        """``p_d ∝ size_d ** (1 / T)``."""
        return cls(torch.from_numpy(temperature_weights(sizes, temperature)), **kwargs)

    def update(self) -> torch.Tensor:
        self.stats.take()
        return self.initial
