"""DGA (Fan et al., 2024, "Dynamic Gradient Alignment"): steer the mixture toward a target's gradient.

Every ``every`` steps the trainer measures, for each domain ``d``, the
alignment ``a_d = <∇ℓ_d, ∇ℓ_target>`` of the domain's loss gradient with the
gradient of a small target set (``gradient_alignment`` below computes it),
and the weights take a mirror-descent step smoothed by an EMA::

    w_new = softmax(log w + η a)
    w     = β w + (1 - β) w_new

Cost: one forward/backward on the target batch plus one per domain, every
``every`` steps — with ``every = 10`` and 4 domains about half a training
step's compute per step on average. Between updates the weights are held.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from mixing.controllers.base import Controller


def gradient_alignment(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    domain_batches: Sequence[Any | None],
    target_batch: Any,
) -> torch.Tensor:
    """``a_d = <∇ loss_fn(model, domain_batches[d]), ∇ loss_fn(model, target_batch)>`` for each domain.

    ``None`` in ``domain_batches`` gives ``a_d = 0``. Gradients are taken with
    ``torch.autograd.grad`` and leave the parameters' ``.grad`` untouched.
    """
    parameters = [p for p in model.parameters() if p.requires_grad]
    target = torch.autograd.grad(loss_fn(model, target_batch), parameters)
    alignment = torch.zeros(len(domain_batches), device=target[0].device)
    for d, batch in enumerate(domain_batches):
        if batch is None:
            continue
        gradient = torch.autograd.grad(loss_fn(model, batch), parameters, allow_unused=True)
        alignment[d] = sum(((g * t).sum() for g, t in zip(gradient, target) if g is not None), alignment.new_zeros(()))
    return alignment


class DGAController(Controller):
    name = "dga"

    def __init__(self, initial: torch.Tensor, eta: float = 1.0, ema: float = 0.9, every: int = 1, **kwargs):
        super().__init__(initial, **kwargs)
        if eta <= 0 or not 0 <= ema < 1 or every < 1:
            raise ValueError(f"need eta > 0, 0 <= ema < 1, every >= 1; got {eta}, {ema}, {every}")
        self.eta, self.ema, self.every = eta, ema, every
        self.alignment = torch.zeros_like(self.weights)
        self.mixture = self.initial.clone()  # before the probability floor
        self._measured = False  # a Python flag: no tensor is looked at to decide

    def observe_alignment(self, alignment: torch.Tensor) -> None:
        """Record the per-domain alignment measured for this step (see ``gradient_alignment``)."""
        if alignment.shape != (self.num_domains,):
            raise ValueError(f"alignment must have shape ({self.num_domains},), got {tuple(alignment.shape)}")
        self.alignment = alignment.detach().float().to(self.device)
        self._measured = True

    def update(self) -> torch.Tensor:
        self.stats.take()
        if self.steps % self.every == 0 and self._measured:
            proposal = torch.softmax(torch.log(self.mixture) + self.eta * self.alignment, dim=0)
            self.mixture = self.ema * self.mixture + (1 - self.ema) * proposal
            self._measured = False
        return self.mixture

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"alignment": self.alignment, "mixture": self.mixture}
