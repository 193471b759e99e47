"""CUDA graphs of a controller's ``observe()`` and ``step()`` (``Controller(..., graph=True)``).

Eagerly, one ``observe()`` + ``step()`` is some 25 small kernels, each a few
microseconds of host time to launch; captured, it is two graph replays plus
one copy per input. A graph replays fixed kernels on fixed memory, so:

- the controller's state lives in fixed buffers: the statistics table is
  updated in place, and whatever ``update()`` returns (weights, and the tensors
  of ``extra_state()``) is copied back into the buffers inside the graph;
- inputs are copied into fixed buffers, one set (and one graph) per distinct
  shape and dtype of the inputs;
- numbers that change with the step (``Controller.schedule()``) are written
  into device scalars before each replay, and each Python branch of
  ``update()`` (``Controller.phase()``) gets its own graph.

Capturing runs the code once on a side stream first (lazy kernel loading,
the allocator), then restores the state: a capture has no effect on the
values. ``torch.cuda.graph`` synchronises, so the first call for each shape
and phase does too; later ones never do.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, Protocol

import torch

from onlinemix.mixing.epochs import EpochCount
from onlinemix.mixing.stats import DomainStats


class Graphable(Protocol):
    """What ``ControllerGraphs`` reads and calls of a controller (every ``Controller`` is one)."""

    device: torch.device
    weights: torch.Tensor
    epochs: EpochCount
    steps: int
    now: dict[str, Any]
    stats: DomainStats

    def record(self, losses: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor | None = None, **signals):
        """Accumulate one batch's feedback (captured as the observation graph)."""

    def next_weights(self) -> torch.Tensor:
        """The update, floor and checks of one step (captured as a step graph per phase)."""

    def schedule(self, step: int) -> dict[str, float]:
        """The step's numbers, written into device scalars before a replay."""

    def phase(self) -> Hashable:
        """Which Python branch the update takes: one graph each."""

    def extra_state(self) -> dict[str, torch.Tensor]:
        """The tensors the update carries from step to step: copied back into fixed buffers."""


class ControllerGraphs:
    """A controller's ``observe`` and ``step`` captured as CUDA graphs and replayed (``graph=True``)."""

    def __init__(self, controller: Graphable):
        self.controller = controller
        self.pool = torch.cuda.graph_pool_handle()
        self.observers: dict[Hashable, tuple[torch.cuda.CUDAGraph, dict[str, torch.Tensor]]] = {}
        self.steppers: dict[Hashable, torch.cuda.CUDAGraph] = {}
        self.scalars: dict[str, torch.Tensor] = {}
        # Own buffers, so that nothing a caller holds (the initial weights, a loaded state) is written by a replay.
        controller.weights = controller.weights.clone()
        for name, value in controller.extra_state().items():
            setattr(controller, name, value.clone())

    def observe(self, losses: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor | None, signals: dict) -> None:
        """Copy one batch's feedback into the graph's inputs and replay the observation."""
        inputs = {"losses": losses, "domains": domains, "mask": mask, **signals}
        inputs = {name: value for name, value in inputs.items() if value is not None}
        for name, value in inputs.items():
            if value.device != self.controller.device:
                raise ValueError(f"{name} is on {value.device}; a graphed controller needs its inputs on its device")
        key = tuple((name, tuple(value.shape), value.dtype) for name, value in inputs.items())
        if key not in self.observers:
            static = {name: value.detach().clone() for name, value in inputs.items()}
            self.observers[key] = (self._capture(lambda: self.controller.record(**static)), static)
        graph, static = self.observers[key]
        for name, value in inputs.items():
            static[name].copy_(value.detach())
        graph.replay()

    def step(self) -> None:
        """Replay ``update()`` for ``controller.steps`` (already counted)."""
        controller = self.controller
        now = controller.schedule(controller.steps)
        for name, value in now.items():
            if name not in self.scalars:
                self.scalars[name] = torch.zeros((), device=controller.device)
            self.scalars[name].fill_(value)
        key = (controller.phase(), tuple(now))
        if key not in self.steppers:
            controller.now = self.scalars
            self.steppers[key] = self._capture(self._update_in_place)
        self.steppers[key].replay()

    def _update_in_place(self) -> None:
        controller = self.controller
        buffers = {"weights": controller.weights, **controller.extra_state()}
        updated = {"weights": controller.next_weights(), **controller.extra_state()}
        for name, buffer in buffers.items():
            if updated[name] is not buffer:
                buffer.copy_(updated[name])
                setattr(controller, name, buffer)

    def _capture(self, run: Callable[[], None]) -> torch.cuda.CUDAGraph:
        controller = self.controller
        state = [controller.stats.table, controller.weights, controller.epochs.drawn]
        state += list(controller.extra_state().values())
        saved = [tensor.clone() for tensor in state]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()  # warm-up, then undone
        torch.cuda.current_stream().wait_stream(side)
        for tensor, value in zip(state, saved):
            tensor.copy_(value)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            run()
        return graph
