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
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from onlinemix.mixing.graphs import ControllerGraphs
from onlinemix.mixing.stats import DomainStats

DEFAULT_REPEAT_BUDGET = 16.0  # epochs: see Controller's repeat_budget
DEFAULT_TRUST_REGION = 0.5  # nats: see Controller's trust_region
GUARD_PASSES = 4  # water-filling passes of Controller.guard (fixed: no branch on a value)


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
    """Base class. Subclasses implement ``update()``; ``step()`` applies the trust region, the minimum ratio, the guard
    and the floor.

    Args:
        initial: the starting weights (k,), non-negative, summing to 1.
        min_prob: every weight stays at least this (mixed with the uniform
            distribution: ``w <- (1 - k * min_prob) * w + min_prob``).
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
        trust_region: ``δ`` in nats (default 0.5), or ``None``: keep every published mixture within
            ``KL(w ‖ initial) ≤ δ`` of the starting weights, so that no signal, however noisy, can take the
            mixture far from the prior the user chose. A proposal outside is pulled back along the geodesic
            ``w_τ ∝ initial^(1-τ) · w^τ`` to the boundary (``τ`` by bisection on the device, no host sync).
            For scale: 70% of the weight on one of 7 domains (the rest even) is 0.80 nats from uniform,
            90% is 1.44, 50% is 0.35; with 256 domains, all the weight spread over the 155 of them is 0.5.
            Smaller is safer and moves less; ``None`` trusts the signal all the way (DoReMi's excess losses
            went 4 nats from uniform in the quality suite's *many* scenario, and lost 0.11 nats on its
            target). Fixed and replayed weights (``static``, ``scheduled``) are never bounded.
        min_ratio: no weight goes below this fraction of its starting weight (``None``: no bound; ADO's default
            is 0.9). The KL bound above lets a controller take most of a small domain's weight for a small
            divergence; this one bounds what any domain can lose, and with it the harm to an objective the
            controller does not see (a held-out target whose loss goes with the log of the weight on its kind
            loses at most its sensitivity times ``ln(1 / min_ratio)``). What it gives back to a domain comes from
            the others in proportion to how far each is above its own bound.
        heldout_tolerance: nats: a domain drawn above its starting weight whose held-out loss
            (``observe_heldout()``, smoothed) has risen more than this above its lowest is being memorised, and its
            weight is held at most at its starting weight (the rest goes to the other domains) until its held-out
            loss reaches a new lowest. Smaller reacts to smaller rises and to more noise; only active when the
            trainer calls ``observe_heldout()``.
        heldout_ema: how much of the smoothed held-out loss each ``observe_heldout()`` keeps (0: none):
            held-out losses of a few windows are noisy, and a guard that fires on noise moves weight for nothing.
        repeat_budget: epochs: how often a domain may be drawn over in the whole run. Where the run's length
            is known (the mixer passes the dataset's ``num_batches``), no domain's weight goes above what draws it
            this many times by the end: ``budget · size / (samples per step · steps)`` (or its starting weight,
            where that is more: the user's prior is never cut), the rest going to the other domains. In any run,
            a domain drawn this many times over (by the published weights) is held at most at its starting
            weight for the rest of it, like a memorised one. Repeated data loses its value after a few epochs
            and is memorised after tens: a controller that chases a small domain's fast-falling training loss
            spreads its draws over the run instead of spending them in the first hundred steps, while a large
            domain is never near the budget. ``None``: no budget.
        graph: replay ``observe()`` and ``step()`` as CUDA graphs (CUDA only):
            a few launches per call instead of tens, so the host spends
            microseconds per step whatever the controller does. Each new input
            shape and each phase is captured once, on first use (that call
            synchronises). Measured in ``benchmarks/controller_step.py``.
    """

    name = "base"
    adaptive = True  # the weights follow feedback: the trust region and the guard apply (not to fixed or replayed ones)

    def __init__(
        self,
        initial: torch.Tensor,
        min_prob: float = 0.0,
        device: torch.device | str | None = None,
        compile: bool | str = False,
        importance_gain: float = 0.0,
        trust_region: float | None = DEFAULT_TRUST_REGION,
        min_ratio: float | None = None,
        heldout_tolerance: float = 0.02,
        heldout_ema: float = 0.5,
        repeat_budget: float | None = DEFAULT_REPEAT_BUDGET,
        graph: bool = False,
    ):
        initial = torch.as_tensor(initial, dtype=torch.float32, device=device)
        self.num_domains = initial.numel()
        check_initial(initial)
        if not 0 <= min_prob * self.num_domains < 1:
            raise ValueError(f"min_prob {min_prob} x {self.num_domains} domains must be in [0, 1)")
        self.min_prob = min_prob
        if trust_region is not None and not (isinstance(trust_region, (int, float)) and trust_region > 0):
            raise ValueError(f"trust_region must be a number of nats > 0 (or None), got {trust_region!r}")
        self.trust_region = trust_region
        if min_ratio is not None and not (isinstance(min_ratio, (int, float)) and 0 < min_ratio < 1):
            raise ValueError(f"min_ratio must be a fraction in (0, 1) (or None), got {min_ratio!r}")
        self.min_ratio = min_ratio
        if not (heldout_tolerance >= 0 and 0 <= heldout_ema < 1):
            raise ValueError(
                f"need heldout_tolerance >= 0 and 0 <= heldout_ema < 1, got {heldout_tolerance}, {heldout_ema}"
            )
        self.heldout_tolerance, self.heldout_ema = float(heldout_tolerance), float(heldout_ema)
        if repeat_budget is not None and not (isinstance(repeat_budget, (int, float)) and repeat_budget > 0):
            raise ValueError(f"repeat_budget must be a number of epochs > 0 (or None), got {repeat_budget!r}")
        self.repeat_budget = repeat_budget
        self.importance_gain = float(importance_gain)
        self.device = initial.device
        self.initial = initial / initial.sum()
        self.weights = self.floor(self.initial).clone()
        # The memorisation guard's state (observe_heldout): each domain's smoothed held-out loss and its lowest;
        # NaN / inf until a domain is first measured (the guard leaves it alone until then).
        self.heldout = torch.full_like(self.initial, float("nan"))
        self.heldout_best = torch.full_like(self.initial, float("inf"))
        self.holding = torch.zeros_like(self.initial, dtype=torch.bool)  # held for a rising held-out loss
        self.epochs = torch.zeros_like(self.initial)  # epochs drawn of each domain, by the published weights
        self.epoch_rate: torch.Tensor | None = None  # epochs a step adds per unit of weight (count_epochs())
        self.epoch_cap: torch.Tensor | None = None  # the most weight the budget allows each domain (count_epochs())
        self.stats = DomainStats(self.num_domains, self.device, compile=compile)
        self.steps = 0
        self.domains: list[str] | None = None  # the domain names, where the controller knows them (from a log)
        self.now: dict[str, Any] = {}
        self.graph = graph
        self._graphs = None
        if graph and self.device.type != "cuda":
            raise ValueError(f"graph=True needs the controller on a CUDA device, not {self.device}")

    def floor(self, weights: torch.Tensor) -> torch.Tensor:
        """Mix ``weights`` with the uniform distribution so that every weight is at least ``min_prob``."""
        if self.min_prob == 0:
            return weights
        return (1 - self.num_domains * self.min_prob) * weights + self.min_prob

    def within_trust_region(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` pulled toward ``initial`` until ``KL(w ‖ initial) ≤ trust_region`` (unchanged inside it,
        or without a trust region). The family ``w_τ ∝ initial^(1-τ) · weights^τ`` runs from the prior
        (``τ = 0``) to the proposal (``τ = 1``) with a KL that grows with ``τ``; a fixed number of bisection
        steps finds the largest ``τ`` inside (to ``2^-24``), on the device, without branching on a value."""
        if self.trust_region is None:
            return weights
        allowed = self.initial > 0  # a domain the prior leaves out stays out, exactly
        log_prior = torch.log(self.initial.clamp(min=1e-30))
        log_proposal = torch.log((weights / weights.sum()).clamp(min=1e-30))

        def point(tau: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            logits = torch.where(allowed, log_prior + tau * (log_proposal - log_prior), -torch.inf)
            w = torch.softmax(logits, dim=0)
            divergence = torch.where(allowed, w * (torch.log_softmax(logits, dim=0) - log_prior), 0.0)
            return w, divergence.sum()

        low, high = weights.new_zeros(()), weights.new_ones(())
        for _ in range(24):
            middle = (low + high) / 2
            inside = point(middle)[1] <= self.trust_region
            low, high = torch.where(inside, middle, low), torch.where(inside, high, middle)
        whole, divergence = point(weights.new_ones(()))
        return torch.where(divergence <= self.trust_region, whole, point(low)[0])

    def above_min_ratio(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` with every domain at least ``min_ratio`` times its starting weight: each keeps its bound
        plus its share of what is left, in proportion to how far it was above its bound (unchanged where every
        weight is already at or above it, or without a ``min_ratio``)."""
        if self.min_ratio is None:
            return weights
        bound = self.min_ratio * self.initial
        excess = (weights / weights.sum() - bound).clamp(min=0)
        # Σ excess ≥ 1 - min_ratio > 0: what the weights hold above the bounds is at least what the bounds leave
        return bound + (1 - self.min_ratio) * excess / excess.sum()

    def count_epochs(self, samples_per_step: float, sizes: Sequence[int], steps: int | None = None) -> None:
        """Count the epochs each domain is drawn, for ``repeat_budget``: ``samples_per_step`` samples a step, each
        domain's size in samples, and the run's length in steps where it is known (the mixer calls this with its
        dataset's): then no weight goes above what spends the budget by the last step."""
        sizes = torch.as_tensor(list(sizes), dtype=torch.float32, device=self.device)
        if sizes.shape != self.initial.shape or not (sizes > 0).all():
            raise ValueError(f"need {self.num_domains} domain sizes > 0, got {sizes.tolist()}")
        if steps is not None and not steps > 0:
            raise ValueError(f"steps must be > 0 (or None: not known), got {steps}")
        self.epoch_rate = samples_per_step / sizes
        if steps is not None and self.repeat_budget is not None:
            self.epoch_cap = torch.maximum(self.repeat_budget / (self.epoch_rate * steps), self.initial).clamp(max=1)

    def memorised(self) -> torch.Tensor:
        """Which domains the guard holds (a boolean vector on the device): those past ``repeat_budget``
        epochs, and those whose smoothed held-out loss rose more than ``heldout_tolerance`` above its lowest,
        until it reaches a new lowest. (Freeing a domain as soon as its loss dips back under the tolerance
        would free it as soon as holding it works, and a controller that still prefers it would pour the
        weight back: the guard would flap.)"""
        if self.repeat_budget is None or self.epoch_rate is None:
            return self.holding
        return self.holding | (self.epochs >= self.repeat_budget)

    def guard(self, weights: torch.Tensor) -> torch.Tensor:
        """``weights`` with every memorised domain held at most at its starting weight and every domain at most
        at its epoch budget's cap (``count_epochs``); what that takes away goes to the domains below their caps,
        in proportion to their weights (or, where none can take it, stays away: the vector is renormalised).
        Unchanged while no domain is memorised or over its cap."""
        weights = weights / weights.sum()
        cap = torch.where(self.memorised(), self.initial, 1.0)
        if self.epoch_cap is not None:
            cap = torch.minimum(cap, self.epoch_cap)
        # Water-filling: what one pass gives a domain may take it over its own cap; a few passes settle it (the
        # caps sum to at least 1 wherever the budget alone binds: each is at least the starting weight).
        for _ in range(GUARD_PASSES):
            capped = torch.minimum(weights, cap)
            free = torch.where(capped < cap, capped, 0.0)
            room = free.sum()
            spread = torch.where(room > 0, (1 - capped.sum()) / room.clamp(min=1e-30), 0.0)
            weights = capped + spread * free
        return weights

    def next_weights(self) -> torch.Tensor:
        """``update()`` with the probability floor, checked on the device: a vector that is not a distribution
        (a non-finite, negative or all-zero weight, e.g. from a NaN alignment or an overflowing reward) is
        rejected: the last weights stay, the rejection is counted in ``stats`` (the mixer warns or raises),
        and the state ``update()`` carried forward (``extra_state()``) is rolled back to before it, so that the
        bad observation is dropped rather than kept: the next good one moves the weights again.

        ``update()`` must assign new tensors to its state (``self.x = self.x + ...``), not write into them in
        place, for the roll-back to see the old values."""
        before = self.extra_state()
        weights = self.update()
        if self.adaptive:  # fixed and replayed weights are the user's: neither bounded nor guarded
            weights = self.guard(self.above_min_ratio(self.within_trust_region(weights)))
        weights = self.floor(weights)
        total = weights.sum()
        good = torch.isfinite(total) & (weights >= 0).all() & (total > 0)  # a NaN or inf makes the sum non-finite
        self.stats.reject(~good)
        for name, old in before.items():
            new = getattr(self, name)
            if new is not old:
                setattr(self, name, torch.where(good, new, old))
        weights = torch.where(good, weights / torch.where(good, total, 1.0), self.weights)
        if self.epoch_rate is not None:
            self.epochs.add_(weights * self.epoch_rate)  # in place: a graphed step() reads this buffer
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
        not measured), e.g. every few steps on a few dozen fixed windows per domain: the memorisation guard.
        A small domain drawn many epochs over has a training loss that keeps falling (the model memorises it)
        while its held-out loss rises; every controller that reads training loss (ADO's fits, ODM's rewards)
        would pour weight onto it. From the step after its smoothed held-out loss rises more than
        ``heldout_tolerance`` above its lowest while it is drawn above its starting weight, its weight is held at
        most at its starting weight, until its held-out loss reaches a new lowest. (The held-out loss of a domain
        drawn at or below its start rises as the model forgets it: that is not memorisation.)
        Every rank must pass the same values (measure the same windows, or all-reduce them)."""
        losses = torch.as_tensor(losses, dtype=torch.float32, device=self.device)
        if losses.shape != self.initial.shape:
            raise ValueError(f"held-out losses must have shape {tuple(self.initial.shape)}, got {tuple(losses.shape)}")
        measured = torch.isfinite(losses)
        smoothed = torch.where(
            torch.isnan(self.heldout), losses, torch.lerp(losses, self.heldout, self.heldout_ema)
        )  # the first measurement of a domain starts its mean
        # in place: a graphed step() reads these buffers
        self.heldout.copy_(torch.where(measured, smoothed, self.heldout))
        rising = self.heldout > self.heldout_best + self.heldout_tolerance  # NaN compares False: not measured yet
        # Memorised: drawn above its starting weight while its held-out loss rises. A domain at or below its start
        # whose held-out loss rises is being forgotten, not memorised: holding it would change nothing, and counting
        # it would leave the memorised domain's excess nowhere to go (with every other domain "held", none is free).
        favoured = self.weights > self.initial
        lowest = self.heldout <= self.heldout_best  # a new lowest (False for NaN)
        self.holding.copy_(torch.where(lowest, False, self.holding | (rising & favoured)))
        self.heldout_best.copy_(torch.where(lowest, self.heldout, self.heldout_best))

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
        """Tensors and numbers: the weights, the statistics and the controller's own state."""
        return {
            "name": self.name,
            "steps": self.steps,
            "initial": self.initial.detach().clone(),
            "weights": self.weights.detach().clone(),
            "problems": self.stats.problems.clone(),
            "heldout": self.heldout.clone(),
            "heldout_best": self.heldout_best.clone(),
            "holding": self.holding.clone(),
            "epochs": self.epochs.clone(),
            **{key: value.detach().clone() for key, value in self.extra_state().items()},
        }

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
        if "heldout" in state:  # checkpoints from before the guard: it starts afresh
            self.heldout = state["heldout"].to(self.device, copy=True)
            self.heldout_best = state["heldout_best"].to(self.device, copy=True)
            self.holding = state["holding"].to(self.device, copy=True)
            self.epochs = state["epochs"].to(self.device, copy=True)
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
