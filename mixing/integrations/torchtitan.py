"""Online mixing in torchtitan (0.3): a data loader built from its config, per-sample loss feedback.

torchtitan's data documentation leaves "automatic adjustment" of mixture weights to a custom mix; this is
one, by torchtitan's own conventions. Its components are ``Configurable``: a trainer config names the
data loader's ``Config``, and the trainer builds it with the data-parallel rank and world size, the
sequence length and the local batch size. Its trainer reads ``(input_dict, labels)`` pairs, saves
``dataloader.state_dict()`` with ``torch.distributed.checkpoint`` (each rank its own key), computes the loss
with ``trainer.loss_fn(pred, labels, global_valid_tokens)`` once per micro-batch and steps
``trainer.optimizers`` once per step. A ``config_registry`` function names onlinemix's pieces in a trainer
config (``examples/torchtitan_mixed.py`` is one)::

    config = MixingTrainer.Config(...)   # any Trainer.Config's fields
    config.dataloader = MixingDataLoader.Config(mixture="mixture.yaml", controller="odm")

    # torchrun ... -m torchtitan.train --module examples.torchtitan_mixed --config llama3_mixed

- ``MixingDataLoader`` (torchtitan's ``BaseDataLoader``: ``Stateful``, ``Configurable``) yields
  ``({"input": input_ids}, labels)``; it checks that the trainer's sequence length, local batch size and
  tokenizer match the mixture file; its ``state_dict()`` is the loader position, the controller and the
  channel, under this data-parallel rank's key (as torchtitan's own ``ParallelAwareDataloader`` does);
- ``MixingTrainer`` is torchtitan's ``Trainer`` plus ``attach``: ``MixingLoss`` wraps the trainer's loss
  function (its loss unchanged; each sample's mean token loss fed to the mixer with the domains of its
  micro-batch) and the mixer steps after every optimizer step; every training log of its
  ``metrics_processor`` carries ``mixing.metrics()`` (``mixing/weight/<domain>``, ``mixing/loss/<domain>``, ...)
  to its TensorBoard or W&B logger.

Every rank runs a mixer over its own slice of each global batch; the mixer all-reduces the statistics,
so every rank publishes the same weights. (torchtitan's ``Trainer`` needs an accelerator; the pieces here
are tested on CPU with two gloo ranks and ``torch.distributed.checkpoint``.)
"""

from __future__ import annotations

import collections
import pickle
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torchtitan.components.dataloader import BaseDataLoader
from torchtitan.tools import utils
from torchtitan.trainer import Trainer

from onlinemix.loaders.config import MixtureConfig
from onlinemix.mixing.training import OnlineMixing, per_sample_loss

IGNORE_INDEX = -100


class MixingDataLoader(BaseDataLoader):
    """An ``OnlineMixing`` as a torchtitan data loader: ``({"input": ids}, labels)`` pairs, ``Stateful``.

    Built by the trainer from ``MixingDataLoader.Config`` (or, outside a trainer, ``MixingDataLoader.of``
    an ``OnlineMixing``). The domains of each micro-batch handed out wait in ``pending`` until
    ``MixingLoss`` meets its loss (torchtitan fetches a step's micro-batches, then runs them in order).
    """

    @dataclass(kw_only=True, slots=True)
    class Config(BaseDataLoader.Config):
        mixture: str = ""
        """The mixture file (domains, seed, global batch size, seq_len, and its ``mixing:`` section)."""

        controller: str = ""
        """A controller overriding the mixture file's (``odm``, ``ado``, ...); empty: the file's."""

        num_workers: int = 2
        """DataLoader worker processes: speed only, never the order of the samples."""

        device: str = ""
        """Where the controller runs; empty: this process's accelerator (torchtitan's local device)."""

    def __init__(
        self,
        config: Config,
        *,
        dp_world_size: int,
        dp_rank: int,
        seq_len: int,
        local_batch_size: int,
        tokenizer: Any = None,
        **unused: Any,  # e.g. snapshot_every_n_steps: the position is exact at every step, no snapshots needed
    ):
        if not config.mixture:
            raise ValueError("MixingDataLoader.Config needs mixture= (the mixture file)")
        mixture = MixtureConfig.load(config.mixture)
        if mixture.seq_len != seq_len:  # before any data is opened or a device chosen
            raise ValueError(f"training.seq_len is {seq_len} but {config.mixture} has seq_len {mixture.seq_len}")
        mixing = OnlineMixing.from_config(
            mixture,
            device=config.device or utils.get_local_device(),
            num_workers=config.num_workers,
            dataset_options={"rank": dp_rank, "world_size": dp_world_size},
            **({"controller": config.controller} if config.controller else {}),
        )
        check_matches(mixing, config.mixture, local_batch_size, tokenizer)
        self._wrap(mixing)

    @classmethod
    def of(cls, mixing: OnlineMixing) -> MixingDataLoader:
        """A data loader over an ``OnlineMixing`` you built yourself."""
        loader = cls.__new__(cls)
        loader._wrap(mixing)
        return loader

    def _wrap(self, mixing: OnlineMixing) -> None:
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


def log_with(metrics_processor: Any, mixing: OnlineMixing) -> None:
    """Add ``mixing.metrics()`` to the ``extra_metrics`` of every ``metrics_processor.log`` (torchtitan's training
    log, every ``metrics.log_freq`` steps): the figures reach its loggers and read the host copy only."""
    log = metrics_processor.log

    def log_and_mix(*args: Any, extra_metrics: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        return log(*args, extra_metrics={**(extra_metrics or {}), **mixing.metrics()}, **kwargs)

    metrics_processor.log = log_and_mix


def check_matches(mixing: OnlineMixing, where: str, local_batch_size: int, tokenizer: Any) -> None:
    """The trainer's local batch size and tokenizer must be the mixture's (the file ``where``): an error names
    both."""
    if local_batch_size != mixing.batch_size:
        raise ValueError(
            f"training.local_batch_size is {local_batch_size} but {where}'s global_batch_size over "
            f"{mixing.dataset.world_size} data-parallel ranks gives {mixing.batch_size} samples per rank"
        )
    ours = mixing.dataset.tokenizer
    if tokenizer is not None and ours is not None and tokenizer.get_vocab_size() != ours.vocab_size:
        raise ValueError(
            f"the trainer's tokenizer has {tokenizer.get_vocab_size()} tokens; {where}'s ({ours.name}) has "
            f"{ours.vocab_size}: the mixture's token ids must be the model's"
        )


def attach(trainer: Any) -> MixingDataLoader:
    """Wire the trainer's ``MixingDataLoader`` into its loss function, its optimizer step and its training log
    (after the trainer's ``__init__``; ``MixingTrainer`` does it). Returns the data loader."""
    loader = trainer.dataloader
    if not isinstance(loader, MixingDataLoader):
        raise TypeError(
            f"the trainer's data loader is a {type(loader).__name__}: set config.dataloader = "
            "MixingDataLoader.Config(mixture=...)"
        )
    loader.mixing.check_accumulation(trainer.gradient_accumulation_steps, "the trainer's gradient accumulation steps")
    trainer.loss_fn = MixingLoss(trainer.loss_fn, loader)
    step_after(trainer.optimizers, loader.mixing)
    log_with(trainer.metrics_processor, loader.mixing)
    return loader


class MixingTrainer(Trainer):
    """torchtitan's ``Trainer`` with its ``MixingDataLoader`` wired into the loss and the optimizer step."""

    @dataclass(kw_only=True, slots=True)
    class Config(Trainer.Config):
        pass

    def __init__(self, config: Config):
        super().__init__(config)
        attach(self)
