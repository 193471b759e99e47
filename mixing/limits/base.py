"""What a limit is: a map from the weights a controller proposes to the weights a run may draw with.

A controller is its update rule plus an ordered list of limits (``Controller.limits``). Each step the update
proposes weights; the controller checks that they are a distribution (a NaN, negative or all-zero vector is
rejected before any limit sees it, so that no limit can turn it into one), then passes them through every
limit in order. A limit:

- ``bind``s to the controller's starting weights and its epoch count once, when the controller is built;
- maps weights to allowed ones in ``__call__``, on the device, without a host sync (no ``.item()``, no branch
  on a tensor value): a captured CUDA graph replays it;
- keeps whatever state it needs in tensors it updates in place (a graph reads the same buffers), and hands
  them to the controller's ``state_dict`` under names of its own.

Write your own by subclassing ``Limit`` and pass it in ``Controller(..., limits=[...])``.
"""

from __future__ import annotations

from typing import Any

import torch

from onlinemix.mixing.epochs import EpochCount


class Limit:
    """Base class: the identity map. Subclasses override ``__call__`` (and ``bind``, the state methods, ``start``
    and ``observe_heldout`` where they need them)."""

    name = "limit"  # how errors and descriptions name it

    def bind(self, initial: torch.Tensor, epochs: EpochCount) -> None:
        """Take the controller's starting weights (a distribution on its device) and its epoch count (which the
        mixer configures later, once it knows the run)."""
        self.initial, self.epochs = initial, epochs

    def __call__(self, weights: torch.Tensor) -> torch.Tensor:
        """The allowed weights for a proposal (a distribution, possibly unnormalised by a limit before)."""
        return weights

    def start(self, weights: torch.Tensor) -> torch.Tensor:
        """The starting weights as the controller publishes them (most limits allow them as they are)."""
        return weights

    def observe_heldout(self, losses: torch.Tensor, weights: torch.Tensor) -> None:
        """Each domain's held-out loss (NaN where not measured) and the weights in force; most limits ignore it."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The tensors this limit carries from step to step, by names unique among a controller's state."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` gave (``state`` is the controller's whole state: pick your own names)."""

    def describe(self) -> str:
        """One line for logs and errors."""
        return self.name

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"
