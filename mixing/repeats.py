"""The mixer's warnings about repetition: a small domain drawn many epochs over is memorised.

``RepeatWatch`` says it twice: at build time, where the run's length is known and the weights it starts with
already draw a domain far past its repeat budget (``warn_overdrawn``), and during the run, once per domain, when
the published weights have drawn it ``repeat_warning`` epochs over (``watch``). A domain with ``max_epochs`` is
capped by the loader and never warned about.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np

from onlinemix.loaders.plan import UNLIMITED, PlanSpec
from onlinemix.mixing.controllers.base import Controller
from onlinemix.mixing.limits import DEFAULT_REPEAT_BUDGET, MemorisationGuard

OVERDRAWN = 2.0  # times the repeat budget a domain may be projected to be drawn before the build warns


class RepeatWatch:
    """Warnings about the domains of ``spec`` (named ``names``) that ``controller``'s weights draw too often.

    ``repeat_warning``: the epochs at which ``watch`` warns about a domain (``0``: never, and no build-time
    warning either).
    """

    def __init__(self, controller: Controller, names: Sequence[str], spec: PlanSpec, repeat_warning: float):
        self.controller, self.names, self.spec = controller, list(names), spec
        self.repeat_warning = repeat_warning
        self.warned = np.zeros(spec.num_domains, dtype=bool)

    def warn_overdrawn(self, steps: int | None, samples_per_step: int) -> None:
        """At build time, where the run's length is known: warn (once, every such domain in one message) when the
        controller's weights will draw a domain without ``max_epochs`` more than ``OVERDRAWN`` times its repeat
        budget (a fixed or scheduled mixture's own weights; an online controller's starting weights, which its
        repeat budget never cuts). Better said before the first batch than at step 168."""
        projected = self.controller.projected_epochs()
        if projected is None or not self.repeat_warning:
            return
        guard = self.controller.limit(MemorisationGuard)
        budget = guard.repeat_budget if guard is not None and guard.repeat_budget is not None else DEFAULT_REPEAT_BUDGET
        spec = self.spec
        over = np.flatnonzero((projected > OVERDRAWN * budget) & (spec.caps == UNLIMITED))
        if not len(over):
            return
        what = "; ".join(f"{self.names[d]!r} ({spec.sizes[d]:,} samples) about {projected[d]:.0f} epochs"
                         for d in over)  # fmt: skip
        warnings.warn(
            f"over this run's {steps:,} steps of {samples_per_step:,} samples, the {self.controller.name} "
            f"controller's weights draw {what} (an online controller's: from its starting weights, which its repeat "
            f"budget never cuts): over {OVERDRAWN:g}x the repeat budget of {budget:g} epochs, a small domain is "
            "memorised. Lower its weight, or cap it with max_epochs in the mixture file",
            stacklevel=3,
        )

    def watch(self, version: int, weights: np.ndarray, drawn: np.ndarray) -> None:
        """Warn once per domain when it has been drawn ``repeat_warning`` epochs over (``drawn``: the controller's
        count, read back with the weights) and has no repeat cap."""
        if not self.repeat_warning:
            return
        spec = self.spec
        for d in np.flatnonzero((drawn >= self.repeat_warning) & ~self.warned & (spec.caps == UNLIMITED)):
            self.warned[d] = True
            warnings.warn(
                f"step {version}: domain {self.names[d]!r} ({spec.sizes[d]:,} samples) has been drawn about "
                f"{drawn[d]:.0f} epochs over (its weight is now {weights[d]:.3f}): repeated this often, a small "
                f"domain is memorised. {self._budget_note()}Cap it with max_epochs in the mixture file (or hold out "
                "what the controller aligns with)",
                stacklevel=2,
            )

    def _budget_note(self) -> str:
        guard = self.controller.limit(MemorisationGuard)
        if guard is None or guard.repeat_budget is None:
            return ""
        return (
            f"The controller holds it at most at its starting weight from {guard.repeat_budget:g} epochs "
            "(repeat_budget). "
        )
