"""Online mixing in torchtitan: a data loader and checkpoint state by its protocols, per-sample loss feedback.

torchtitan's data documentation leaves "automatic adjustment" of mixture weights to a custom mix; this is
one. Its trainer reads ``(input_dict, labels)`` pairs from ``trainer.dataloader``, saves
``dataloader.state_dict()`` with ``torch.distributed.checkpoint`` (each rank its own key), computes the
loss with ``trainer.loss_fn(pred, labels, global_valid_tokens)`` once per micro-batch and steps
``trainer.optimizers`` once per step. ``attach(trainer, mixing)`` plugs into those four places::

    from onlinemix import OnlineMixing
    from onlinemix.mixing.integrations.torchtitan import attach

    class MixedTrainer(torchtitan.trainer.Trainer):
        def __init__(self, config):
            super().__init__(config)
            mixing = OnlineMixing.from_config("mixture.yaml", device=self.device,
                                              accumulation=self.gradient_accumulation_steps)
            attach(self, mixing)

- ``MixingDataLoader`` (torchtitan's ``BaseDataLoader``: ``Stateful``) yields ``({"input": input_ids},
  labels)``; its ``state_dict()`` is the loader position, the controller and the channel, under this
  data-parallel rank's key (as torchtitan's own ``ParallelAwareDataloader`` does);
- ``MixingLoss`` wraps the trainer's loss function: it returns that loss unchanged and feeds the mixer
  each sample's mean token loss, with the domains of the micro-batch it belongs to;
- the mixer steps after every optimizer step (a hook on ``trainer.optimizers.step``).

Every rank runs a mixer over its own slice of each global batch (rank and world size from
``torch.distributed``); the mixer all-reduces the statistics, so every rank publishes the same weights.
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.distributed.checkpoint.stateful import Stateful

from onlinemix.mixing.training import OnlineMixing, per_sample_loss

IGNORE_INDEX = -100


class MixingDataLoader(Stateful):
    """An ``OnlineMixing`` as a torchtitan data loader: ``({"input": ids}, labels)`` pairs, ``Stateful``.

    The domains of each micro-batch handed out wait in ``pending`` until ``MixingLoss`` meets its
    loss (torchtitan fetches a step's micro-batches, then runs them in the same order).
    """

    def __init__(self, mixing: OnlineMixing):
        self.mixing = mixing
        self.pending: collections.deque[dict[str, torch.Tensor]] = collections.deque()
        self._key = f"dp_rank_{mixing.dataset.rank}"

    def __iter__(self) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        for batch in self.mixing:
            self.pending.append({key: batch[key] for key in ("domain", "importance") if key in batch})
            yield {"input": batch["input_ids"]}, batch["labels"]

    def state_dict(self) -> dict[str, Any]:
        """This rank's mixing state (loader position, controller, channel), pickled as torchtitan's loader does:
        ``torch.distributed.checkpoint`` stores it as bytes under the rank's own key."""
        if self.pending:
            raise RuntimeError(
                f"{len(self.pending)} micro-batch(es) were handed out but their loss was never seen: checkpoint "
                "between optimizer steps"
            )
        return {self._key: pickle.dumps(self.mixing.state_dict()), "world_size": self.mixing.dataset.world_size}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return  # torchtitan loads an empty state for a fresh run
        if self._key not in state_dict:
            raise KeyError(f"no mixing state for {self._key} in the checkpoint (it holds {sorted(state_dict)})")
        self.mixing.load_state_dict(pickle.loads(state_dict[self._key]))
        self.pending.clear()


class MixingLoss:
    """A torchtitan loss function that also feeds the mixer each sample's loss (on the device, no host sync).

    ``loss_fn(pred, labels, *args, **kwargs)`` is called and returned as it is; the per-sample mean of the
    token losses over the labels that are not ``IGNORE_INDEX`` goes to ``mixing.observe`` with the domains
    of the oldest micro-batch ``loader`` handed out.
    """

    def __init__(self, loss_fn: Callable[..., Any], loader: MixingDataLoader):
        self.loss_fn, self.loader = loss_fn, loader

    def __call__(self, pred: torch.Tensor, labels: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        result = self.loss_fn(pred, labels, *args, **kwargs)
        if not self.loader.pending:
            raise RuntimeError("a loss was computed for a micro-batch the MixingDataLoader did not hand out")
        batch = self.loader.pending.popleft()
        with torch.no_grad():
            losses = per_sample_loss(pred.detach(), labels, IGNORE_INDEX)
        self.loader.mixing.observe(losses, batch)
        return result

    def __getattr__(self, name: str) -> Any:  # set_lm_head and the like reach the wrapped loss
        return getattr(self.loss_fn, name)


def step_after(optimizers: Any, mixing: OnlineMixing) -> None:
    """Make ``optimizers.step()`` step ``mixing`` right after it (once per optimizer step)."""
    step = optimizers.step

    def step_then_mix(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        mixing.step()
        return result

    optimizers.step = step_then_mix


def attach(trainer: Any, mixing: OnlineMixing) -> MixingDataLoader:
    """Wire ``mixing`` into a torchtitan ``Trainer`` (after its ``__init__``): its data loader, its checkpoint's
    data-loader state, its loss function and its optimizer step. Returns the data loader."""
    mixing.check_accumulation(trainer.gradient_accumulation_steps, "the trainer's gradient accumulation steps")
    loader = MixingDataLoader(mixing)
    trainer.dataloader = loader
    trainer.checkpointer.states["dataloader"] = loader
    trainer.loss_fn = MixingLoss(trainer.loss_fn, loader)
    step_after(trainer.optimizers, mixing)
    return loader
