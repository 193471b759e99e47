"""A fixed schedule of weights over steps: piecewise-constant or linear between waypoints (curricula), or a
recorded run's weights replayed, or stretched over a run of another length (the proxy-to-target workflow).

**A stretched schedule keeps this run's repeat budget.** A short proxy run's weights are shaped by its own
budget: 23% of the batch on a small set may be 16 epochs of it in 250 steps, and 64 in 1,000. So a schedule
stretched to another length (``from_log(log, steps=N)``) is capped, step by step, by this run's budget
(``MemorisationGuard(repeat_budget, never_below_start=False)``: ``budget · size / (samples per step · N)``,
what the cap takes going to the other domains in proportion, as a live controller's cap does), and says in
one line what it capped when the mixer tells it the run. The schedule carries shares, not epochs: where the
proxy's share of a domain was within this run's budget it is kept as it is. A replay at the recorded length
is the recorded run's own weights and is left unchanged.
"""

from __future__ import annotations

import bisect
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch

from onlinemix.mixing import limits as limits_module
from onlinemix.mixing.controllers.base import Controller, ControllerContext
from onlinemix.mixing.limits import DEFAULT_REPEAT_BUDGET, Floor, MemorisationGuard
from onlinemix.mixing.schedule_log import ScheduleLog, read_schedule

INTERPOLATIONS = ("constant", "linear")
PROJECTION_POINTS = 2048  # steps at which a schedule is evaluated to project the epochs it draws
log = logging.getLogger("onlinemix")


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
        self.stretched: tuple[int, int] | None = None  # (recorded steps, this run's) for a stretched recording

    @classmethod
    def from_settings(
        cls, initial: torch.Tensor, knobs: dict[str, Any], context: ControllerContext
    ) -> ScheduledController:
        """From a mixture file: ``waypoints`` (and ``interpolation``) in the ``mixing:`` section; the file's
        starting weights are not used."""
        return cls(device=context.device, **knobs)

    @classmethod
    def from_log(
        cls,
        log: str | Path | ScheduleLog,
        steps: int | None = None,
        most: int = 1000,
        repeat_budget: float | None = DEFAULT_REPEAT_BUDGET,
        **kwargs: Any,
    ) -> ScheduledController:
        """The weights a recorded run used, as a schedule for another run (the proxy-to-target workflow).

        ``steps``: the new run's length. The recorded schedule is stretched (or shrunk) to it: the weights
        recorded at step ``s`` of a run of ``S`` steps come at step ``s * steps / S``, linearly interpolated
        between. Default: the recorded steps as they are. After the last waypoint the last weights hold.
        At most ``most`` waypoints are kept (evenly spread, the last one always). The controller knows the
        log's domain names, and ``OnlineMixer`` checks them against the dataset's.

        ``repeat_budget``: a schedule stretched to another length is capped by this run's repeat budget (see the
        module docstring; ``None``: the recorded shares as they are, however often they draw a domain). A
        replay at the recorded length is never capped. ``kwargs``: ``Controller``'s (``min_prob``, ``device``...).
        """
        recorded = log if isinstance(log, ScheduleLog) else read_schedule(log)
        if len(recorded.weights) < 2:
            raise ValueError(f"{log} holds {len(recorded.weights)} weight version(s): nothing to schedule")
        last = int(recorded.steps[-1])
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        stretched = steps is not None and steps != last
        if stretched and repeat_budget is not None:
            kwargs["limits"] = cls._stretched_limits(repeat_budget, kwargs)
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
        controller.stretched = (last, steps) if stretched else None
        return controller

    @classmethod
    def _stretched_limits(cls, repeat_budget: float, kwargs: dict[str, Any]) -> list:
        """The limits of a stretched schedule: those its knobs ask for, and this run's repeat budget before the
        floor (which comes last)."""
        if "limits" in kwargs:
            raise ValueError("give repeat_budget=None to pass limits=[...] to a stretched schedule")
        knobs = {key: kwargs.pop(key) for key in limits_module.LIMIT_KNOBS if key in kwargs}
        chosen = limits_module.build(cls.default_limits, knobs)
        guard = MemorisationGuard(repeat_budget, never_below_start=False)
        floors = [limit for limit in chosen if isinstance(limit, Floor)]
        return [limit for limit in chosen if not isinstance(limit, Floor)] + [guard] + floors

    def count_epochs(self, samples_per_step: float, sizes: Sequence[int], steps: int | None = None) -> None:
        """As ``Controller.count_epochs``; a stretched schedule then says in one line what this run's repeat
        budget caps."""
        super().count_epochs(samples_per_step, sizes, steps)
        guard = self.limit(MemorisationGuard)
        if self.stretched is None or steps is None or guard is None or guard.repeat_budget is None:
            return
        raw = self._epochs_over_run(limited=False)
        capped = self._epochs_over_run(limited=True)
        over = np.flatnonzero(raw > guard.repeat_budget * (1 + 1e-6))
        if not len(over):
            return
        names = self.domains or [f"domain {d}" for d in range(self.num_domains)]
        what = ", ".join(f"{names[d]!r} {raw[d]:.1f} -> {capped[d]:.1f} epochs" for d in over)
        log.warning(
            "a schedule recorded over %d steps, stretched to %d: this run's repeat budget (%g epochs) caps %s",
            *self.stretched, guard.repeat_budget, what,
        )  # fmt: skip

    def projected_epochs(self) -> np.ndarray | None:
        """The epochs each domain is drawn over the run, by the schedule as its limits leave it (``None`` before
        the run's length is known)."""
        if self.epochs.steps is None or not self.epochs.configured:
            return None
        return self._epochs_over_run(limited=True)

    def _epochs_over_run(self, limited: bool) -> np.ndarray:
        """Epochs each domain is drawn over the run's steps, by the schedule (``limited``: through its limits),
        from the schedule at up to ``PROJECTION_POINTS`` evenly spread steps (host arithmetic, at set-up)."""
        steps = self.epochs.steps
        points = np.linspace(1, steps, min(steps, PROJECTION_POINTS)).round().astype(int)
        weights = []
        for step in points.tolist():
            w = self.weights_at(step)
            if limited:
                for limit in self.limits:
                    w = limit(w)
                w = w / w.sum()
            weights.append(w)
        mean = torch.stack(weights).mean(0)
        return (mean * self.epochs.rate * steps).double().cpu().numpy()

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
