"""``OnlineMixer``: a controller wired to a loader through the weights channel, with a schedule log.

::

    dataset = MixedDataset.from_config("mixture.yaml")
    mixer = OnlineMixer(ODMController(initial), dataset, log="runs/schedule.oms")
    loader = MixedLoader(dataset, num_workers=2)
    for batch in loader:
        losses = per_sample_loss(model(batch["input_ids"]), batch["labels"])
        mixer.observe(losses, batch["domain"].to(device))     # on the device, no sync
        losses.mean().backward(); optimizer.step()
        mixer.step()                                          # update + publish version s

``step()`` runs the controller's update on the device and starts an
asynchronous copy of the new weights into pinned host memory; a background
thread waits for that copy (never the training stream), then publishes the
version to the workers and appends it to the log. On the CPU the copy is
immediate and so is the publication.

**Several ranks.** Every rank runs its own mixer and its own workers; the
sample order stays identical everywhere only if every rank publishes the same
weights. With ``torch.distributed`` initialised, ``sync="all_reduce"`` (the
default then) sums the per-domain statistics over the ranks before each
update, so every controller sees the global batch's statistics and computes
the same update (a collective on the device: with NCCL it does not block the
host). ``sync="broadcast"`` instead sends rank 0's weights to all (for
signals that only rank 0 has, e.g. a DGA alignment measured there). Every
``check_every`` steps the ranks compare their weights (an element-wise
all-reduce of max and min, O(k), independent of the number of ranks; one
host sync) and all raise ``MixingError`` naming the ranks that disagree.
"""

from __future__ import annotations

import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from onlinemix.loaders.atomic import atomic_write
from onlinemix.loaders.build import domain_features
from onlinemix.loaders.channel import DEFAULT_LAG, DEFAULT_TIMEOUT, VersionedSchedule, WeightsChannel
from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.dataset import MixedDataset
from onlinemix.loaders.plan import UNLIMITED
from onlinemix.loaders.state_digest import seal, unseal
from onlinemix.mixing.controllers.base import Controller, ControllerContext
from onlinemix.mixing.limits import MemorisationGuard
from onlinemix.mixing.metrics import MixingMetrics
from onlinemix.mixing.publisher import Publisher
from onlinemix.mixing.repeats import RepeatWatch
from onlinemix.mixing.schedule_log import ScheduleLogError, ScheduleWriter
from onlinemix.mixing.settings import check_mixer_options, parse_mixing
from onlinemix.mixing.stats import DomainStats

LOG_IN_CHECKPOINT = 64 << 20  # bytes: a schedule log up to this size travels in every checkpoint
logger = logging.getLogger("onlinemix")


class MixingError(RuntimeError):
    """Bad feedback reached the controller (non-finite losses with ``nonfinite="error"``, bad domain ids)."""


class OnlineMixer:
    """Drive ``dataset``'s weights from ``controller``.

    Args:
        lag: batch ``b`` is drawn with the weights published after step
            ``b // accumulation - lag``. Fixed for a run (it is part of the
            sample order); make it cover the DataLoader's prefetch depth
            (``prefetch_factor x num_workers`` batches) or workers will wait on training.
            The default, 16, covers 8 workers at the default prefetch; a smaller
            lag reacts sooner, a larger one plans more batches per call.
        accumulation: loader batches per optimizer step (gradient
            accumulation over micro-batches). ``observe()`` every micro-batch,
            ``step()`` once per optimizer step; all micro-batches of a step
            are drawn with the same weights. Part of the sample order, like ``lag``.
        log: where to record every published version (``None``: no log).
        nonfinite: ``"skip"`` counts NaN/inf losses, leaves them out and warns, and
            keeps the last good weights where an update gives no distribution (a
            NaN, negative or all-zero weight; warned at the 1st, 2nd, 4th... time);
            ``"error"`` raises ``MixingError`` at the next ``step()`` for either.
        timeout: seconds a worker waits for weights before it fails.
        sync: how ranks agree on the weights: ``"all_reduce"`` the statistics,
            ``"broadcast"`` rank 0's weights, or ``"none"``; ``"auto"`` is
            ``"all_reduce"`` when ``torch.distributed`` is initialised.
        group: the process group to agree within (default: all ranks).
        check_every: compare the weights across ranks every this many steps
            (``0``: never). Each check costs one host sync.
        repeat_warning: warn once when a domain without ``max_epochs`` has been
            drawn this many epochs over (``0``: never): a controller that keeps
            a small domain's weight high makes the model memorise it.
        steps: the run's length in optimizer steps, for the repeat budget's cap on each weight
            (``Controller.count_epochs``); default: the dataset's ``num_batches`` over ``accumulation``,
            none for an endless dataset (then the budget only holds a domain once it is spent).
    """

    def __init__(
        self,
        controller: Controller,
        dataset: MixedDataset,
        *,
        lag: int = DEFAULT_LAG,
        accumulation: int = 1,
        log: str | Path | None = None,
        nonfinite: str = "skip",
        timeout: float = DEFAULT_TIMEOUT,
        config_hash: str = "",
        sync: str = "auto",
        group: dist.ProcessGroup | None = None,
        check_every: int = 100,
        repeat_warning: float = 10.0,
        steps: int | None = None,
    ):
        if controller.num_domains != dataset.spec.num_domains:
            raise ValueError(f"controller has {controller.num_domains} domains, the dataset {dataset.spec.num_domains}")
        if controller.domains is not None and list(controller.domains) != list(dataset.names):
            raise ValueError(f"the controller's domains {controller.domains} are not the dataset's {dataset.names}")
        check_mixer_options(lag=lag, accumulation=accumulation, nonfinite=nonfinite, timeout=timeout, sync=sync,
                            check_every=check_every, repeat_warning=repeat_warning, steps=steps)  # fmt: skip
        distributed = dist.is_available() and dist.is_initialized()
        world_size = os.environ.get("WORLD_SIZE", "1")
        if sync == "auto" and not distributed and world_size.isdigit() and int(world_size) > 1:
            raise ValueError(
                f"WORLD_SIZE={world_size} is set but torch.distributed is not initialised: without it the ranks' "
                "weights drift apart. Call torch.distributed.init_process_group() before building the mixer "
                "(or pass sync='none' if each rank may mix on its own)"
            )
        if sync == "auto":
            sync = "all_reduce" if distributed else "none"
        if sync != "none" and not distributed:
            raise ValueError(f"sync={sync!r} needs torch.distributed to be initialised")
        self.controller, self.dataset, self.lag, self.nonfinite = controller, dataset, lag, nonfinite
        self.sync, self.group, self.check_every = sync, group, check_every
        # the controller's repeat budget counts epochs by the samples each optimizer step draws (and, where the run's
        # length is known, spreads each domain's budget over it)
        if steps is None and dataset.num_batches != UNLIMITED:
            steps = max(dataset.num_batches // accumulation, 1)
        controller.count_epochs(dataset.spec.global_batch_size * accumulation, dataset.spec.sizes.tolist(), steps)
        initial = controller.weights.detach().double().cpu().numpy()
        self.channel = WeightsChannel(initial, timeout=timeout)
        dataset.schedule = VersionedSchedule(self.channel, lag, accumulation)
        self.accumulation = accumulation
        self.header = {
            "domains": list(dataset.names),
            "seed": dataset.spec.seed,
            "lag": lag,
            "accumulation": accumulation,
            "global_batch_size": dataset.spec.global_batch_size,
            "controller": controller.name,
            "config_hash": config_hash,
            "initial": controller.initial.tolist(),  # the controller's prior: a resume must start from the same
            "mixture": dataset.identity(),  # what every batch depends on besides the weights: replay checks it
            "run": uuid.uuid4().hex,  # ties the log to this run: a resumed checkpoint must continue its own log
        }
        self.log_path = None if log is None else Path(log)
        self._log: ScheduleWriter | None = None  # opened on first publication, or by load_state_dict
        # each domain's training losses since the last step (the metrics' figures; the controller keeps its own
        # signal, which may be another: an excess loss, a reward)
        self._losses = DomainStats(controller.num_domains, controller.device)
        self.metrics = MixingMetrics(dataset.names, dataset.spec.global_batch_size * accumulation)
        self._initial = initial
        self.step_count = 0
        self.skipped = np.zeros(3)  # [non-finite losses, bad domain ids, rejected weight vectors] seen so far
        self.repeats = RepeatWatch(controller, dataset.names, dataset.spec, repeat_warning)
        self.repeats.warn_overdrawn(steps, dataset.spec.global_batch_size * accumulation)
        self._publisher = Publisher(self._publish)  # a GPU step's packet, published off the training thread

    @classmethod
    def from_config(
        cls,
        config: MixtureConfig | str | Path,
        dataset: MixedDataset,
        device: torch.device | str | None = None,
        **overrides: Any,
    ) -> OnlineMixer:
        """The mixer a config's ``mixing:`` section describes (``overrides`` win over it)::

            mixing:
              controller: odm       # static (default), scheduled, doremi, odm, ado, dga, bandit
              lag: 16               # and accumulation, log, nonfinite, timeout, sync, check_every, steps
              alpha: 0.5            # every other key goes to the controller (min_prob, eta, warmup, ...)

        The section is parsed by ``mixing/settings.py``; the controller is built by its class's
        ``from_settings``, from the dataset's initial weights (``scheduled`` takes ``waypoints`` instead; the
        bandit's ``neighbours: N`` reads the importance estimator's n-gram profiles).
        """
        config = MixtureConfig.of(config)
        settings = parse_mixing({**config.mixing, **overrides})
        if settings.pool > 1:
            raise ConfigError(
                "mixing.coreset changes what the loader draws (pools): build with OnlineMixing.from_config, which "
                "reads it, or pass coreset=None"
            )
        initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
        # the domains' n-gram profiles, for a controller that asks (the bandit's neighbours)
        context = ControllerContext(device=device, features=lambda: domain_features(config))
        controller = settings.build_controller(initial, context)
        try:
            return cls(controller, dataset, config_hash=config.config_hash(), **settings.mixer)
        except ValueError as error:  # the messages start with the key's name
            raise ConfigError(f"mixing.{error}") from None

    # -- trainer side ---------------------------------------------------------

    def observe(self, losses: torch.Tensor, domains: torch.Tensor, mask: torch.Tensor | None = None, **signals) -> None:
        """Feed per-sample (or per-token with ``mask``) losses and the batch's ``domain`` ids."""
        self._raise_failure()
        self.controller.observe(losses, domains, mask, **signals)
        self._losses.add(losses, domains, mask)

    def observe_heldout(self, losses: torch.Tensor) -> None:
        """Feed each domain's loss on held-out windows of its own (``(k,)``, NaN where not measured): the
        controller's memorisation guard (``Controller.observe_heldout``). With ``sync="all_reduce"`` the ranks'
        values are averaged (one collective), so each rank may score its own share of the windows."""
        self._raise_failure()
        losses = torch.as_tensor(losses, dtype=torch.float32, device=self.controller.device)
        if self.sync == "all_reduce":
            losses = losses.clone()
            dist.all_reduce(losses, group=self.group)
            losses /= dist.get_world_size(self.group)
        self.controller.observe_heldout(losses)

    def step(self) -> torch.Tensor:
        """Update the weights once (after the optimizer step) and publish them as the next version."""
        self._raise_failure()
        if self.sync == "all_reduce":
            self._all_reduce_statistics()
        weights = self.controller.step()
        if self.sync == "broadcast":
            dist.broadcast(weights, src=self._global_rank(0), group=self.group)
            self.controller.weights = weights
        self.step_count += 1
        self.channel.promised = self.step_count  # published now (CPU) or by the publisher thread (CUDA)
        if self.sync != "none" and self.check_every and self.step_count % self.check_every == 0:
            self.check_consistent(weights)
        # the weights, the problem counts, the epochs drawn and the metrics' figures, in one copy to the host
        controller, (means, counts) = self.controller, self._losses.take_counts()
        guard = controller.limit(MemorisationGuard)
        heldout = guard.heldout if guard is not None else torch.full_like(weights, float("nan"))
        held = controller.memorised().to(weights.dtype)
        parts = [weights.detach(), controller.stats.problems, controller.epochs.drawn, held, heldout, means * counts]
        packet = torch.cat([*parts, counts]).double()
        if packet.is_cuda:
            self._publisher.submit(self.step_count, packet)
        else:
            self._publish(self.step_count, packet.numpy())
        return weights

    # -- several ranks ----------------------------------------------------------

    def _global_rank(self, group_rank: int) -> int:
        return group_rank if self.group is None else dist.get_global_rank(self.group, group_rank)

    def _all_reduce_statistics(self) -> None:
        """Sum the statistics observed since the last step over the ranks, in one collective."""
        window = self.controller.stats.window
        summed = window.contiguous()
        dist.all_reduce(summed, group=self.group)
        window.copy_(summed)  # in place: a graphed controller reads this buffer

    def check_consistent(self, weights: torch.Tensor | None = None) -> None:
        """Raise ``MixingError`` on every rank if the ranks' weights are not bit-for-bit equal."""
        weights = self.controller.weights if weights is None else weights
        high, low = weights.detach().clone(), weights.detach().clone()
        dist.all_reduce(high, op=dist.ReduceOp.MAX, group=self.group)
        dist.all_reduce(low, op=dist.ReduceOp.MIN, group=self.group)
        if torch.equal(high, low):
            return
        # Rare path: find out who differs from rank 0, for the message.
        reference = weights.detach().clone()
        dist.broadcast(reference, src=self._global_rank(0), group=self.group)
        flags = [torch.zeros(1, device=weights.device) for _ in range(dist.get_world_size(self.group))]
        mine = torch.tensor([float(not torch.equal(reference, weights))], device=weights.device)
        dist.all_gather(flags, mine, group=self.group)
        differ = [rank for rank, flag in enumerate(flags) if flag.item()]
        raise MixingError(
            f"step {self.step_count}: the mixture weights differ across ranks (rank(s) {differ} disagree with "
            f"rank 0; largest gap {(high - low).max().item():.3g}); every rank must feed its controller the same "
            "statistics (sync='all_reduce') or take rank 0's weights (sync='broadcast')"
        )

    def flush(self) -> None:
        """Wait until every version handed to ``step()`` is published (e.g. before a checkpoint)."""
        self._publisher.flush()
        self._raise_failure()

    # -- publication ------------------------------------------------------------

    def _publish(self, version: int, packet: np.ndarray) -> None:
        """One version's packet on the host: the metrics, the problems counted, the loader, the log."""
        k = self.controller.num_domains
        weights, problems = packet[:k], packet[k : k + 3]
        drawn, held, heldout, loss_sums, loss_counts = packet[k + 3 :].reshape(5, k)
        self.metrics.publish(version, weights, drawn, held, heldout, loss_sums, loss_counts)
        new = problems - self.skipped
        self.skipped = problems.copy()
        failure = None
        if new[1] > 0:
            failure = MixingError(f"step {version}: {int(new[1])} domain ids outside [0, {k}) were observed")
        if new[0] > 0:
            message = f"step {version}: {int(new[0])} non-finite losses ({int(problems[0])} in all)"
            if self.nonfinite == "error":
                failure = MixingError(message)
            else:
                warnings.warn(message + " were left out of the statistics", stacklevel=2)
        if new[2] > 0:
            rejected = int(problems[2])
            message = (
                f"step {version}: the {self.controller.name} controller's new weights were not a distribution "
                f"(a non-finite, negative or all-zero weight; {rejected} rejected in all)"
            )
            if self.nonfinite == "error":
                failure = MixingError(message + "; look for NaN or overflowing feedback (losses, alignments)")
            elif rejected & (rejected - 1) == 0:  # warn at 1, 2, 4, 8, ... rejections: a poisoned state repeats
                warnings.warn(message + "; kept the last good weights (warned again at twice as many)", stacklevel=2)
        if failure is not None:  # raised on the trainer's next call
            self._publisher.failure = failure
        self.channel.publish(version, weights)
        self.repeats.watch(version, weights, drawn)
        if self.log_path is not None:
            if self._log is None:
                self._log = ScheduleWriter(self.log_path, self.header)
                self._log.append(0, self._initial)
            self._log.append(version, weights)

    def _raise_failure(self) -> None:
        self._publisher.raise_failure()

    # -- checkpoint -------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Controller state and the weight versions that batches still to come may need; and the schedule log so
        far (up to ``LOG_IN_CHECKPOINT`` bytes), so that a checkpoint copied elsewhere resumes on its own."""
        self.flush()
        state = {
            "run": self.header["run"],
            "lag": self.lag,
            "accumulation": self.accumulation,
            "step": self.step_count,
            "controller": self.controller.state_dict(),
            "channel": self.channel.state_dict(self.lag + 1),
            "skipped": self.skipped.tolist(),
        }
        if self._log is not None and self.log_path.stat().st_size <= LOG_IN_CHECKPOINT:
            state["log"] = self.log_path.read_bytes()  # flushed record by record: complete up to this step
        return seal(state)  # a damaged checkpoint is an error, never another run

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the checkpointed run: its controller, its last weight versions and its schedule log.

        ``lag`` and ``accumulation`` decide which weights each batch is drawn with, so a checkpoint taken
        with others is an error (naming the field), as is a log written by another run, and a damaged one (its
        digest, see ``state_digest``).
        """
        state = unseal(state, "the mixer's checkpoint", ("step", "controller", "channel"))
        for key in ("lag", "accumulation"):
            saved = state.get(key, getattr(self, key))  # checkpoints from before these keys: trusted
            if saved != getattr(self, key):
                raise ValueError(
                    f"checkpoint does not match this mixer: {key} was {saved} when saved, is now {getattr(self, key)} "
                    f"({key} is part of the sample order: resume with {key}={saved})"
                )
        self.header["run"] = state.get("run", self.header["run"])
        self.step_count = int(state["step"])
        self.controller.load_state_dict(state["controller"])
        self.channel.load_state_dict(state["channel"])
        self.skipped = np.zeros(3)
        self.skipped[: len(state["skipped"])] = state["skipped"]
        if self.log_path is not None:
            if self._log is not None:
                self._log.close()
            if not self.log_path.exists():
                self._restore_log(state)
            self._log = ScheduleWriter(self.log_path, self.header, resume_at=self.step_count)
            self._log.check_versions(state["channel"])

    def _restore_log(self, state: dict[str, Any]) -> None:
        """Write the log a checkpoint carries where this mixer logs (the checkpoint was copied or moved, say)."""
        if "log" not in state:
            raise ScheduleLogError(
                f"schedule log not found: {self.log_path}. The checkpoint continues a run that logged its weights, "
                f"and carries no copy of the log (over {LOG_IN_CHECKPOINT >> 20} MiB, or saved before checkpoints "
                f"carried it): copy that run's log to {self.log_path}, or resume with log=None"
            )
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(self.log_path, lambda file: file.write(state["log"]))
        logger.info("restored the schedule log from the checkpoint to %s", self.log_path)

    def close(self) -> None:
        """Publish what is pending, stop the publishing thread and close the schedule log."""
        self.flush()
        if self._log:
            self._log.close()
