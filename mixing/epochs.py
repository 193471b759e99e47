"""How many times over each domain the published weights have drawn it: one count, on the training device.

The controller adds every published weight vector (``EpochCount.add``, inside its step: no host sync); the
repeat budget (``limits/guard.py``) caps and holds domains by it, the mixer reads it back with the weights to
warn about a domain drawn far past its budget, and a CUDA graph of the step updates it in place.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class EpochCount:
    """Epochs drawn of each domain by the published weights, and what one step adds per unit of weight.

    ``configure`` tells it the run: samples per optimizer step, each domain's size in samples and, where known,
    the run's length in steps. Until then nothing is counted (a controller used without a dataset)."""

    def __init__(self, num_domains: int, device: torch.device):
        self.drawn = torch.zeros(num_domains, device=device)  # updated in place: a graphed step() reads it
        self.rate: torch.Tensor | None = None  # epochs a step adds per unit of weight: samples per step / size
        self.sizes: torch.Tensor | None = None  # each domain's size, in samples
        self.steps: int | None = None  # the run's length in optimizer steps, where known
        self.version = 0  # counts configure() calls, so that what is derived from the run can be cached

    def configure(self, samples_per_step: float, sizes: Sequence[int], steps: int | None = None) -> None:
        """The run: ``samples_per_step`` samples a step, each domain's size, and its length where known."""
        sizes = torch.as_tensor(list(sizes), dtype=torch.float32, device=self.drawn.device)
        if sizes.shape != self.drawn.shape or not (sizes > 0).all():
            raise ValueError(f"need {len(self.drawn)} domain sizes > 0, got {sizes.tolist()}")
        if steps is not None and not steps > 0:
            raise ValueError(f"steps must be > 0 (or None: not known), got {steps}")
        self.sizes, self.steps = sizes, steps
        self.rate = samples_per_step / sizes
        self.version += 1

    @property
    def configured(self) -> bool:
        """Whether the run is known (``configure`` was called)."""
        return self.rate is not None

    def add(self, weights: torch.Tensor) -> None:
        """Count one published weight vector (in place; nothing before ``configure``)."""
        if self.rate is not None:
            self.drawn.add_(weights * self.rate)

    def share_for(self, epochs: float) -> torch.Tensor | None:
        """The weight of each domain that draws it ``epochs`` times over the whole run (``None``: length unknown)."""
        if self.rate is None or self.steps is None:
            return None
        return epochs / (self.rate * self.steps)
