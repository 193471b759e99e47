"""DGA (Fan et al., 2024, "Dynamic Gradient Alignment"): steer the mixture toward a target's gradient.

Every ``every`` steps the trainer measures, for each domain ``d``, the
alignment ``a_d = <∇ℓ_d, ∇ℓ_target>`` of the domain's loss gradient with the
gradient of a small target set (``gradient_alignment`` below computes it),
and the weights take a mirror-descent step smoothed by an EMA::

    ā     = γ ā + (1 - γ) a              (γ = alignment_ema; 0: each alignment as measured)
    w_new = softmax(log w + η ā)
    w     = β w + (1 - β) w_new

with ``w`` the weights in force: those published last step, after the limits (as DoReMi steps). An earlier
version stepped from a mixture of its own that the limits never saw: pushed on by alignments that kept
favouring one domain, it ran past the trust region into a corner where the other weights underflowed to 0 and
could never come back, so later alignments moved only that state, not the published weights; and once the
memorisation guard held the favoured domain, every weight sat at its start for the rest of the run.
(``basis`` mode keeps its own mixture over the basis rows: the limits act on the domains.)

Alignments measured on a small target sample are noisy: one batch of 64
windows can rank the domains differently from the next. ``alignment_ema``
averages them before they move the weights (the EMA on ``w`` smooths the
weights' path, but still follows each measurement's direction), and the
base class's ``trust_region`` bounds how far from the starting weights they
can go at all.

Cost: one forward/backward on the target batch plus one per domain, every
``every`` steps — with ``every = 10`` and 4 domains about half a training
step's compute per step on average. Between updates the weights are held.

**Aligning less once alignments stop moving the weights** (``backoff``, on by default). A trainer that asks
``alignment_due()`` before measuring spends the cost only when an update will use it: each update that
moved the weights less than ``settle`` (total variation) doubles the steps to the next one, up to
``max_every``; one that moved them more brings the interval back to ``every``. (At the trust region's
boundary, or with alignments that agree step after step, the weights stop moving and the backward passes
would buy nothing.) A trainer that measures on its own schedule gets an update whenever it gives one.

**Distribution reweighting** (``basis``, for thousands of fine-grained
domains or clusters): the weights are ``w = α · B`` for ``m`` fixed basis
distributions over the ``k`` domains (rows of ``B``, each on the simplex),
and the mirror-descent step moves ``α`` on the ``m``-simplex from the
alignments ``a_j`` of batches drawn from each basis distribution. The cost
is one backward per basis distribution, independent of ``k``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from onlinemix.mixing.controllers.base import Controller


def gradient_alignment(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    domain_batches: Sequence[Any | None],
    target_batch: Any,
    cosine: bool = False,
) -> torch.Tensor:
    """``a_d = <∇ loss_fn(model, domain_batches[d]), ∇ loss_fn(model, target_batch)>`` for each domain.

    ``cosine=True`` divides each inner product by both gradients' norms: alignments in [-1, 1] whatever
    the gradients' scale (which shrinks as training goes on), so one ``eta`` suits a whole run.
    ``None`` in ``domain_batches`` gives ``a_d = 0``. Gradients are taken with
    ``torch.autograd.grad`` and leave the parameters' ``.grad`` untouched.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    target = torch.autograd.grad(loss_fn(model, target_batch), parameters)
    target_norm = torch.sqrt(sum((t * t).sum() for t in target))
    alignment = torch.zeros(len(domain_batches), device=target[0].device)
    for d, batch in enumerate(domain_batches):
        if batch is None:
            continue
        gradient = torch.autograd.grad(loss_fn(model, batch), parameters, allow_unused=True)
        inner = sum(((g * t).sum() for g, t in zip(gradient, target) if g is not None), alignment.new_zeros(()))
        if cosine:
            norm = torch.sqrt(sum(((g * g).sum() for g in gradient if g is not None), alignment.new_zeros(())))
            inner = inner / (norm * target_norm).clamp(min=1e-30)
        alignment[d] = inner
    return alignment


class DGAController(Controller):
    """Weights from the alignment of each domain's gradient with a target's (see the module docstring).

    Args:
        initial: the starting weights.
        eta: step size on the alignments (with ``cosine=True`` alignments, in [-1, 1]).
        ema: ``w ← ema·w + (1 − ema)·softmax(log w + η·a)``: how much of the old weights each update keeps.
        every: optimizer steps between updates (an alignment is measured for each), while the weights move.
        backoff: double the steps between updates after each that moved the weights less than ``settle`` (total
            variation), up to ``max_every`` (default ``16 · every``); see ``alignment_due``.
        alignment_ema: ``γ``: how much of the running mean of the alignments each update keeps (0: none).
        basis: optional ``(m, k)`` rows of distributions over the domains: the update moves weights over
            the rows (one backward per row, for thousands of domains).
        **kwargs: ``Controller``'s (``trust_region``, ``min_prob``, ``device``, ``importance_gain``, ``graph``...).
            The default trust region matters most here: alignments with a small target sample are noisy and favour
            whatever looks like the target (English manual pages for German ones), and without a bound DGA can
            pour 80% of the weight onto such a domain (see ``docs/quality.md``, *small-specific*).
    """

    name = "dga"

    def __init__(
        self,
        initial: torch.Tensor,
        eta: float = 1.0,
        ema: float = 0.9,
        every: int = 1,
        basis: torch.Tensor | None = None,
        alignment_ema: float = 0.0,
        backoff: bool = True,
        settle: float = 0.005,
        max_every: int | None = None,
        **kwargs,
    ):
        """``initial``: weights over the domains, or over the ``m`` rows of ``basis`` (an ``(m, k)`` tensor)."""
        if eta <= 0 or not 0 <= ema < 1 or every < 1 or not 0 <= alignment_ema < 1:
            raise ValueError(
                f"need eta > 0, 0 <= ema < 1, every >= 1, 0 <= alignment_ema < 1; got {eta}, {ema}, {every}, "
                f"{alignment_ema}"
            )
        initial = torch.as_tensor(initial, dtype=torch.float32, device=kwargs.get("device"))
        self.basis = None
        if basis is not None:
            basis = torch.as_tensor(basis, dtype=torch.float32, device=initial.device)
            if basis.ndim != 2 or basis.shape[0] != initial.numel():
                raise ValueError(
                    f"basis must be (m, k) with m = {initial.numel()} (len(initial)), got {tuple(basis.shape)}"
                )
            if (basis < 0).any() or not torch.allclose(basis.sum(dim=1), torch.ones(len(basis), device=basis.device)):
                raise ValueError("each row of basis must be a distribution over the domains (>= 0, summing to 1)")
            self.basis = basis
        alpha = initial / initial.sum()
        super().__init__(alpha if basis is None else alpha @ basis, **kwargs)
        self.eta, self.ema, self.every, self.alignment_ema = eta, ema, every, alignment_ema
        max_every = 16 * every if max_every is None else max_every
        if not isinstance(backoff, bool) or not settle >= 0 or max_every < every:
            raise ValueError(f"need backoff true or false, settle >= 0, max_every >= every; got {backoff!r}, "
                             f"{settle}, {max_every}")  # fmt: skip
        self.backoff, self.settle, self.max_every = backoff, settle, max_every
        self.interval = every  # steps between updates now (host)
        self.last_update = 0  # the step of the last update (host)
        self._unread = False  # an update whose move alignment_due has not read yet (host)
        self.before = self.weights  # the published weights before the last update
        self.mixture = alpha.clone()  # the last proposal, over domains or basis rows (before the limits)
        self.alignment = torch.zeros_like(self.mixture)  # the last measured
        # ā: their running mean, from 0 ("no evidence yet"): the first updates move the weights less
        self.smoothed = torch.zeros_like(self.mixture)
        self._measured = False  # a Python flag: no tensor is looked at to decide

    def observe_alignment(self, alignment: torch.Tensor) -> None:
        """Record the alignment of each domain (or basis row) for this step (see ``gradient_alignment``)."""
        if alignment.shape != self.mixture.shape:
            raise ValueError(f"alignment must have shape {tuple(self.mixture.shape)}, got {tuple(alignment.shape)}")
        self.alignment.copy_(alignment.detach())  # in place: a graphed update reads this buffer
        self._measured = True

    def alignment_due(self) -> bool:
        """Whether the next ``step()`` updates the weights from an alignment: measure one (``observe_alignment``)
        before it only then. With ``backoff``, the first call after an update reads how far that update moved the
        weights (one number from the device, before the alignment's backward passes, which cost far more) and
        sets the interval to the next one."""
        if self.backoff and self._unread:
            self._unread = False
            moved = float(0.5 * (self.weights - self.before).abs().sum())  # how far the limits let it move them
            self.interval = min(2 * self.interval, self.max_every) if moved < self.settle else self.every
        return self.steps + 1 - self.last_update >= self.interval

    def phase(self) -> bool:
        # a mirror-descent step this time: due, and an alignment given
        return self._measured and self.steps - self.last_update >= self.interval

    def update(self) -> torch.Tensor:
        self.stats.take()
        if self.phase():
            current = self.weights if self.basis is None else self.mixture  # the weights in force (module docstring)
            self.smoothed = torch.lerp(self.alignment, self.smoothed, self.alignment_ema)
            proposal = torch.softmax(torch.log(current) + self.eta * self.smoothed, dim=0)
            self.mixture = torch.lerp(proposal, current, self.ema)
            self.before = self.weights.clone()  # the published weights this update moves from (what backoff reads)
        # between updates the last proposal again: the limits map it as they did (a floor applied to the published
        # weights again would pull them toward uniform a little more every step)
        return self.mixture if self.basis is None else self.mixture @ self.basis

    def stepped(self) -> None:
        if self.steps - self.last_update >= self.interval:  # the step just taken was due: it used an alignment if given
            if self._measured:
                self.last_update, self._unread = self.steps, True
            self._measured = False

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"alignment": self.alignment, "smoothed": self.smoothed, "mixture": self.mixture, "before": self.before}

    def state_dict(self) -> dict[str, Any]:
        """``Controller.state_dict`` and the alignment cadence (host numbers)."""
        return {**super().state_dict(), "interval": self.interval, "last_update": self.last_update,
                "unread": self._unread}  # fmt: skip

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """``Controller.load_state_dict`` and the cadence (a checkpoint from before it: every ``every`` steps)."""
        super().load_state_dict(state)
        self.interval = int(state.get("interval", self.every))
        self.last_update = int(state.get("last_update", self.steps - self.steps % self.every))
        self._unread = bool(state.get("unread", False))
