"""``OnlineMixing``: the mixture, its mixer and its loader in one object, for any training loop.

A nanoGPT-style script changes by a few lines::

    mixing = OnlineMixing.from_config("mixture.yaml", device="cuda", num_workers=2)
    for batch in mixing:                                  # a MixedLoader underneath
        logits = model(batch["input_ids"].to(device))
        losses = per_sample_loss(logits, batch["labels"].to(device))
        losses.mean().backward()
        mixing.observe(losses, batch)                     # on the device, no host sync
        optimizer.step(); optimizer.zero_grad()
        mixing.step()                                     # once per optimizer step
    checkpoint["mixing"] = mixing.state_dict()            # loader position + controller + channel

The controller comes from the config's ``mixing:`` section, or from keyword
arguments (``controller="odm", warmup=10``), or build an ``OnlineMixer``
yourself and pass it to ``OnlineMixing(mixer, ...)``.

With ``mixing: {coreset: {pool: k}}`` the loader draws pools of ``k`` times the file's batch size and
``select`` keeps the file's batch size of each (``MiniBatchCoreset``)::

    for pool in mixing:
        with torch.no_grad():
            proxies = output_gradients(model(pool["input_ids"]), pool["labels"])
        batch = mixing.select(pool, proxies)               # then train on batch as above
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.dataset import MixedDataset
from onlinemix.loaders.loader import MixedLoader
from onlinemix.loaders.state_digest import CheckpointError
from onlinemix.loaders.transforms import IGNORE_INDEX
from onlinemix.mixing.coreset import CoresetError, MiniBatchCoreset
from onlinemix.mixing.mixer import OnlineMixer
from onlinemix.mixing.settings import parse_mixing


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Each sample's mean next-token cross-entropy over its real tokens (``labels != ignore_index``).

    ``logits`` is ``(batch, positions, vocab)``, ``labels`` ``(batch, positions)``
    already aligned (the loader's ``labels`` are the next tokens). A sample with
    no real token gets loss 0. ``losses.mean()`` is the usual training loss when
    samples have equal lengths.
    """
    tokens = F.cross_entropy(logits.transpose(1, 2).float(), labels, ignore_index=ignore_index, reduction="none")
    real = (labels != ignore_index).sum(dim=1).clamp(min=1)
    return tokens.sum(dim=1) / real


class OnlineMixing:
    """A mixer and a ``MixedLoader`` over its dataset (created after the mixer, so workers get the channel).

    Args:
        mixer: an ``OnlineMixer`` wired to its dataset.
        coreset: a ``MiniBatchCoreset`` whose ``select`` keeps part of each batch (the loader's batches are
            then pools); ``None`` (default): train on every batch.
        **loader_options: ``MixedLoader``'s (``num_workers``, ``pin_memory``, ...).
    """

    def __init__(self, mixer: OnlineMixer, coreset: MiniBatchCoreset | None = None, **loader_options: Any):
        self.mixer = mixer
        self.dataset: MixedDataset = mixer.dataset
        self.coreset = coreset
        self.loader = MixedLoader(self.dataset, **loader_options)

    @classmethod
    def from_config(
        cls,
        config: MixtureConfig | str | Path,
        *,
        device: torch.device | str | None = None,
        num_workers: int = 0,
        dataset_options: Mapping[str, Any] | None = None,
        loader_options: Mapping[str, Any] | None = None,
        **mixing: Any,
    ) -> OnlineMixing:
        """Dataset, mixer and loader from a mixture file.

        ``mixing`` overrides the file's ``mixing:`` section: ``controller``,
        the mixer's keys (``lag``, ``accumulation``, ``log``, ...), the
        controller's knobs, and ``coreset: {pool: k}`` (the loader draws pools
        of ``k`` times the file's ``global_batch_size``; ``select`` keeps that
        batch size of each; ``coreset: None`` turns a file's off).
        ``dataset_options`` go to ``MixedDataset`` (``num_batches``, ``rank``,
        ``world_size``, ``replicas``), ``loader_options`` to ``MixedLoader``.
        """
        config = MixtureConfig.of(config)
        section = {**config.mixing, **mixing}
        pool = parse_mixing(section).pool  # the whole section checked before any data is opened
        section.pop("coreset", None)
        # The mixer's section is the rest; with a coreset, the plan's batches are the pools.
        config = dataclasses.replace(config, mixing=section, global_batch_size=config.global_batch_size * pool)
        dataset = MixedDataset.from_config(config, **(dataset_options or {}))
        mixer = OnlineMixer.from_config(config, dataset, device=device)
        coreset = MiniBatchCoreset.for_pools(dataset, pool) if pool > 1 else None
        if coreset is not None:
            _check_pool_fits(dataset, pool)
        return cls(mixer, coreset=coreset, num_workers=num_workers, **(loader_options or {}))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return iter(self.loader)

    def __len__(self) -> int:
        """Batches left, where known (``MixedLoader.__len__``)."""
        return len(self.loader)

    @property
    def batch_size(self) -> int:
        """Samples per batch on this rank."""
        return self.loader.batch_size

    @property
    def weights(self) -> torch.Tensor:
        """The controller's current weights (on its device)."""
        return self.mixer.controller.weights

    @property
    def names(self) -> list[str]:
        """The domains' names, in weight order."""
        return self.dataset.names

    def check_accumulation(self, accumulation: int, setting: str) -> None:
        """Raise unless a trainer's micro-batches per optimizer step (its ``setting``) equal the mixer's."""
        if accumulation != self.mixer.accumulation:
            raise ValueError(
                f"{setting} is {accumulation} but the mixer was built with accumulation={self.mixer.accumulation}; "
                "they must match (one weight update per optimizer step)"
            )

    def select(self, pool: Mapping[str, torch.Tensor], proxies: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The coreset of a pool the loader yielded, as the batch to train on (``MiniBatchCoreset.__call__``)."""
        if self.coreset is None:
            raise CoresetError("this mixing has no coreset: set mixing: {coreset: {pool: k}} in the mixture file")
        return self.coreset(pool, proxies)

    def observe(
        self, losses: torch.Tensor, batch: Mapping[str, torch.Tensor], mask: torch.Tensor | None = None, **signals: Any
    ) -> None:
        """Feed one (micro-)batch's per-sample (or, with ``mask``, per-token) losses; ``batch`` gives ``domain``.

        A batch with an ``importance`` field (importance inside the stream) passes it on as the
        ``importance`` signal, which controllers with ``importance_gain`` add to their feedback.
        """
        domains = batch["domain"].to(losses.device, non_blocking=True)
        if "importance" in batch and "importance" not in signals:
            signals["importance"] = batch["importance"].to(losses.device, torch.float32, non_blocking=True)
        self.mixer.observe(losses, domains, mask, **signals)

    def observe_heldout(self, losses: torch.Tensor) -> None:
        """Feed each domain's loss on held-out windows of its own (``(k,)``, in ``names`` order; NaN where not
        measured), every few steps: a domain whose held-out loss rises is being memorised, and the controller
        stops giving it more than its starting weight (``Controller.observe_heldout``)."""
        self.mixer.observe_heldout(losses)

    def step(self) -> torch.Tensor:
        """One weight update, after each optimizer step (not each micro-batch)."""
        return self.mixer.step()

    def metrics(self) -> dict[str, float]:
        """The mixture's figures for a dashboard (``mixing/weight/<domain>``, ``mixing/loss/<domain>``, ...; see
        ``mixing/metrics.py``), from the latest published weights: no host sync, so read it every few steps."""
        return self.mixer.metrics.read()

    def state_dict(self, batch: int | None = None) -> dict[str, Any]:
        """Loader position, controller and channel state.

        ``batch``: the next batch to train on, when the trainer fetched ahead
        of what it trained (default: right after the last batch handed out).
        """
        state = {"loader": self.loader.state_dict(batch), "mixer": self.mixer.state_dict()}
        if self.coreset is not None:
            state["coreset"] = self.coreset.state_dict()
        return state

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Resume from ``state_dict``: the loader's position, the controller, the channel and the coreset's record.
        Each part checks its digest first: a damaged checkpoint is a ``CheckpointError``, never another run."""
        if not isinstance(state, Mapping) or not {"loader", "mixer"} <= set(state) <= {"loader", "mixer", "coreset"}:
            keys = sorted(state) if isinstance(state, Mapping) else type(state).__name__
            raise CheckpointError(
                f"the mixing checkpoint is damaged or not one: it holds {keys}, not loader, mixer (and coreset)"
            )
        if ("coreset" in state) != (self.coreset is not None):
            which = ("a", "none") if "coreset" in state else ("no", "one")
            raise CoresetError(f"the checkpoint has {which[0]} coreset record and this mixing has {which[1]}")
        if self.coreset is not None:  # first: a checkpoint of other pools names the pool, not the batch size
            self.coreset.load_state_dict(state["coreset"])
        self.loader.load_state_dict(state["loader"])
        self.mixer.load_state_dict(state["mixer"])

    def close(self) -> None:
        """Publish what is pending and close the schedule log."""
        self.mixer.close()


def _check_pool_fits(dataset: MixedDataset, pool: int) -> None:
    """Refuse pools whose batch would not fit in this machine's memory (``pool: 1000000000`` would be a bare
    ``MemoryError`` at the first batch): input ids and labels, 8 bytes a token each."""
    tokens = dataset.local_batch_size * ((dataset.seq_len or 0) + 1)
    needed = 16 * tokens
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        return
    if needed > memory // 2:
        raise ConfigError(
            f"mixing.coreset.pool {pool}: a pool of {dataset.local_batch_size:,} samples is {needed / 1e9:,.1f} GB a "
            f"batch, more than half this machine's memory ({memory / 1e9:,.1f} GB): pools are a few batches (2-4)"
        )
