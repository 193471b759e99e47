"""What every controller is: weights on the device, ``observe()`` feedback, ``step()`` an update.

``observe()`` and ``step()`` never synchronise with the host: no ``.item()``,
``.cpu()``, ``.tolist()``, no branch on a tensor value. What depends on the
step number is computed on the host from a Python int: ``schedule()`` gives
the numbers ``update()`` uses (as ``self.now``), ``phase()`` names the Python
branch it takes. That split is what lets ``graph=True`` replay a controller
as CUDA graphs (``mixing/graphs.py``): one graph per phase, the numbers
written into device scalars before each replay.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeVar

import numpy as np
import torch

from onlinemix.mixing import limits as limits_module
from onlinemix.mixing.epochs import EpochCount
from onlinemix.mixing.graphs import ControllerGraphs
from onlinemix.mixing.limits import DEFAULT_REPEAT_BUDGET, DEFAULT_TRUST_REGION, Limit, MemorisationGuard
from onlinemix.mixing.stats import DomainStats

L = TypeVar("L", bound=Limit)
# the controller's own state names: a limit's state must not take them
RESERVED_STATE = frozenset({"name", "steps", "initial", "weights", "problems", "epochs"})


@dataclass(frozen=True)
class ControllerContext:
    """What building a controller from a mixture file may need besides its knobs: the device, and each domain's
    feature profile (``(k, d)``: the importance estimator's n-gram counts), computed only when asked for."""

    device: torch.device | str | None = None
    features: Callable[[], np.ndarray] | None = None


def is_distribution(weights: torch.Tensor) -> torch.Tensor:
    """Whether ``weights`` are finite, non-negative and sum to more than 0 (a boolean on the device)."""
    total = weights.sum()  # a NaN or inf makes the sum non-finite
    return torch.isfinite(total) & (weights >= 0).all() & (total > 0)


def check_initial(initial: torch.Tensor) -> None:
    """A controller's initial weights must be a vector of finite, non-negative numbers with a positive sum."""
    if initial.ndim != 1 or not initial.numel():
        raise ValueError(f"initial weights must be a non-empty vector, got shape {tuple(initial.shape)}")
    values = initial.detach().cpu()  # once, at construction: never in observe() or step()
    if not torch.isfinite(values).all():
        raise ValueError(f"initial weights must be finite, got {values.tolist()}")
    if (values < 0).any():
        raise ValueError(f"initial weights must be >= 0, got {values.tolist()}")
    if not values.sum() > 0:
        raise ValueError(f"initial weights must not all be zero, got {values.tolist()}")


class Controller:
    """Base class: subclasses implement ``update()``; ``step()`` checks the proposal and applies the limits.

    Args:
        initial: the starting weights (k,), non-negative, summing to 1: the prior every limit is relative to.
        limits: the limits to apply, in order (``mixing/limits``), replacing the class's ``default_limits``;
            give either this or the knobs below, not both.
        device: where the weights and statistics live (the training device).
        compile: ``torch.compile`` the per-batch accumulation (``True``, or a
            backend name): fuses its ~10 small kernels into one. Measured in
            ``benchmarks/controller_step.py``.
        importance_gain: ``γ``: the per-sample feedback becomes ``loss + γ ·
            importance`` (``observe(..., importance=...)``: e.g. the DSIR log
            weight each batch carries with importance inside the stream), so
            domains whose samples resemble the target earn more. Raw log
            weights are sums over a document's n-grams (tens to hundreds):
            a γ around 1 / (words per document) puts them on a loss scale.
        graph: replay ``observe()`` and ``step()`` as CUDA graphs (CUDA only):
            a few launches per call instead of tens, so the host spends
            microseconds per step whatever the controller does. Each new input
            shape and each phase is captured once, on first use (that call
            synchronises). Measured in ``benchmarks/controller_step.py``.
        **knobs: the limits' knobs, each replacing the class's default (``None`` turns a limit off):
            ``trust_region`` (nats, ``TrustRegion``), ``min_ratio`` (``MinRatio``), ``repeat_budget``,
            ``heldout_tolerance``, ``heldout_ema`` (``MemorisationGuard``), ``min_prob`` (``Floor``).
    """

    name = "base"
    # The limits an adaptive controller applies by default (knob -> value; see ``mixing/limits``): the trust region
    # keeps a noisy signal near the prior, the guard keeps it off a small domain it would memorise. A subclass
    # names its own defaults here, in this one place.
    default_limits: ClassVar[dict[str, Any]] = {
        "trust_region": DEFAULT_TRUST_REGION,
        "repeat_budget": DEFAULT_REPEAT_BUDGET,
        "heldout_tolerance": 0.02,
        "heldout_ema": 0.5,
    }

    config_knobs: ClassVar[tuple[str, ...]] = ()  # mixture-file keys ``from_settings`` reads besides the arguments

    def __init__(
        self,
        initial: torch.Tensor,
        limits: Sequence[Limit] | None = None,
        *,
        device: torch.device | str | None = None,
        compile: bool | str = False,
        importance_gain: float = 0.0,
        graph: bool = False,
        **knobs: Any,
    ):
        initial = torch.as_tensor(initial, dtype=torch.float32, device=device)
        self.num_domains = initial.numel()
        check_initial(initial)
        self.importance_gain = float(importance_gain)
        self.device = initial.device
        self.initial = initial / initial.sum()
        self.epochs = EpochCount(self.num_domains, self.device)
        if limits is not None and knobs:
            raise ValueError(f"give limits=[...] or the knobs {sorted(knobs)}, not both")
        self.limits: tuple[Limit, ...] = tuple(limits_module.build(self.default_limits, knobs) if limits is None
                                               else limits)  # fmt: skip
        for limit in self.limits:
            limit.bind(self.initial, self.epochs)
        names = [key for limit in self.limits for key in limit.state_dict()]
        if len(set(names)) != len(names) or set(names) & RESERVED_STATE:
            raise ValueError(f"the limits' state names clash: {names}")
        self.weights = self._start_weights()
        self.stats = DomainStats(self.num_domains, self.device, compile=compile)
        self.steps = 0
        self.domains: list[str] | None = None  # the domain names, where the controller knows them (from a log)
        self.now: dict[str, Any] = {}
        self.graph = graph
        self._graphs = None
        if graph and self.device.type != "cuda":
            raise ValueError(f"graph=True needs the controller on a CUDA device, not {self.device}")

    def _start_weights(self) -> torch.Tensor:
        """The weights published before the first step: the starting weights through each limit's ``start``."""
        weights = self.initial
        for limit in self.limits:
            weights = limit.start(weights)
        return weights.clone()

    @classmethod
    def from_settings(cls, initial: torch.Tensor, knobs: dict[str, Any], context: ControllerContext) -> Controller:
        """The controller a mixture file's ``mixing:`` section describes: ``initial`` (the mixture's starting
        weights) and the section's knobs as keyword arguments. A class whose file keys are not its arguments (the
        bandit's ``neighbours``, the schedule's waypoints) overrides this."""
        return cls(initial, device=context.device, **knobs)

    def limit(self, kind: type[L]) -> L | None:
        """This controller's limit of class ``kind`` (the first), or ``None``."""
        return next((limit for limit in self.limits if isinstance(limit, kind)), None)

    def count_epochs(self, samples_per_step: float, sizes: Sequence[int], steps: int | None = None) -> None:
        """Tell the controller the run (the mixer calls this with its dataset's): ``samples_per_step`` samples a
        step, each domain's size in samples, and the run's length in steps where it is known. Then it counts the
        epochs each domain is drawn (``epochs``), which the repeat budget caps and holds by. Before the first step,
        the starting weights pass the limits again: a limit that knows the run now may map them (a stretched
        schedule's budget)."""
        self.epochs.configure(samples_per_step, sizes, steps)
        if self.steps == 0:
            self.weights = self._start_weights()

    def projected_epochs(self) -> np.ndarray | None:
        """The epochs each domain would be drawn over the run at the published starting weights (``None`` before
        the run's length is known): what a fixed mixture draws, and where an online controller starts (a host
        copy, for set-up time only)."""
        if self.epochs.steps is None or not self.epochs.configured:
            return None
        return (self.weights * self.epochs.rate * self.epochs.steps).double().cpu().numpy()

    def memorised(self) -> torch.Tensor:
        """Which domains the memorisation guard holds now (a boolean vector on the device; none without a guard)."""
        guard = self.limit(MemorisationGuard)
        return guard.memorised() if guard is not None else torch.zeros_like(self.initial, dtype=torch.bool)

    def next_weights(self) -> torch.Tensor:
        """``update()``, checked, through the limits, checked again, on the device. A proposal that is not a
        distribution (a non-finite, negative or all-zero weight, e.g. from a NaN alignment or an overflowing
        reward) is rejected before any limit sees it (a limit must never make one out of it): the last weights
        stay, the rejection is counted in ``stats`` (the mixer warns or raises), and the state ``update()``
        carried forward (``extra_state()``) is rolled back to before it, so that the bad observation is dropped
        rather than kept: the next good one moves the weights again.

        ``update()`` must assign new tensors to its state (``self.x = self.x + ...``), not write into them in
        place, for the roll-back to see the old values."""
        before = self.extra_state()
        proposal = self.update()
        weights = proposal
        for limit in self.limits:
            weights = limit(weights)
        total = weights.sum()
        good = is_distribution(proposal) & is_distribution(weights)
        self.stats.reject(~good)
        for name, old in before.items():
            new = getattr(self, name)
            if new is not old:
                setattr(self, name, torch.where(good, new, old))
        weights = torch.where(good, weights / torch.where(good, total, 1.0), self.weights)
        self.epochs.add(weights)  # in place: a graphed step() reads this buffer
        return weights

    # -- what subclasses write ----------------------------------------------------

    def record(self, losses: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor | None = None, **signals) -> None:
        """Accumulate one (micro-)batch's feedback into ``self.stats`` (override to transform it first)."""
        self.stats.add(self.with_importance(losses, signals), domains, mask)

    def with_importance(self, values: torch.Tensor, signals: dict[str, Any]) -> torch.Tensor:
        """``values + importance_gain · importance`` (per sample, broadcast over tokens); ``values`` if γ = 0."""
        if self.importance_gain == 0:
            return values
        importance = signals.get("importance")
        if importance is None:
            raise ValueError(f"importance_gain={self.importance_gain} needs observe(..., importance=one per sample)")
        if importance.shape != values.shape[:1]:
            raise ValueError(
                f"importance {tuple(importance.shape)} needs one value per sample of {tuple(values.shape)}"
            )
        importance = importance.reshape(-1, *[1] * (values.ndim - 1))
        return values + self.importance_gain * importance.to(values.dtype)

    def update(self) -> torch.Tensor:
        """New weights (before the floor) from what was observed since the last step."""
        raise NotImplementedError

    def schedule(self, step: int) -> dict[str, float]:
        """The numbers of the step count that ``update()`` reads from ``self.now``."""
        return {}

    def phase(self) -> Hashable:
        """Which Python branch ``update()`` takes at this step (e.g. warm-up or not)."""
        return None

    def stepped(self) -> None:
        """Host-side bookkeeping after an update (flags, counters); never touches tensors."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """Tensors ``update()`` carries from step to step, by attribute name."""
        return {}

    # -- what the trainer calls ---------------------------------------------------

    def observe_heldout(self, losses: torch.Tensor) -> None:
        """Record each domain's loss on held-out windows of its own (a ``(k,)`` tensor; NaN where a domain was
        not measured), e.g. every few steps on a few dozen fixed windows per domain: the memorisation guard's
        probes (``MemorisationGuard.observe_heldout``). A small domain drawn many epochs over has a training loss
        that keeps falling (the model memorises it) while its held-out loss rises; every controller that reads
        training loss (ADO's fits, ODM's rewards) would pour weight onto it. Every rank must pass the same values
        (measure the same windows, or all-reduce them)."""
        losses = torch.as_tensor(losses, dtype=torch.float32, device=self.device)
        if losses.shape != self.initial.shape:
            raise ValueError(f"held-out losses must have shape {tuple(self.initial.shape)}, got {tuple(losses.shape)}")
        for limit in self.limits:
            limit.observe_heldout(losses, self.weights)

    def observe(self, losses: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor | None = None, **signals) -> None:
        """Record per-sample (or per-token, with ``mask``) training losses of a (micro-)batch."""
        if self.graph:
            self._graphed().observe(losses, domains, mask, signals)
        else:
            self.record(losses, domains, mask, **signals)

    def step(self) -> torch.Tensor:
        """One update per optimizer step; returns the new weights (on the device)."""
        self.steps += 1
        if self.graph:
            self._graphed().step()
        else:
            self.now = self.schedule(self.steps)
            self.weights = self.next_weights()
        self.stepped()
        return self.weights

    def _graphed(self):
        if self._graphs is None:
            self._graphs = ControllerGraphs(self)
        return self._graphs

    # -- checkpoint ---------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Tensors and numbers: the weights, the statistics, the epoch count, the limits' and the controller's own
        state."""
        state = {
            "name": self.name,
            "steps": self.steps,
            "initial": self.initial.detach().clone(),
            "weights": self.weights.detach().clone(),
            "problems": self.stats.problems.clone(),
            "epochs": self.epochs.drawn.clone(),
        }
        for limit in self.limits:
            state.update(limit.state_dict())
        return {**state, **{key: value.detach().clone() for key, value in self.extra_state().items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` (onto this controller's device)."""
        if state["name"] != self.name:
            raise ValueError(f"state is for controller {state['name']!r}, this one is {self.name!r}")
        saved = state.get("initial")  # checkpoints from before it was saved: not checked
        if saved is not None and not torch.equal(saved.to(self.device), self.initial):
            raise ValueError(
                f"checkpoint does not match this controller: its starting weights were {saved.tolist()} when saved, "
                f"are now {self.initial.tolist()} (the mixture file's weights changed?). A controller's starting "
                "weights shape every later update: resume with the weights it was started with"
            )
        self.steps = int(state["steps"])
        self.weights = state["weights"].to(self.device, copy=True)
        self.stats.problems = state["problems"].to(self.device)
        if "epochs" in state:  # checkpoints from before the epoch count: it starts afresh
            self.epochs.drawn = state["epochs"].to(self.device, copy=True)
        for limit in self.limits:
            limit.load_state_dict(state)
        for key in self.extra_state():
            if key not in state:  # state added since the checkpoint was saved: said, and kept at its start
                warnings.warn(
                    f"the checkpoint has no {self.name} state {key!r} (saved by an earlier version): it starts from "
                    "its initial value",
                    stacklevel=2,
                )
                continue
            setattr(self, key, state[key].to(self.device, copy=True))
        self._graphs = None  # captured against the old tensors: capture again on next use
