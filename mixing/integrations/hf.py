"""Online mixing inside the Hugging Face ``Trainer``.

The Trainer hands callbacks no per-sample loss, builds its own DataLoader and
resumes by skipping batches. ``OnlineMixingMixin`` fills those gaps:

- ``get_train_dataloader()`` returns the mixture's ``MixedLoader`` (which
  shards by rank itself and resumes by position, never by skipping);
- ``compute_loss()`` computes the per-sample loss from the model's logits and
  the loader's ``labels`` (already the next tokens, so the model is not given
  ``labels`` and does not shift them again), feeds it to the mixer and returns
  the mean;
- ``train(resume_from_checkpoint=...)`` restores the mixture's state from the
  checkpoint folder before the Trainer restores its own.

``OnlineMixingCallback`` (added by the mixin) steps the mixer once per
optimizer step, after the gradient-accumulation micro-batches, and saves
the mixture's state into every checkpoint folder. ``MixingTrainer`` is the
mixin on the stock ``Trainer``::

    mixing = OnlineMixing.from_config("mixture.yaml", controller="odm", accumulation=2, device="cuda")
    args = TrainingArguments("runs/hf", max_steps=1000, gradient_accumulation_steps=2, save_steps=100)
    trainer = MixingTrainer(model=model, args=args, mixing=mixing)
    trainer.train()                                   # or train(resume_from_checkpoint=True)

Requirements: ``max_steps`` set (the stream has no length),
``gradient_accumulation_steps`` equal to the mixer's ``accumulation``,
``per_device_train_batch_size`` is ignored (the mixture file's
``global_batch_size`` decides). A model returning ``.logits`` for
``input_ids`` works as is; override ``mixing_signals()`` to add per-sample
signals (e.g. DoReMi's ``reference`` losses).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from onlinemix.mixing.training import OnlineMixing, per_sample_loss
from transformers import Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

STATE_FILE = "onlinemix.pt"  # the mixture's state, inside each checkpoint-N folder


class OnlineMixingCallback(TrainerCallback):
    """Steps the mixer after each optimizer step and saves its state with each checkpoint."""

    def __init__(self, mixing: OnlineMixing):
        self.mixing = mixing

    def on_step_end(self, args, state, control, **kwargs):
        self.mixing.step()

    def on_save(self, args, state, control, **kwargs):
        state_dict = self.mixing.state_dict()  # every rank: it flushes pending publications
        if state.is_world_process_zero:  # the mixture's state is the same on every rank
            folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
            torch.save(state_dict, folder / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        self.mixing.mixer.flush()


class OnlineMixingMixin:
    """Mix into a ``Trainer`` (or a subclass such as TRL's) to train on an online mixture.

    ``mixing``: the ``OnlineMixing`` to train on. Every other argument is the
    Trainer's own.
    """

    def __init__(self, *args: Any, mixing: OnlineMixing, **kwargs: Any):
        kwargs.setdefault("train_dataset", mixing.dataset)
        super().__init__(*args, **kwargs)
        self.mixing = mixing
        mixing.check_accumulation(self.args.gradient_accumulation_steps, "gradient_accumulation_steps")
        if self.args.max_steps <= 0:
            raise ValueError("set TrainingArguments(max_steps=...): a mixture stream has no length to count epochs by")
        # The loader resumes at its checkpointed position; skipping batches would consume them twice.
        self.args.ignore_data_skip = True
        # compute_loss returns a per-micro-batch mean, so let the Trainer divide by the accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.add_callback(OnlineMixingCallback(mixing))

    def get_train_dataloader(self):
        return self.mixing.loader

    def mixing_signals(self, model, inputs: dict[str, torch.Tensor], losses: torch.Tensor) -> dict[str, torch.Tensor]:
        """Extra per-sample signals for the controller (e.g. ``{"reference": ...}`` for DoReMi); none by default."""
        return {}

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        batch = {"domain": inputs.pop("domain")}
        inputs.pop("index", None)
        labels = inputs.pop("labels")
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, dict) else outputs[0]
        losses = per_sample_loss(logits, labels)
        if model.training:
            self.mixing.observe(losses, batch, **self.mixing_signals(model, {**inputs, "labels": labels}, losses))
        loss = losses.mean()
        return (loss, outputs) if return_outputs else loss

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs: Any):
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
