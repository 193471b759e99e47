"""Online mixing inside a PyTorch Lightning ``Trainer``: one ``Callback``.

Your ``LightningModule.training_step`` returns the per-sample losses next to
the loss it optimises; the callback does the rest::

    def training_step(self, batch, batch_idx):
        losses = per_sample_loss(self(batch["input_ids"]), batch["labels"])
        return {"loss": losses.mean(), "losses": losses.detach()}

    mixing = OnlineMixing.from_config("mixture.yaml", controller="odm")
    callback = OnlineMixingCallback(mixing)
    trainer = L.Trainer(max_steps=1000, callbacks=[callback], accumulate_grad_batches=1)
    trainer.fit(module, train_dataloaders=callback.train_dataloader())   # ckpt_path=... resumes

- ``on_train_batch_end`` observes every (micro-)batch and steps the mixer
  once per optimizer step (when ``trainer.global_step`` moves), so gradient
  accumulation gives one update per step; build the mixer with
  ``accumulation=accumulate_grad_batches``.
- The callback's ``state_dict`` (saved in every Lightning checkpoint) holds
  the loader position, the controller and the channel. Lightning fetches one
  batch ahead of the one it trains on, so the position saved is the batch
  after the last one *trained*, and the mixer needs ``lag >= 2`` (the
  prefetched batch must not wait for the step still running).
- At each of Lightning's logging steps (``log_every_n_steps``) the callback logs ``mixing.metrics()``
  through ``pl_module.log_dict`` (``mixing/weight/<domain>``, ``mixing/loss/<domain>``, ...), so they reach
  the Trainer's loggers (TensorBoard, W&B, CSV, ...). Lightning writes a step's figures under the step before
  it (its ``global_step`` counts steps begun): ``mixing/version`` says which weights they are.
- ``train_dataloader()`` hands Lightning the loader without its own
  ``state_dict``: Lightning would checkpoint the fetched position, one batch
  too far.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning.pytorch as pl
import torch

from onlinemix.mixing.training import OnlineMixing


class _Batches:
    """The loader as a plain iterable (no ``state_dict``: the callback owns the position)."""

    def __init__(self, mixing: OnlineMixing):
        self.mixing = mixing

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.mixing.loader)


class OnlineMixingCallback(pl.Callback):
    """Feeds ``outputs[losses_key]`` of each training step to the mixer; checkpoints the mixture.

    Args:
        mixing: the ``OnlineMixing`` whose loader ``train_dataloader()`` serves.
        losses_key: the key of the per-sample losses in ``training_step``'s output.
    """

    def __init__(self, mixing: OnlineMixing, losses_key: str = "losses"):
        if mixing.mixer.lag < 2:
            raise ValueError(
                f"lag is {mixing.mixer.lag}; Lightning fetches the next batch before the current step ends, "
                "so its weights must be at least 2 steps old (build the mixer with lag >= 2)"
            )
        self.mixing = mixing
        self.losses_key = losses_key
        self._next_batch = mixing.loader.position.batch  # the next batch to train on
        self._steps = None  # trainer.global_step at the last mixer step

    def train_dataloader(self) -> _Batches:
        """The loader to pass to ``trainer.fit(train_dataloaders=...)`` (without a ``state_dict`` of its own)."""
        return _Batches(self.mixing)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mixing.check_accumulation(trainer.accumulate_grad_batches, "accumulate_grad_batches")
        self._steps = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if not isinstance(outputs, dict) or self.losses_key not in outputs:
            raise KeyError(
                f"training_step must return a dict with the per-sample losses under {self.losses_key!r} "
                "(e.g. {'loss': losses.mean(), 'losses': losses.detach()})"
            )
        self.mixing.observe(outputs[self.losses_key], batch)
        self._next_batch += 1
        if trainer.global_step != self._steps:  # the optimizer stepped after this batch
            self._steps = trainer.global_step
            self.mixing.step()
            if trainer.log_every_n_steps and trainer.global_step % trainer.log_every_n_steps == 0:
                pl_module.log_dict(self.mixing.metrics(), on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.mixing.mixer.flush()

    def state_dict(self) -> dict[str, Any]:
        return self.mixing.state_dict(batch=self._next_batch)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.mixing.load_state_dict(state_dict)
        self._next_batch = self.mixing.loader.position.batch
