"""What every controller is: weights on the device, ``observe()`` feedback, ``step()`` an update.

``observe()`` and ``step()`` never synchronise with the host: no ``.item()``,
``.cpu()``, ``.tolist()``, no branch on a tensor value. Counters that decide
control flow (the step number) are Python ints.
"""

from __future__ import annotations

from typing import Any

import torch

from mixing.stats import DomainStats


class Controller:
    """Base class. Subclasses implement ``update()``; ``step()`` applies the probability floor.

    Args:
        initial: the starting weights (k,), non-negative, summing to 1.
        min_prob: every weight stays at least this (mixed with the uniform
            distribution: ``w <- (1 - k * min_prob) * w + min_prob``).
        device: where the weights and statistics live (the training device).
        compile: ``torch.compile`` the per-batch accumulation (``True``, or a
            backend name). Measured in ``benchmarks/controller_step.py``: on
            a CPU it barely helps; on a GPU it fuses ~15 small kernels into one.
    """

    name = "base"

    def __init__(
        self,
        initial: torch.Tensor,
        min_prob: float = 0.0,
        device: torch.device | str | None = None,
        compile: bool | str = False,
    ):
        initial = torch.as_tensor(initial, dtype=torch.float32, device=device)
        self.num_domains = initial.numel()
        if not 0 <= min_prob * self.num_domains < 1:
            raise ValueError(f"min_prob {min_prob} x {self.num_domains} domains must be in [0, 1)")
        self.min_prob = min_prob
        self.device = initial.device
        self.initial = initial / initial.sum()
        self.weights = self.floor(self.initial)
        self.stats = DomainStats(self.num_domains, self.device, compile=compile)
        self.steps = 0

    def floor(self, weights: torch.Tensor) -> torch.Tensor:
        return (1 - self.num_domains * self.min_prob) * weights + self.min_prob

    def observe(self, losses: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor | None = None, **_: Any) -> None:
        """Record per-sample (or per-token, with ``mask``) training losses of a (micro-)batch."""
        self.stats.add(losses, domains, mask)

    def update(self) -> torch.Tensor:
        """New weights (before the floor) from what was observed since the last step."""
        raise NotImplementedError

    def step(self) -> torch.Tensor:
        """One update per optimizer step; returns the new weights (on the device)."""
        self.steps += 1
        self.weights = self.floor(self.update())
        return self.weights

    def extra_state(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "steps": self.steps,
            "weights": self.weights.detach().clone(),
            "problems": self.stats.problems.clone(),
            **{key: value.detach().clone() for key, value in self.extra_state().items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["name"] != self.name:
            raise ValueError(f"state is for controller {state['name']!r}, this one is {self.name!r}")
        self.steps = int(state["steps"])
        self.weights = state["weights"].to(self.device)
        self.stats.problems = state["problems"].to(self.device)
        for key in self.extra_state():
            setattr(self, key, state[key].to(self.device))
