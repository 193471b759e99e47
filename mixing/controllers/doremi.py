"""DoReMi (Xie et al., 2023): upweight domains where the model lags a reference model most.

Each step, with ``λ_d`` the mean clipped excess loss ``max(0, loss - reference)``
of domain ``d``'s samples since the last step (for a domain with no sample
since then: its latest such mean, 0 before its first)::

    α' = w_{t-1} · exp(η λ)         (exponentiated gradient, done in log space)
    w_t = (1 - c) · α' / Σ α' + c / k

``average`` holds the running mean of ``w_1 .. w_t``: the paper's final
mixture, to train a larger model with (e.g. as a static or replayed schedule).

The reference loss is given per sample to ``observe(reference=...)``: a
column precomputed by a reference model, or its output in the same step.

Why a domain absent from a step keeps its latest excess (the paper's batches
hold every domain, so it never says): counted as 0, it would gain nothing on
the steps it is not drawn while the domains drawn gain, and a domain is
drawn in proportion to its weight — the heavier, the more steps it gains on.
With more domains than a batch has samples (hundreds of clusters), that
feedback, not the excess losses, decided where the weight went.
"""

from __future__ import annotations

import torch

from onlinemix.mixing.controllers.base import Controller


class DoReMiController(Controller):
    """Exponentiated-gradient ascent on each domain's excess loss over a reference model (see the module docstring).

    Each sample's feedback is its loss minus the ``reference`` signal (the same sample's loss under a
    reference model), clipped at 0; ``w ← (1 − c)·softmax(log w + η·λ) + c/k``. ``average`` is the running mean
    of the weights: DoReMi's final mixture.

    Args:
        initial: the starting weights.
        eta: step size on the excess losses.
        smoothing: ``c``, the share of the uniform distribution mixed in.
        **kwargs: ``Controller``'s (``min_prob``, ``device``, ``importance_gain``, ``graph``...).
    """

    name = "doremi"

    def __init__(self, initial: torch.Tensor, eta: float = 1.0, smoothing: float = 1e-3, **kwargs):
        super().__init__(initial, **kwargs)
        if eta <= 0 or not 0 <= smoothing < 1:
            raise ValueError(f"need eta > 0 and 0 <= smoothing < 1, got eta={eta}, smoothing={smoothing}")
        self.eta, self.smoothing = eta, smoothing
        # float64: a float32 running sum would lose the weights' low digits after some 10^4 steps
        self.weight_sum = torch.zeros_like(self.weights, dtype=torch.float64)
        self.excess = torch.zeros_like(self.weights)  # each domain's latest mean excess loss

    @property
    def average(self) -> torch.Tensor:
        """The running mean of the weights over the steps so far."""
        return (self.weight_sum / max(self.steps, 1)).float()

    def record(self, losses, domains, mask=None, *, reference: torch.Tensor, **signals) -> None:
        if reference.shape != losses.shape:
            raise ValueError(f"reference losses {tuple(reference.shape)} differ from losses {tuple(losses.shape)}")
        excess = (losses.detach() - reference.detach()).clamp(min=0)
        self.stats.add(self.with_importance(excess, signals), domains, mask)

    def update(self) -> torch.Tensor:
        excess, present = self.stats.take()
        self.excess = torch.where(present, excess, self.excess)
        alpha = torch.softmax(torch.log(self.weights) + self.eta * self.excess, dim=0)
        weights = (1 - self.smoothing) * alpha + self.smoothing / self.num_domains
        self.weight_sum = self.weight_sum + weights  # a new tensor: a rejected update is rolled back
        return weights

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {"weight_sum": self.weight_sum, "excess": self.excess}
