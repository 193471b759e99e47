"""A fixed schedule of weights over steps: piecewise-constant or linear between waypoints (curricula)."""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from onlinemix.mixing.controllers.base import Controller, ControllerContext
from onlinemix.mixing.schedule_log import ScheduleLog, read_schedule

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
    default_limits: ClassVar[dict[str, Any]] = {}  # the weights are the user's: no limit unless asked for

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

    @classmethod
    def from_settings(
        cls, initial: torch.Tensor, knobs: dict[str, Any], context: ControllerContext
    ) -> ScheduledController:
        """From a mixture file: ``waypoints`` (and ``interpolation``) in the ``mixing:`` section; the file's
        starting weights are not used."""
        return cls(device=context.device, **knobs)

    @classmethod
    def from_log(
        cls, log: str | Path | ScheduleLog, steps: int | None = None, most: int = 1000, **kwargs
    ) -> ScheduledController:
        """The weights a recorded run used, as a schedule for another run (the proxy-to-target workflow).

        ``steps``: the new run's length. The recorded schedule is stretched (or shrunk) to it: the weights
        recorded at step ``s`` of a run of ``S`` steps come at step ``s * steps / S``, linearly interpolated
        between. Default: the recorded steps as they are. After the last waypoint the last weights hold.
        At most ``most`` waypoints are kept (evenly spread, the last one always). The controller knows the
        log's domain names, and ``OnlineMixer`` checks them against the dataset's.
        """
        recorded = log if isinstance(log, ScheduleLog) else read_schedule(log)
        if len(recorded.weights) < 2:
            raise ValueError(f"{log} holds {len(recorded.weights)} weight version(s): nothing to schedule")
        last = int(recorded.steps[-1])
        if steps is not None and steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        keep = np.unique(np.linspace(0, len(recorded.steps) - 1, min(most, len(recorded.steps))).round().astype(int))
        scale = 1.0 if steps is None else steps / last
        waypoints, previous = [], -1
        for i in keep:
            step = round(float(recorded.steps[i]) * scale)
            if step > previous:  # shrinking can map two recorded steps to one: keep the first
                waypoints.append((step, recorded.weights[i].tolist()))
                previous = step
        controller = cls(waypoints, interpolation="linear", **kwargs)
        controller.domains = recorded.domains
        return controller

    def segment(self, step: int) -> tuple[int, float]:
        """The waypoint ``i`` that ``step`` follows and how far it is toward waypoint ``i + 1`` (Python numbers)."""
        i = bisect.bisect_right(self.waypoint_steps, step) - 1
        if self.interpolation == "constant" or i == len(self.waypoint_steps) - 1:
            return i, 0.0
        start, stop = self.waypoint_steps[i], self.waypoint_steps[i + 1]
        return i, (step - start) / (stop - start)

    def weights_at(self, step: int) -> torch.Tensor:
        """The scheduled weights at ``step`` (host-side numbers)."""
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
