"""ADO (Jiang et al., ICLR 2025, "Adaptive Data Optimization"): sample where each domain's loss falls fastest.

For every domain ``d`` a power law of the training step ``t`` is fitted to its
training loss::

    L_d(t) ≈ ε_d + β_d · t^(-α_d)

and the domains are weighted by how fast their fitted loss is still falling,
times a prior ``μ``::

    s_d  = α_d β_d t^(-α_d)                        (-dL/dt · t: the 1/t is the same for every domain)
    ρ_d  ∝ μ_d · ŝ_d                               (ŝ: s pulled toward the mean by its evidence, below)
    π̄   = running mean of ρ (the initial weights count as the warm-up's steps)
    π    = (1 - mix) · π̄ + mix · ρ

as the authors' reference code does (the fit on a step count shared by all
domains, the running mean, ``mix = 0.1``), with three changes that keep it from
doing harm where its evidence is thin or its objective is not the user's ("Evidence",
"Credit" and "Transfer" below).

**The fit runs on the device, every step, in closed form.** For a fixed
exponent ``α`` the law is linear in ``(ε, β)``, so least squares over the
step's losses weighted by their sample counts only needs six running sums per
domain and exponent (``Σw, Σw x, Σw x², Σw L, Σw x L, Σw L²`` with
``x = t^-α``), and a count of the steps that saw the domain. The controller
keeps them for a grid of ``exponents`` and, at each step, solves every 2×2
system and keeps the exponent with the smallest residual: a few hundred
multiply-adds per domain, no history buffer, no iterative optimiser, no host
synchronisation. (The reference fits with L-BFGS from a grid of starting
points every ``update_interval`` steps, on a host copy of the whole loss
history.) ``ε`` and ``β`` are kept non-negative: where the unconstrained
solution has ``β < 0`` (a loss that rises) the domain's slope is taken as 0,
where it has ``ε < 0`` the fit is redone with ``ε = 0``.

**Evidence.** With a few domains and large batches every fit rests on
thousands of samples; with hundreds of clusters and a batch of 32 a cluster is
drawn once every few steps, and its fitted slope is mostly noise, which the
weights would follow. So each slope is pulled toward the prior-weighted mean
``s̄`` of all of them by how uncertain it is (empirical Bayes, as in a
James-Stein estimate)::

    v_d  = (α_d t^-α_d)² · σ²_d / Σ w (x - x̄)²      (the fit's variance of s_d; σ²_d = residual / (steps - 2))
    τ²   = max(0, spread of the s_d about s̄ - mean v_d)   (how much the true slopes differ)
    ŝ_d  = s̄ + τ² / (τ² + v_d) · (s_d - s̄)

A slope fitted on ample data keeps its value (the reference's behaviour); one
from a handful of samples, or a domain never drawn, counts as the mean: no
domain is starved because it has not been seen yet. ``shrinkage=False`` turns
this off. On the suite's 256-cluster scenario, ADO without it moved a quarter
of the weight off the clusters the target needs (their loss falls slower), and
ended 0.033 above uniform.

**Credit.** The reference also multiplies ``ρ`` by ``sqrt(h (1 - h))``, ``h``
an EMA of each step's realised domain shares, crediting a domain's falling loss
to its own samples. As ``h`` follows the weights, the weights then feed back
into themselves: the fixed point is ``π ∝ (μ s)²``, every difference between
slopes doubled in log terms, and with many domains ``h`` is a handful of
draws, so the credit is noise. It is off by default (``credit=True`` restores
it).

**Transfer.** A domain's loss also falls with its neighbours' data. Clusters of
the kind most of the mixture is made of ride on each other's samples; a
minority kind (the suite's German manual pages, 8 clusters of 256) learns
mostly from its own few, so its loss really does fall slower, ADO moves weight
off it, and it falls slower still: what an objective on that kind loses, and
ADO cannot see that objective. So by default no domain goes below nine tenths
of its starting weight (``min_ratio``, a limit any controller can take: an objective
whose loss goes with the log of the weight on its kind loses at most its
sensitivity times ``ln(1/0.9) ≈ 0.105``); ``min_ratio=None`` lifts it.

Steps before ``ignore`` are left out of the fit (the first steps fall faster
than any power law of the rest); the weights stay at their initial values for
``warmup`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from onlinemix.mixing.controllers.base import Controller

DEFAULT_EXPONENTS = tuple(0.02 * i for i in range(1, 41))  # α in (0, 0.8], the reference's range


class ADOController(Controller):
    """Weights from per-domain power-law fits of the training loss (see the module docstring).

    Args:
        initial: the starting weights; also the prior ``μ`` unless ``prior`` is given
            (the reference uses the domains' natural, size-proportional distribution).
        prior: ``μ``, a distribution over the domains.
        warmup: optimizer steps with the initial weights.
        ignore: the first steps left out of the fit (default: half the warm-up).
        mix: ``π = (1 - mix) · π̄ + mix · ρ``: how much of each step's preference
            goes straight into the weights (the rest through the running mean).
        history: decay of the EMA ``h`` of each step's domain shares (what ``credit`` reads).
        shrinkage: pull each fitted slope toward the mean by its uncertainty (see "Evidence" above).
        credit: multiply the preference by the reference's credit ``sqrt(h (1 - h))`` (see "Credit" above).
        exponents: the grid of exponents ``α`` the fit chooses from.
        **kwargs: ``Controller``'s (``min_prob``, ``device``, ``importance_gain``, ``graph``...). By default no
            weight goes below 0.9 of its starting weight (``min_ratio``, see "Transfer" above; ``None``: none).
    """

    name = "ado"
    default_limits: ClassVar[dict[str, Any]] = {**Controller.default_limits, "min_ratio": 0.9}

    def __init__(
        self,
        initial: torch.Tensor,
        prior: torch.Tensor | None = None,
        warmup: int = 100,
        ignore: int | None = None,
        mix: float = 0.1,
        history: float = 0.9,
        exponents: Sequence[float] = DEFAULT_EXPONENTS,
        shrinkage: bool = True,
        credit: bool = False,
        **kwargs,
    ):
        super().__init__(initial, **kwargs)
        ignore = warmup // 2 if ignore is None else ignore
        if warmup < 0 or not 0 <= ignore <= warmup or not 0 < mix <= 1 or not 0 <= history < 1:
            raise ValueError(
                f"need warmup >= 0, 0 <= ignore <= warmup, 0 < mix <= 1, 0 <= history < 1; "
                f"got {warmup}, {ignore}, {mix}, {history}"
            )
        if not exponents or any(not 0 < a < 10 for a in exponents):
            raise ValueError(f"exponents must be a non-empty list of numbers in (0, 10), got {exponents!r}")
        if not isinstance(shrinkage, bool) or not isinstance(credit, bool):
            raise ValueError(f"shrinkage and credit must be true or false, got {shrinkage!r} and {credit!r}")
        self.warmup, self.ignore, self.mix, self.history = warmup, ignore, mix, history
        self.shrinkage, self.credit = shrinkage, credit
        self.prior = self.initial if prior is None else torch.as_tensor(prior, dtype=torch.float32, device=self.device)
        if self.prior.shape != self.initial.shape or (self.prior < 0).any() or not self.prior.sum() > 0:
            raise ValueError(f"prior must be {self.num_domains} non-negative weights with a positive sum")
        self.prior = self.prior / self.prior.sum()
        self.exponents = torch.tensor(list(exponents), dtype=torch.float64, device=self.device)
        # (6, k, A): the weighted sums of the fit, in float64 (sums over thousands of steps)
        self.sums = torch.zeros(6, self.num_domains, len(self.exponents), dtype=torch.float64, device=self.device)
        self.observations = torch.zeros(self.num_domains, dtype=torch.float64, device=self.device)  # steps in the fit
        self.shares = self.initial.clone()  # h: EMA of the realised domain shares
        self.average = self.initial.clone()  # π̄: running mean of the preferences since the warm-up
        self.preference = self.initial.clone()  # ρ of the last step (for inspection)
        self.reliability = torch.zeros_like(self.initial)  # τ² / (τ² + v) of the last step (for inspection)

    def schedule(self, step: int) -> dict[str, float]:
        # log t for the fit's regressor t^-α; the running mean's weight for this step (the initial weights count
        # as the warm-up's steps, as in the reference, whose mean runs from step 0)
        return {"log_t": math.log(step), "fit": float(step > self.ignore), "mean": 1 / step}

    def phase(self) -> bool:
        return self.steps <= self.warmup  # warming up: weights held

    def update(self) -> torch.Tensor:
        losses, counts = self.stats.take_counts()
        share = counts / counts.sum().clamp(min=1)
        self.shares = torch.lerp(share, self.shares, self.history)
        self._accumulate(losses.double(), counts.double() * self.now["fit"])
        if self.phase():
            return self.initial
        self.preference = self.prior * self.slopes()
        if self.credit:
            self.preference = self.preference * torch.sqrt(self.shares * (1 - self.shares))
        total = self.preference.sum()
        # No domain left with a falling loss (or no fit yet): prefer the prior instead of dividing by zero.
        preference = torch.where(total > 0, self.preference / total.clamp(min=1e-30), self.prior)
        self.average = torch.lerp(self.average, preference, self.now["mean"])
        return torch.lerp(self.average, preference, self.mix)

    def _accumulate(self, losses: torch.Tensor, weights: torch.Tensor) -> None:
        """Add this step's ``(t^-α, L)`` pairs, weighted by the domains' sample counts, to the running sums."""
        x = torch.exp(-self.exponents * self.now["log_t"])[None, :]  # (1, A)
        w, loss = weights[:, None], losses[:, None]  # (k, 1)
        wx, wl = w * x, w * loss
        step = torch.stack([w.expand_as(wx), wx, wx * x, wl.expand_as(wx), wx * loss, (wl * loss).expand_as(wx)])
        self.sums = self.sums + step
        self.observations = self.observations + (weights > 0).double()

    def fit(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(ε, β, α)`` per domain: the least-squares power law of the losses seen so far (zeros without data)."""
        epsilon, beta, alpha, _ = self._fit()
        return epsilon, beta, alpha

    def _fit(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """``fit()``, and the variance of each ``β`` (infinite with fewer than three steps of data)."""
        n, sx, sxx, sl, sxl, sll = self.sums.unbind(0)  # each (k, A)
        variance = n * sxx - sx * sx
        covariance = n * sxl - sx * sl
        # A covariance within rounding of its terms is a flat loss, not a tiny slope: β = 0 there.
        real = (variance > 0) & (covariance.abs() > 1e-9 * (n * sxl).abs())
        beta = torch.where(real, covariance / variance.clamp(min=1e-30), 0.0).clamp(min=0)
        epsilon = (sl - beta * sx) / n.clamp(min=1e-30)
        # ε < 0 is not a loss floor: refit with ε = 0 (β = Σ x L / Σ x²)
        beta = torch.where(epsilon < 0, (sxl / sxx.clamp(min=1e-30)).clamp(min=0), beta)
        epsilon = epsilon.clamp(min=0)
        # Σ w (L - ε - β x)², expanded into the sums
        residual = sll + epsilon**2 * n + beta**2 * sxx - 2 * epsilon * sl - 2 * beta * sxl + 2 * epsilon * beta * sx
        best = residual.argmin(dim=1, keepdim=True)  # (k, 1)
        # Var β = σ² / Σ w (x - x̄)², σ² the variance of one sample's loss about the law: each step's mean over c
        # samples has variance σ²/c, so each weighted squared residual is σ² in expectation.
        steps = self.observations[:, None]
        noise = residual.clamp(min=0) / (steps - 2).clamp(min=1)
        beta_variance = torch.where(steps > 2, noise * n / variance.clamp(min=1e-30), math.inf)
        epsilon, beta, beta_variance = (values.gather(1, best).squeeze(1) for values in (epsilon, beta, beta_variance))
        return epsilon, beta, self.exponents[best.squeeze(1)], beta_variance

    def slopes(self) -> torch.Tensor:
        """``α β t^-α`` per domain: how fast each fitted loss still falls (times the step, which cancels), each
        pulled toward the prior-weighted mean by its uncertainty unless ``shrinkage`` is off."""
        _, beta, alpha, beta_variance = self._fit()
        scale = alpha * torch.exp(-alpha * self.now["log_t"])
        slope = scale * beta
        if not self.shrinkage:
            return slope.float()
        variance = scale**2 * beta_variance
        known = torch.isfinite(variance)
        weight = self.prior.double() * known
        total = weight.sum().clamp(min=1e-30)
        mean = (weight * slope).sum() / total
        spread = (weight * (slope - mean) ** 2).sum() / total
        true_spread = (spread - (weight * torch.where(known, variance, 0.0)).sum() / total).clamp(min=0)
        self.reliability = torch.where(known, true_spread / (true_spread + variance).clamp(min=1e-30), 0.0).float()
        return (mean + self.reliability * (slope - mean)).float()

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {
            "sums": self.sums,
            "observations": self.observations,
            "shares": self.shares,
            "average": self.average,
            "preference": self.preference,
        }
