"""Online mixing inside the Hugging Face ``Trainer`` (and ``accelerate``).

The Trainer hands callbacks no per-sample loss, builds its own DataLoader and resumes by skipping
batches. ``OnlineMixingMixin`` fills those gaps, by the Trainer's own conventions:

- ``get_train_dataloader()`` returns the mixture's ``MixedLoader`` (which shards by rank itself and
  resumes by position, never by skipping); ``per_device_train_batch_size`` is set to the batches it
  hands out, so the logged throughput and epochs are true;
- ``compute_loss()`` returns **the model's own loss** (auxiliary losses such as a mixture-of-experts
  router's included), computed against the loader's ``labels`` as they are (already the next tokens:
  passed as ``shift_labels``, so the model does not shift them again), and feeds the mixer each
  sample's loss alongside. A batch without ``domain`` (an ordinary ``eval_dataset``) goes through the
  Trainer's own ``compute_loss``;
- ``train(resume_from_checkpoint=...)`` restores the mixture's state from the checkpoint folder
  before the Trainer restores its own (the schedule log travels in it: a checkpoint folder copied
  elsewhere resumes on its own), and the logged ``epoch`` continues where it was: a stream's epoch is the
  samples drawn so far over the mixture's samples (every domain's), so it never goes back, also when a run is
  extended by resuming it with a larger ``max_steps``. The loader draws
  nothing from the global random generators, so a resumed run is bit for bit the uninterrupted one,
  dropout included.

``OnlineMixingCallback`` (added by the mixin) steps the mixer once per optimizer step, after the
gradient-accumulation micro-batches, and saves the mixture's state into every checkpoint folder
(atomically). Every training log (each ``logging_steps``) carries ``mixing.metrics()`` (``mixing/weight/<domain>``,
``mixing/loss/<domain>``, ...), so they reach whatever ``report_to`` names (TensorBoard, W&B, trackio, MLflow); the
Trainer's own loggers put them under ``train/``. ``MixingTrainer`` is the mixin on the stock ``Trainer``::

    mixing = OnlineMixing.from_config("mixture.yaml", controller="odm", accumulation=2, device="cuda")
    args = TrainingArguments("runs/hf", max_steps=1000, gradient_accumulation_steps=2, save_steps=100)
    trainer = MixingTrainer(model=model, args=args, mixing=mixing, eval_dataset=heldout)
    trainer.train()                                   # or train(resume_from_checkpoint=True)

Requirements: ``max_steps`` set (a stream has no epochs to count), ``gradient_accumulation_steps``
equal to the mixer's ``accumulation``. A model that takes ``input_ids`` and ``labels`` and returns
``loss`` and ``logits`` works as is; override ``mixing_signals()`` to add per-sample signals (e.g.
DoReMi's ``reference`` losses).

**accelerate** without the Trainer: prepare the model and optimizer, and iterate the ``MixedLoader``
(``accelerator.prepare(loader)`` returns it as it is: it is not a ``DataLoader``). Preparing a
``DataLoader(MixedDataset, ...)`` would make accelerate split the rank's batches once more; the
dataset detects that and says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from onlinemix.loaders.atomic import save_checkpoint
from onlinemix.mixing.training import OnlineMixing, per_sample_loss

STATE_FILE = "onlinemix.pt"  # the mixture's state, inside each checkpoint-N folder
STREAM_FIELDS = ("domain", "index", "importance", "reads")  # what the loader adds to the model's inputs
log = logging.getLogger("onlinemix")


class OnlineMixingCallback(TrainerCallback):
    """Steps the mixer after each optimizer step and saves its state with each checkpoint."""

    def __init__(self, mixing: OnlineMixing):
        self.mixing = mixing

    def on_train_begin(self, args, state, control, **kwargs):
        # A stream's epoch: the samples drawn over the mixture's samples (a fraction of max_steps would go back
        # when a resumed run is given more steps; the Trainer's own figure restarts at a resume: it skips no batch).
        spec = self.mixing.dataset.spec
        self.samples_per_step = spec.global_batch_size * args.gradient_accumulation_steps
        self.mixture_samples = int(sum(int(size) for size in spec.sizes))

    def on_step_end(self, args, state, control, **kwargs):
        self.mixing.step()
        state.epoch = state.global_step * self.samples_per_step / self.mixture_samples  # before logging

    def on_save(self, args, state, control, **kwargs):
        state_dict = self.mixing.state_dict()  # every rank: it flushes pending publications
        if state.is_world_process_zero:  # the mixture's state is the same on every rank
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            save_checkpoint(state_dict, folder / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        self.mixing.mixer.flush()


class OnlineMixingMixin:
    """Mix into a ``Trainer`` (or a subclass such as TRL's) to train on an online mixture.

    ``mixing``: the ``OnlineMixing`` to train on. Every other argument is the Trainer's own.
    """

    def __init__(self, *args: Any, mixing: OnlineMixing, **kwargs: Any):
        kwargs.setdefault("train_dataset", mixing.dataset)
        super().__init__(*args, **kwargs)
        self.mixing = mixing
        mixing.check_accumulation(self.args.gradient_accumulation_steps, "gradient_accumulation_steps")
        if self.args.max_steps <= 0:
            raise ValueError("set TrainingArguments(max_steps=...): a mixture stream has no length to count epochs by")
        per_rank = mixing.batch_size
        if self.args.per_device_train_batch_size not in (8, per_rank):  # 8: the Trainer's default, not a choice
            raise ValueError(
                f"per_device_train_batch_size is {self.args.per_device_train_batch_size}, but the mixture hands out "
                f"batches of {per_rank} samples per rank (global_batch_size / world size): set it to {per_rank} or "
                "leave it out"
            )
        self.args.per_device_train_batch_size = per_rank  # so that the logged samples per second are true
        # The loader resumes at its checkpointed position; skipping batches would consume them twice.
        self.args.ignore_data_skip = True
        # compute_loss returns a per-micro-batch mean, so let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self._shift_labels = True  # the model takes shift_labels (transformers >= 4.46); else aligned labels
        self.add_callback(OnlineMixingCallback(mixing))

    def get_train_dataloader(self):
        """The mixture's ``MixedLoader`` (it shards by rank itself), in place of the Trainer's."""
        return self.mixing.loader

    def mixing_signals(self, model, inputs: dict[str, torch.Tensor], losses: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-sample signals for the controller (e.g. ``{"reference": ...}`` for DoReMi); none by default."""
        return {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The model's own loss; each sample's loss goes to the mixer alongside (see the module docstring)."""
        if "domain" not in inputs:  # an ordinary batch (an eval_dataset, say): the Trainer's own loss
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs = dict(inputs)
        stream = {key: inputs.pop(key) for key in STREAM_FIELDS if key in inputs}
        labels = inputs["labels"]
        outputs = self._forward(model, inputs, labels)
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs[0]
        if model.training:
            logits = outputs["logits"] if isinstance(outputs, dict) else outputs[1]
            losses = per_sample_loss(logits.detach(), labels)
            self.mixing.observe(losses, stream, **self.mixing_signals(model, inputs, losses))
        return (loss, outputs) if return_outputs else loss

    def _forward(self, model, inputs: dict[str, torch.Tensor], labels: torch.Tensor):
        """The model's outputs with its own loss over the loader's labels (the next token of each position)."""
        if self._shift_labels:
            try:
                return model(**inputs, shift_labels=labels)
            except TypeError as error:
                if "shift_labels" not in str(error):
                    raise
                self._shift_labels = False
                log.warning(
                    "%s takes no shift_labels: its loss leaves out each sample's last label (it shifts labels "
                    "aligned with input_ids itself)",
                    type(model).__name__,
                )
        aligned = torch.cat([inputs["input_ids"][:, :1], labels[:, :-1]], dim=1)  # labels[t] = input_ids[t]
        return model(**{**inputs, "labels": aligned})

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's ``log``, with ``mixing_metrics()`` added to each training log (the ones with ``loss``)."""
        if "loss" in logs:
            logs = {**logs, **self.mixing_metrics()}
        super().log(logs, *args, **kwargs)

    def mixing_metrics(self) -> dict[str, float]:
        """The mixture's figures each training log carries: all of ``mixing.metrics()``. Override to keep fewer
        (the Trainer also prints every log: with hundreds of domains, the weights alone may be enough)."""
        return self.mixing.metrics()

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
        """``Trainer.train``, restoring the mixture's state from ``resume_from_checkpoint`` first."""
        if resume_from_checkpoint:
            folder = resume_from_checkpoint
            if folder is True:
                folder = get_last_checkpoint(self.args.output_dir)
                if folder is None:
                    raise ValueError(f"no checkpoint found in {self.args.output_dir} to resume from")
            path = Path(folder) / STATE_FILE
            if not path.exists():
                raise FileNotFoundError(f"{path} is missing: {folder} was not saved by an OnlineMixingCallback")
            self.mixing.load_state_dict(torch.load(path, weights_only=False))
            resume_from_checkpoint = str(folder)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)


class MixingTrainer(OnlineMixingMixin, Trainer):
    """The stock ``Trainer`` with ``OnlineMixingMixin``: ``MixingTrainer(model=..., args=..., mixing=...)``."""
