"""The memorisation guard: the repeat budget and held-out probes, solved together in one water-filling pass.

A small domain's training loss falls fastest while the model memorises it, and every signal a controller
reads can chase it (ADO's loss slopes, ODM's rewards, DGA's alignment with a sample of the same kind). Two
checks hold such a domain **at most at its starting weight**, what that takes going to the other domains in
proportion to theirs:

- **The repeat budget** (``repeat_budget`` epochs): where the run's length is known, no domain's weight goes
  above what draws it that many times by the last step, ``budget · size / (samples per step · steps)`` (or its
  starting weight, where that is more: the user's prior is never cut); and a domain drawn that many times
  over is held at its starting weight for the rest of the run. Weights that are not this run's prior (a
  schedule recorded on a shorter run, stretched to this one) are capped by the budget alone
  (``never_below_start=False``); where even that cannot be met (the caps sum to less than 1: every domain
  would be drawn past the budget), the caps grow in proportion until they do, so that every domain is
  drawn the same number of epochs.
- **Held-out probes** (``observe_heldout``): a domain drawn above its starting weight whose smoothed held-out
  loss has risen more than ``heldout_tolerance`` above its lowest is held until that loss reaches a new lowest.

Both act through one cap per domain, so they are one limit: the water-filling that spreads what the caps take
must see every cap at once, or what one check frees the other could take back.
"""

from __future__ import annotations

from typing import Any

import torch

from onlinemix.mixing.epochs import EpochCount
from onlinemix.mixing.limits.base import Limit
from onlinemix.mixing.limits.settings import positive_number

DEFAULT_REPEAT_BUDGET = 16.0  # epochs
PASSES = 4  # water-filling passes (fixed: no branch on a value)


def water_fill(weights: torch.Tensor, cap: torch.Tensor, passes: int = PASSES) -> torch.Tensor:
    """``weights`` (normalised first) with every domain at most at its ``cap``: what the caps take goes to the
    domains below theirs, in proportion to their weights (or, where none can take it, stays away: the result is
    renormalised by the caller). What one pass gives a domain may take it over its own cap; a few passes settle
    it. Unchanged where nothing is over its cap."""
    weights = weights / weights.sum()
    for _ in range(passes):
        capped = torch.minimum(weights, cap)
        free = torch.where(capped < cap, capped, 0.0)
        room = free.sum()
        spread = torch.where(room > 0, (1 - capped.sum()) / room.clamp(min=1e-30), 0.0)
        weights = capped + spread * free
    return weights


def budget_cap(share: torch.Tensor, start: torch.Tensor | None) -> torch.Tensor:
    """Each domain's cap from the weight that spends its budget over the run (``share``): at least its starting
    weight (``start``: then the caps sum to at least 1), or else grown in proportion where they sum to less
    than 1 (every domain over its budget: they all go the same number of epochs over). At most 1."""
    if start is not None:
        return torch.maximum(share, start).clamp(max=1)
    cap = share.clamp(max=1)
    total = cap.sum()
    return torch.where(total < 1, cap / total, cap)


class MemorisationGuard(Limit):
    """The repeat budget and the held-out guard (see the module docstring).

    Args:
        repeat_budget: epochs a domain may be drawn over the whole run (``None``: no budget, probes only).
        heldout_tolerance: nats a favoured domain's smoothed held-out loss may rise above its lowest.
        heldout_ema: how much of the smoothed held-out loss each ``observe_heldout`` keeps (0: none): held-out
            losses of a few windows are noisy, and a guard that fires on noise moves weight for nothing.
        never_below_start: the budget's cap is never below a domain's starting weight (the user's prior); off for
            weights that are no prior of this run's (a stretched schedule).
    """

    name = "guard"

    def __init__(
        self,
        repeat_budget: float | None = DEFAULT_REPEAT_BUDGET,
        heldout_tolerance: float = 0.02,
        heldout_ema: float = 0.5,
        never_below_start: bool = True,
    ):
        if repeat_budget is not None:
            repeat_budget = positive_number(repeat_budget, "repeat_budget", "a number of epochs")
        numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (heldout_tolerance, heldout_ema))
        if not (numbers and heldout_tolerance >= 0 and 0 <= heldout_ema < 1):
            raise ValueError(
                f"need heldout_tolerance >= 0 and 0 <= heldout_ema < 1, got {heldout_tolerance}, {heldout_ema}"
            )
        self.repeat_budget = repeat_budget
        self.heldout_tolerance, self.heldout_ema = float(heldout_tolerance), float(heldout_ema)
        self.never_below_start = never_below_start
        self._cap: tuple[int, torch.Tensor | None] = (-1, None)  # (the epoch count's version, the budget's cap)

    def bind(self, initial: torch.Tensor, epochs: EpochCount) -> None:
        super().bind(initial, epochs)
        # each domain's smoothed held-out loss and its lowest: NaN / inf until first measured (left alone until then)
        self.heldout = torch.full_like(initial, float("nan"))
        self.heldout_best = torch.full_like(initial, float("inf"))
        self.holding = torch.zeros_like(initial, dtype=torch.bool)  # held for a rising held-out loss

    @property
    def epoch_cap(self) -> torch.Tensor | None:
        """The most weight the budget allows each domain over the run (``None`` before the run's length is known,
        or without a budget), computed once per run configuration."""
        version, cap = self._cap
        if version != self.epochs.version:
            share = None if self.repeat_budget is None else self.epochs.share_for(self.repeat_budget)
            cap = None if share is None else budget_cap(share, self.initial if self.never_below_start else None)
            self._cap = (self.epochs.version, cap)
        return cap

    def memorised(self) -> torch.Tensor:
        """Which domains are held (a boolean vector on the device): those past ``repeat_budget`` epochs, and those
        whose smoothed held-out loss rose more than ``heldout_tolerance`` above its lowest, until it reaches a new
        lowest. (Freeing a domain as soon as its loss dips back under the tolerance would free it as soon as
        holding it works, and a controller that still prefers it would pour the weight back: the guard would
        flap.)"""
        if self.repeat_budget is None or not self.epochs.configured:
            return self.holding
        return self.holding | (self.epochs.drawn >= self.repeat_budget)

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """Every held domain at most at its starting weight, every domain at most at its budget's cap."""
        cap = torch.where(self.memorised(), self.initial, 1.0)
        if self.epoch_cap is not None:
            cap = torch.minimum(cap, self.epoch_cap)
        return water_fill(weights, cap)

    def start(self, weights: torch.Tensor) -> torch.Tensor:
        """The starting weights: the prior, as they are; weights that are no prior of this run (a stretched
        schedule's first waypoint) capped like every later version."""
        return weights if self.never_below_start else self(weights)

    def observe_heldout(self, losses: torch.Tensor, weights: torch.Tensor) -> None:
        """Smooth the new held-out losses and hold every domain drawn above its start (``weights``: those in force)
        whose smoothed loss rose past the tolerance; free a domain at a new lowest.

        A domain at or below its start whose held-out loss rises is being forgotten, not memorised: holding it
        would change nothing, and counting it would leave the memorised domain's excess nowhere to go. Nor does
        such a rise count later: while a domain is neither favoured nor held, its lowest follows its loss, so that
        only a rise while it is favoured holds it. (Counted, it held every domain in turn: a memorised domain held,
        its excess went to the others, each had risen while starved, each was held as soon as it was favoured,
        and every weight sat at its start to the end of the run.)"""
        measured = torch.isfinite(losses)
        smoothed = torch.where(
            torch.isnan(self.heldout), losses, torch.lerp(losses, self.heldout, self.heldout_ema)
        )  # the first measurement of a domain starts its mean
        # in place: a graphed step() reads these buffers
        self.heldout.copy_(torch.where(measured, smoothed, self.heldout))
        rising = self.heldout > self.heldout_best + self.heldout_tolerance  # NaN compares False: not measured yet
        favoured = weights > self.initial
        lowest = self.heldout <= self.heldout_best  # a new lowest (False for NaN)
        self.holding.copy_(torch.where(lowest, False, self.holding | (rising & favoured)))
        forgotten = ~favoured & ~self.holding & measured  # its reference moves with it (docstring)
        self.heldout_best.copy_(torch.where(lowest | forgotten, self.heldout, self.heldout_best))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"heldout": self.heldout.clone(), "heldout_best": self.heldout_best.clone(),
                "holding": self.holding.clone()}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "heldout" not in state:  # checkpoints from before the guard: it starts afresh
            return
        device = self.initial.device
        self.heldout = state["heldout"].to(device, copy=True)
        self.heldout_best = state["heldout_best"].to(device, copy=True)
        self.holding = state["holding"].to(device, copy=True)

    def describe(self) -> str:
        budget = "no repeat budget" if self.repeat_budget is None else f"repeat_budget {self.repeat_budget:g} epochs"
        return f"{budget}, heldout_tolerance {self.heldout_tolerance:g}, heldout_ema {self.heldout_ema:g}"
