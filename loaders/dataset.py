"""``MixedDataset``: an ``IterableDataset`` that yields the plan's samples, in plan order.

Each DataLoader worker walks the whole plan (cheap: the counts of a batch
cost O(domains)) but reads only its own batches: worker ``w`` of ``n`` makes
the batches ``b`` with ``(b - start) % n == w``. A stock ``DataLoader`` takes
one item from each worker in turn, so the stream it yields is the plan's
order whatever ``num_workers`` is. Each rank keeps its contiguous slice of
every global batch.

Two output modes:

- ``"batches"`` (fast path, use ``DataLoader(batch_size=None)``): each item
  is a whole per-rank batch, assembled with one gather per domain;
- ``"samples"`` (``DataLoader(batch_size=global_batch_size // world_size)``):
  each item is one sample, for pipelines that collate themselves.

Every item carries ``domain`` (the domain index) and ``index`` (the sample's
index within its domain) besides the transform's fields.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from loaders.config import MixtureConfig
from loaders.plan import (
    UNLIMITED,
    BatchPlan,
    PlanSpec,
    PlanState,
    StaticSchedule,
    StreamEnded,
    WeightSchedule,
    advance,
    plan_batch,
)
from loaders.ranks import data_parallel_rank
from loaders.sources import Source

OUTPUTS = ("batches", "samples")


class MixedDataset(IterableDataset):
    """Samples of several domains, mixed by the plan.

    Args:
        sources: one per domain, in domain-index order.
        names: the domain names (same order).
        spec: sizes, caps, seed, global batch size, sampling method.
        schedule: the weights in force for each batch.
        output: ``"batches"`` or ``"samples"`` (see the module docstring).
        rank, world_size: this rank's slice; default from ``torch.distributed``
            or the ``RANK`` / ``WORLD_SIZE`` environment variables.
        num_batches: stop after global batch ``num_batches - 1``; ``None``
            streams until the repeat caps end it (or forever).
    """

    def __init__(
        self,
        sources: Sequence[Source],
        names: Sequence[str],
        spec: PlanSpec,
        schedule: WeightSchedule,
        *,
        output: str = "batches",
        rank: int | None = None,
        world_size: int | None = None,
        num_batches: int | None = None,
    ):
        if len(sources) != spec.num_domains or len(names) != spec.num_domains:
            raise ValueError(f"{len(sources)} sources and {len(names)} names for {spec.num_domains} domains")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        default_rank, default_world_size = data_parallel_rank()
        self.rank = default_rank if rank is None else rank
        self.world_size = default_world_size if world_size is None else world_size
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank {self.rank} is not in [0, world_size={self.world_size})")
        if spec.global_batch_size % self.world_size:
            raise ValueError(
                f"global_batch_size {spec.global_batch_size} is not divisible by world_size {self.world_size}"
            )
        self.sources = list(sources)
        self.names = list(names)
        self.spec = spec
        self.schedule = schedule
        self.output = output
        self.num_batches = UNLIMITED if num_batches is None else num_batches
        # Where the next iterator starts: [batch, cursors...]. Shared memory, so that
        # persistent workers see a position set in the main process after they started.
        self._start = torch.zeros(1 + spec.num_domains, dtype=torch.int64).share_memory_()
        self._fields: dict[str, tuple] | None = None

    @classmethod
    def from_config(cls, config: MixtureConfig | str | Path, **kwargs: Any) -> MixedDataset:
        """Open the sources of a YAML config (or a loaded ``MixtureConfig``) with its static weights."""
        if not isinstance(config, MixtureConfig):
            config = MixtureConfig.load(config)
        sources = config.build_sources()
        sizes = [len(source) for source in sources]
        schedule = kwargs.pop("schedule", None) or StaticSchedule(config.initial_weights(sizes))
        return cls(sources, config.names, config.plan_spec(sizes), schedule, **kwargs)

    @property
    def local_batch_size(self) -> int:
        return self.spec.global_batch_size // self.world_size

    # -- position ------------------------------------------------------------------

    def start_state(self) -> PlanState:
        start = self._start.numpy()
        return PlanState(int(start[0]), start[1:].copy())

    def set_start(self, state: PlanState) -> None:
        """Make the next iterator (in this process and in every worker) begin at ``state``."""
        if len(state.cursors) != self.spec.num_domains:
            raise ValueError(f"state has {len(state.cursors)} cursors for {self.spec.num_domains} domains")
        self._start[0] = state.batch
        self._start[1:] = torch.from_numpy(np.asarray(state.cursors, dtype=np.int64))

    # -- reading -------------------------------------------------------------------

    def read(self, plan: BatchPlan) -> dict[str, np.ndarray]:
        """The samples of ``plan``, field by field, in slot order."""
        size = len(plan.domains)
        order = np.argsort(plan.domains, kind="stable")
        present, first = np.unique(plan.domains[order], return_index=True)
        out: dict[str, np.ndarray] = {}
        for domain, rows in zip(present, np.split(order, first[1:])):
            fields = self.sources[domain].read_batch(plan.indices[rows])
            self._check_fields(int(domain), fields)
            for name, values in fields.items():
                if name not in out:
                    out[name] = np.empty((size, *values.shape[1:]), dtype=values.dtype)
                out[name][rows] = values
        out["domain"] = plan.domains
        out["index"] = plan.indices
        return out

    def _check_fields(self, domain: int, fields: dict[str, np.ndarray]) -> None:
        signature = {name: (values.shape[1:], values.dtype.str) for name, values in fields.items()}
        if self._fields is None:
            self._fields = {"domain": domain, **signature}
            return
        expected = {k: v for k, v in self._fields.items() if k != "domain"}
        if signature != expected:
            other = self.names[self._fields["domain"]]
            raise ValueError(
                f"domains {other!r} and {self.names[domain]!r} produce different fields "
                f"({expected} vs {signature}); give them transforms with the same outputs"
            )

    # -- iteration -----------------------------------------------------------------

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        state = self.start_state()
        first = state.batch
        while state.batch < self.num_batches:
            weights = self.schedule.weights_at(state.batch)
            try:
                if (state.batch - first) % num_workers != worker_id:
                    advance(self.spec, state, weights)  # another worker's batch: only move the cursors
                    continue
                plan = plan_batch(self.spec, state, weights, self.rank, self.world_size)
            except StreamEnded:
                return
            batch = {name: torch.from_numpy(values) for name, values in self.read(plan).items()}
            if self.output == "batches":
                yield batch
            else:
                for i in range(len(plan.domains)):
                    yield {name: values[i] for name, values in batch.items()}
