"""A fixed schedule of weights over steps: piecewise-constant or linear between waypoints (curricula)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence

import torch
from onlinemix.mixing.controllers.base import Controller

INTERPOLATIONS = ("constant", "linear")


class ScheduledController(Controller):
    """Weights as a function of the step number alone.

    Args:
        waypoints: ``[(step, weights), ...]`` with increasing steps, the first at 0.
            Before the first and after the last waypoint the weights are constant.
        interpolation: ``"constant"`` holds each waypoint until the next;
            ``"linear"`` blends neighbouring waypoints.
    """

    name = "scheduled"

    def __init__(self, waypoints: Sequence[tuple[int, Sequence[float]]], interpolation: str = "linear", **kwargs):
        if interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
        if not waypoints or waypoints[0][0] != 0:
            raise ValueError("the first waypoint must be at step 0")
        self.waypoint_steps = [int(step) for step, _ in waypoints]
        if any(b <= a for a, b in zip(self.waypoint_steps, self.waypoint_steps[1:])):
            raise ValueError(f"waypoint steps must increase, got {self.waypoint_steps}")
        table = torch.tensor([list(w) for _, w in waypoints], dtype=torch.float32)
        if (table < 0).any() or (table.sum(1) <= 0).any():
            raise ValueError("waypoint weights must be non-negative with a positive sum")
        super().__init__(table[0], **kwargs)
        self.table = (table / table.sum(1, keepdim=True)).to(self.device)
        self.interpolation = interpolation

    def segment(self, step: int) -> tuple[int, float]:
        """The waypoint ``i`` that ``step`` follows and how far it is toward waypoint ``i + 1`` (Python numbers)."""
        i = bisect.bisect_right(self.waypoint_steps, step) - 1
        if self.interpolation == "constant" or i == len(self.waypoint_steps) - 1:
            return i, 0.0
        start, stop = self.waypoint_steps[i], self.waypoint_steps[i + 1]
        return i, (step - start) / (stop - start)

    def weights_at(self, step: int) -> torch.Tensor:
        i, blend = self.segment(step)
        return self._blend(i, blend)

    def _blend(self, i: int, blend: float | torch.Tensor) -> torch.Tensor:
        if i == len(self.waypoint_steps) - 1:
            return self.table[i]
        return torch.lerp(self.table[i], self.table[i + 1], blend)

    def schedule(self, step: int) -> dict[str, float]:
        return {"blend": self.segment(step)[1]}

    def phase(self) -> int:
        return self.segment(self.steps)[0]

    def update(self) -> torch.Tensor:
        self.stats.take()
        return self._blend(self.phase(), self.now["blend"])
