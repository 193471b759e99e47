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
index within its domain) besides the transform's fields. With importance
inside the stream (``importance:`` in the mixture file) it also carries
``importance`` (the sample's DSIR log weight; 0 in domains without one) and
``reads`` (samples read to fill the slot: more than 1 only where online
accept/reject rejected some, see ``loaders/importance/acceptance.py``).
"""

from __future__ import annotations

import functools
import itertools
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from onlinemix.loaders import build
from onlinemix.loaders.config import MixtureConfig
from onlinemix.loaders.importance.acceptance import OnlineAcceptance
from onlinemix.loaders.iterator import MixedIterator, refuse_accelerate_resharding
from onlinemix.loaders.plan import UNLIMITED, BatchPlan, PlanSpec, PlanState, StaticSchedule, WeightSchedule
from onlinemix.loaders.ranks import data_parallel_rank
from onlinemix.loaders.sources import Source, TokenizedSource
from onlinemix.loaders.tokenizers import Tokenizer
from onlinemix.simplex import check_weights

OUTPUTS = ("batches", "samples")


class MixedDataset(IterableDataset):
    """Samples of several domains, mixed by the plan.

    Args:
        sources: one per domain, in domain-index order.
        names: the domain names (same order).
        spec: sizes, caps, seed, global batch size, sampling method.
        schedule: the weights in force for each batch.
        output: ``"batches"`` or ``"samples"`` (see the module docstring).
        rank: this data-parallel rank; default from ``torch.distributed`` or the
            ``RANK`` environment variable (see ``loaders/ranks.py``).
        world_size: the number of data-parallel ranks; default as for ``rank``
            (``WORLD_SIZE``).
        replicas: consecutive global ranks that see identical samples
            (tensor / sequence parallelism); used only when ``rank`` is not given.
        num_batches: stop after global batch ``num_batches - 1``; ``None``
            streams until the repeat caps end it (or forever).
        acceptance: per domain index, an ``OnlineAcceptance`` that replaces
            rejected samples in the worker (``build.online_acceptance``).
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
        replicas: int = 1,
        num_batches: int | None = None,
        acceptance: dict[int, OnlineAcceptance] | None = None,
    ):
        if len(sources) != spec.num_domains or len(names) != spec.num_domains:
            raise ValueError(f"{len(sources)} sources and {len(names)} names for {spec.num_domains} domains")
        if output not in OUTPUTS:
            raise ValueError(f"output must be one of {OUTPUTS}, got {output!r}")
        default_rank, default_world_size = data_parallel_rank(replicas)
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
        self.acceptance = dict(acceptance or {})
        # The importance fields are there whenever importance is used anywhere, so every batch has the same fields.
        self.importance_fields = bool(self.acceptance) or bool(spec._resampled)
        # Where the next iterator starts: [batch, cursors...]. Shared memory, so that
        # persistent workers see a position set in the main process after they started.
        self._start = torch.zeros(1 + spec.num_domains, dtype=torch.int64).share_memory_()
        self._fields: dict[str, tuple[tuple[int, ...], str]] | None = None
        self.tokenizer: Tokenizer | None = None  # the mixture's, when known (from_config sets it)
        self.seq_len: int | None = None  # the mixture's (from_config sets it)
        self._layout: _BatchLayout | None = None

    @classmethod
    def from_config(cls, config: MixtureConfig | str | Path, **kwargs: Any) -> MixedDataset:
        """Open the sources of a YAML config (or a loaded ``MixtureConfig``) with its static weights.

        ``kwargs``: this class's keyword arguments (``output``, ``rank``, ``world_size``, ``num_batches``...).
        The dataset's ``tokenizer`` is the mixture's (``None`` when it only has token-bin domains and names
        no tokenizer: their vocabulary is unknown).
        """
        config = MixtureConfig.of(config)
        sources = build.build_sources(config)
        schedule = kwargs.pop("schedule", None) or StaticSchedule(build.initial_weights(config, sources))
        spec = build.plan_spec(config, sources)
        acceptance = build.online_acceptance(config, sources)
        dataset = cls(sources, config.names, spec, schedule, acceptance=acceptance, **kwargs)
        known = config.tokenizer is not None or any(isinstance(s, TokenizedSource) for s in sources)
        dataset.tokenizer = build.tokenizer_of(config) if known else None
        dataset.seq_len = config.seq_len
        return dataset

    @classmethod
    def from_sources(
        cls,
        sources: Mapping[str, Source],
        global_batch_size: int,
        weights: Sequence[float] | None = None,
        *,
        seed: int = 0,
        max_epochs: Mapping[str, float] | None = None,
        sampling: str = "systematic",
        **kwargs: Any,
    ) -> MixedDataset:
        """A mixture of sources you built yourself (your own ``Source`` subclasses included), by domain name.

        ``weights`` default to size-proportional; ``max_epochs`` caps domains by name (a domain drops out
        after ``max_epochs x len(source)`` samples). ``kwargs`` as for the constructor. The sample order is
        the same pure function of ``(seed, batch, weights)`` as for a config's domains.
        """
        names = list(sources)
        sizes = [len(source) for source in sources.values()]
        if weights is None:
            weights = np.asarray(sizes, dtype=np.float64) / sum(sizes)
        caps = []
        for name, size in zip(names, sizes):
            epochs = (max_epochs or {}).get(name)
            caps.append(UNLIMITED if epochs is None else max(1, math.floor(epochs * size)))
        unknown = set(max_epochs or {}) - set(names)
        if unknown:
            raise ValueError(f"max_epochs names {sorted(unknown)}, not domains of {names}")
        spec = PlanSpec(sizes, caps, seed, global_batch_size, sampling)
        schedule = StaticSchedule(check_weights(weights, names, "weights"))
        return cls(list(sources.values()), names, spec, schedule, **kwargs)

    def identity(self) -> dict[str, Any]:
        """Everything the sample stream depends on besides the weights, as plain values: a checkpoint and a
        schedule log record it, and a resume or a replay on a mixture whose identity differs is refused by
        field (``identity_mismatch``). World size, rank and workers are not in it: they never change a batch."""
        spec = self.spec
        return {
            "domains": list(self.names),
            "sizes": [int(n) for n in spec.sizes],
            "caps": [int(c) for c in spec.caps],
            "seed": spec.seed,
            "global_batch_size": spec.global_batch_size,
            "sampling": spec.sampling,
            "order": ["samples" if shards is None else f"shards:{len(shards)}" for shards in spec.shards],
            "seq_len": self.seq_len,
            "tokenizer": None if self.tokenizer is None else self.tokenizer.fingerprint(),
            "sources": [source.fingerprint() for source in self.sources],  # content digests, tokenizer, stride
        }

    @property
    def local_batch_size(self) -> int:
        """Samples per batch on this rank."""
        return self.spec.global_batch_size // self.world_size

    # -- position ------------------------------------------------------------------

    def start_state(self) -> PlanState:
        """The plan position the next iteration starts from."""
        start = self._start.numpy()
        return PlanState(int(start[0]), start[1:].copy())

    def set_start(self, state: PlanState) -> None:
        """Make the next iterator (in this process and in every worker) begin at ``state``."""
        if len(state.cursors) != self.spec.num_domains:
            raise ValueError(f"state has {len(state.cursors)} cursors for {self.spec.num_domains} domains")
        self._start[0] = state.batch
        self._start[1:] = torch.from_numpy(np.asarray(state.cursors, dtype=np.int64))

    # -- reading -------------------------------------------------------------------

    def read(self, plan: BatchPlan) -> dict[str, torch.Tensor]:
        """The samples of ``plan``, field by field, in slot order: one read per domain present."""
        size = len(plan.domains)
        if self._layout is None:
            fields = {**self.fields, "domain": ((), "<i8"), "index": ((), "<i8")}
            if self.importance_fields:
                fields.update(importance=((), "<f8"), reads=((), "<i8"))
            self._layout = _BatchLayout(fields)
        tensors, arrays = self._layout.allocate(size, shared=get_worker_info() is not None)
        indices = plan.indices
        if self.importance_fields:
            indices = indices.copy()
            arrays["importance"][:] = 0.0
            arrays["reads"][:] = 1
        order = np.argsort(plan.domains, kind="stable")
        grouped = plan.domains[order]
        bounds = [0, *(np.flatnonzero(grouped[1:] != grouped[:-1]) + 1).tolist(), size]
        for start, stop in itertools.pairwise(bounds):
            rows, domain = order[start:stop], int(grouped[start])
            if domain in self.acceptance:
                indices[rows], arrays["reads"][rows], arrays["importance"][rows] = self.acceptance[domain].choose(
                    indices[rows]
                )
            elif self.spec.resampled[domain] is not None:
                arrays["importance"][rows] = self.spec.resampled[domain].log_weights[indices[rows]]
            self.sources[domain].read_into(indices[rows], arrays, rows)
        arrays["domain"][:] = plan.domains
        arrays["index"][:] = indices
        return tensors

    @functools.cached_property
    def prefetching(self) -> bool:
        """Whether a domain fetches ahead (one on object storage)."""
        return any(source.prefetches for source in self.sources)

    def prefetch(self, plans: Iterable[BatchPlan]) -> None:
        """Tell the domains that fetch ahead which samples ``plans`` will read (their own threads fetch them)."""
        plans = list(plans)
        domains = np.concatenate([plan.domains for plan in plans])
        indices = np.concatenate([plan.indices for plan in plans])
        for domain, source in enumerate(self.sources):
            if source.prefetches and domain not in self.acceptance:  # acceptance picks its samples at read time
                source.prefetch(indices[domains == domain])

    @property
    def fields(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """The per-sample shape and dtype of each field every domain produces (checked to agree)."""
        if self._fields is None:
            signatures = [source.signature() for source in self.sources]
            for name, signature in zip(self.names[1:], signatures[1:]):
                if signature != signatures[0]:
                    raise ValueError(
                        f"domains {self.names[0]!r} and {name!r} produce different fields "
                        f"({signatures[0]} vs {signature}); give them transforms with the same outputs"
                    )
            self._fields = signatures[0]
        return self._fields

    # -- iteration -----------------------------------------------------------------

    def __iter__(self) -> MixedIterator:
        refuse_accelerate_resharding(sys._getframe(1), "IterableDatasetShard")
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        return MixedIterator(self, worker_id, num_workers)

    # -- torchdata's Stateful protocol (StatefulDataLoader saves and restores it with each worker's iterator) ------

    def state_dict(self) -> dict[str, Any]:
        """Where the next iterator starts (``set_start``), as plain ints."""
        return {"start": self.start_state().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Start the next iteration at a checkpointed position (see ``state_dict``)."""
        self.set_start(PlanState.from_state_dict(state["start"]))


class _BatchLayout:
    """Where each field of a batch lives: one buffer per dtype holding every field of that dtype.

    Moving a batch out of a worker costs per storage, so a batch of token ids,
    labels, domains and indices travels as one block. In a worker the block is
    allocated in shared memory up front (as the DataLoader's own collate does),
    so handing it over copies nothing.
    """

    def __init__(self, fields: dict[str, tuple[tuple[int, ...], str]]):
        self.by_dtype: dict[str, list[tuple[str, tuple[int, ...], int]]] = {}  # dtype -> (name, shape, numel)
        for name, (shape, dtype) in fields.items():
            self.by_dtype.setdefault(dtype, []).append((name, shape, math.prod(shape)))

    def allocate(self, size: int, shared: bool) -> tuple[dict[str, torch.Tensor], dict[str, np.ndarray]]:
        """Fresh buffers for a batch of ``size`` samples, as torch tensors and numpy views of them."""
        tensors, arrays = {}, {}
        for dtype, members in self.by_dtype.items():
            total = size * sum(numel for _, _, numel in members)
            if shared:
                block = torch.from_numpy(np.empty(0, dtype=dtype)).new_empty(total).share_memory_()
                flat = block.numpy()
            else:  # numpy's allocator reuses freed pages; torch's faults in fresh ones every batch
                flat = np.empty(total, dtype=dtype)
                block = torch.from_numpy(flat)
            offset = 0
            for name, shape, numel in members:
                end = offset + size * numel
                arrays[name] = flat[offset:end].reshape(size, *shape)
                tensors[name] = block[offset:end].view(size, *shape) if shared else torch.from_numpy(arrays[name])
                offset = end
        return tensors, arrays
