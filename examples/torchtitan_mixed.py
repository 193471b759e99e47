"""Online mixing in torchtitan: a ``config_registry`` module whose trainer draws its batches from a mixture file.

torchtitan (0.3) builds a run from a config function named on its command line. This module's
``llama3_mixed`` is llama3's debug model with onlinemix's data loader and trainer::

    torchrun --nproc_per_node 8 -m torchtitan.train --module examples.torchtitan_mixed --config llama3_mixed

(from the repository root; ``ONLINEMIX_MIXTURE`` names the mixture file, default ``mixture.yaml``).
``MixingDataLoader`` checks the trainer's ``training.seq_len``, ``training.local_batch_size`` and tokenizer
against the mixture; this config takes the first two from the mixture file (its ``seq_len``, its
``global_batch_size`` over ``$WORLD_SIZE`` ranks). The tokenizer must be the model's: llama3-debug's
vocabulary has 2,048 ids, so byte tokens (258 ids) fit it. torchtitan's ``Trainer`` needs an accelerator:
on a CPU machine, build and iterate the data loader alone (``tests/test_examples.py`` does).
"""

from __future__ import annotations

import dataclasses
import os

from onlinemix import MixtureConfig
from onlinemix.mixing.integrations.torchtitan import MixingDataLoader, MixingTrainer


# --8<-- [start:config]
def llama3_mixed() -> MixingTrainer.Config:
    """llama3's debug model, trained on ``$ONLINEMIX_MIXTURE`` with the ODM controller."""
    from torchtitan.models.llama3.config_registry import llama3_debugmodel

    base = llama3_debugmodel()
    config = MixingTrainer.Config(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base) if f.init})
    mixture = os.environ.get("ONLINEMIX_MIXTURE", "mixture.yaml")
    config.dataloader = MixingDataLoader.Config(mixture=mixture, controller="odm")
    # The trainer's batch shape is the mixture's: its seq_len, and its global batch over the ranks (torchrun
    # sets WORLD_SIZE; every rank data-parallel here). llama3-debug's own (2048, 8) would not match.
    batch = MixtureConfig.load(mixture)
    config.training.seq_len = batch.seq_len
    config.training.local_batch_size = batch.global_batch_size // int(os.environ.get("WORLD_SIZE", "1"))
    return config
    # --8<-- [end:config]
