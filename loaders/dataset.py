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

import collections
import functools
import itertools
import math
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info
from torch.utils.data._utils.collate import default_collate_fn_map

from onlinemix.loaders import build
from onlinemix.loaders.config import MixtureConfig
from onlinemix.loaders.importance.acceptance import OnlineAcceptance
from onlinemix.loaders.plan import (
    UNLIMITED,
    BatchPlan,
    PlanSpec,
    PlanState,
    StaticSchedule,
    StreamEnded,
    WeightSchedule,
    cursors_before,
    plan_batches,
)
from onlinemix.loaders.ranks import data_parallel_rank
from onlinemix.loaders.sources import Source, TokenizedSource
from onlinemix.loaders.tokenizers import Tokenizer
from onlinemix.simplex import check_weights

OUTPUTS = ("batches", "samples")
PLAN_CHUNK = 64  # batches each worker plans per call: amortises the per-call cost (a few µs)
PREFETCH_BATCHES = 8  # a worker's batches whose samples domains on object storage fetch ahead, as a group


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
        _refuse_accelerate_resharding(sys._getframe(1), "IterableDatasetShard")
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


class Batch(dict):
    """A whole per-rank batch (``output="batches"``): a ``dict`` of tensors, field by field.

    Its own type so that a ``DataLoader`` told to batch whole batches again (``batch_size`` set instead of
    ``None``) fails with a message saying so, instead of stacking them into an extra dimension; and so
    that ``accelerate`` slicing one rank's batch for the other ranks (its dispatcher) is refused too.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if "accelerate" in sys.modules:  # its dispatcher rebuilds each slice of a batch as the batch's type
            _refuse_accelerate_resharding(sys._getframe(1), "slice_tensors")
        super().__init__(*args, **kwargs)


PER_DOMAIN = {"sizes": "size", "caps": "repeat cap (max_epochs)", "order": "order",
              "sources": "data (content, tokenizer, samples)"}  # fmt: skip
# The fields whose change explains the others (a new seq_len changes every size; a new tokenizer every source's
# data): compared first, so that the message names what the user changed.
CAUSES = ("domains", "seq_len", "tokenizer", "global_batch_size", "seed", "sampling", "caps", "order")


def identity_mismatch(
    saved: Mapping[str, Any], now: Mapping[str, Any], names: Sequence[str], when: str = "when saved"
) -> str | None:
    """The first field of a recorded ``identity()`` that differs from ``now``'s, in words (a per-domain field
    names the domain; the fields that cause others to change come first), or ``None`` when they agree. Fields
    recorded before a key existed are not compared."""
    for key in sorted(saved, key=lambda k: CAUSES.index(k) if k in CAUSES else len(CAUSES)):
        value, current = saved[key], now.get(key)
        if current == value or key not in now:
            continue
        if key in PER_DOMAIN and isinstance(value, list) and len(value) == len(current or []):
            d = next(i for i, (a, b) in enumerate(zip(value, current)) if a != b)
            was, new = (_cap(value[d]), _cap(current[d])) if key == "caps" else (repr(value[d]), repr(current[d]))
            return f"domain {names[d]!r}'s {PER_DOMAIN[key]} was {was} {when}, is now {new}"
        return f"{key} was {value!r} {when}, is now {current!r}"
    return None


def _cap(samples: Any) -> str:
    """A repeat cap in words: a number of samples, or none (``UNLIMITED``)."""
    return "none" if samples == UNLIMITED else f"{samples:,} samples"


def _refuse_accelerate_resharding(frame: Any, function: str) -> None:
    """Raise if one of the few callers above ``frame`` is accelerate's ``function`` (which would split this rank's
    data among the ranks again, dropping all but a slice of it)."""
    for _ in range(4):
        if frame is None:
            return
        if frame.f_code.co_name == function and frame.f_globals.get("__name__", "").startswith("accelerate"):
            raise RuntimeError(
                "accelerate is splitting a MixedDataset's batches among the ranks, but each rank's dataset already "
                "yields that rank's own slice of every global batch: half (or more) of the data would be skipped. "
                "Give accelerator.prepare() your model and optimizer only, and iterate MixedLoader (or pass the "
                "MixedLoader itself to prepare(), which leaves it as it is)"
            )
        frame = frame.f_back


def _refuse_to_collate(batch: Sequence[Batch], *, collate_fn_map: Any = None) -> None:
    raise TypeError(
        f"a DataLoader is batching {len(batch)} items of a MixedDataset that yields whole batches already: build it "
        "with batch_size=None (or use MixedLoader), or make the dataset with output='samples' to batch samples"
    )


default_collate_fn_map[Batch] = _refuse_to_collate  # only this type: every other collation is untouched


class MixedIterator(Iterator[dict[str, Any]]):
    """One pass over a ``MixedDataset``'s plan, in one DataLoader worker (or the main process).

    Worker ``w`` of ``n`` yields the batches ``b`` with ``(b - start) % n == w``, planning a chunk of batches
    per call (the others' are counted, not read). ``state_dict()`` is the exact position of the next item
    it yields (and ``load_state_dict`` resumes there), so torchdata's ``StatefulDataLoader`` checkpoints
    each worker mid-stream and resumes without replaying anything.
    """

    def __init__(self, dataset: MixedDataset, worker_id: int, num_workers: int):
        self.dataset, self.num_workers = dataset, num_workers
        start = dataset.start_state()
        self._restart(start, start.batch + worker_id, 0)

    def _restart(self, position: PlanState, first: int, sample: int) -> None:
        """Plan from ``position`` on; yield this worker's batches from batch ``first``, sample ``sample`` of it."""
        self.position = position  # the plan state after what has been planned so far
        self.next = first  # the next batch this iterator yields
        self.sample = sample  # samples output: the next sample of that batch
        self.keep = (self.num_workers, first % self.num_workers)
        self.pending: collections.deque[BatchPlan] = collections.deque()
        self.chunk: tuple[int, np.ndarray] | None = None  # (first batch, cursors before each batch and after all)
        self.current: tuple[int, dict[str, torch.Tensor]] | None = None  # samples output: the batch being split
        self.ahead = 0  # batches after the current one whose samples are being fetched ahead (see _prefetch)

    def __iter__(self) -> MixedIterator:
        return self

    def __next__(self) -> dict[str, Any]:
        dataset = self.dataset
        while not self.pending:
            if self.position.batch >= dataset.num_batches or not self._plan():
                raise StopIteration
        plan = self.pending[0]
        if dataset.prefetching and self.sample == 0:
            self._prefetch()
        if dataset.output == "batches":
            self.pending.popleft()
            self.next = plan.batch + self.num_workers
            return Batch(dataset.read(plan))
        if self.current is None or self.current[0] != plan.batch:
            self.current = (plan.batch, dataset.read(plan))
        item = {name: values[self.sample] for name, values in self.current[1].items()}
        self.sample += 1
        if self.sample == len(plan.domains):
            self.pending.popleft()
            self.next, self.sample, self.current = plan.batch + self.num_workers, 0, None
        return item

    def _prefetch(self) -> None:
        """At a new batch: once fewer than ``PREFETCH_BATCHES`` of the batches after it are on their way, ask
        for the next ``2 x PREFETCH_BATCHES`` (those asked for already are skipped): the fetches come in groups
        of batches, whose nearby ranges merge into fewer requests, while the group before is read."""
        if self.ahead <= PREFETCH_BATCHES:
            self.dataset.prefetch(itertools.islice(self.pending, 0, 2 * PREFETCH_BATCHES))
            self.ahead = min(2 * PREFETCH_BATCHES, len(self.pending))
        self.ahead -= 1

    def _plan(self) -> bool:
        """Plan the next chunk (a cost per call: amortised over ``PLAN_CHUNK`` batches per worker)."""
        dataset = self.dataset
        stop = min(dataset.num_batches, self.position.batch + PLAN_CHUNK * self.num_workers)
        weights = dataset.schedule.weights_for(self.position.batch, stop)
        first = self.position.batch
        try:
            cursors = cursors_before(dataset.spec, self.position, weights)
            plans = plan_batches(dataset.spec, self.position, weights, dataset.rank, dataset.world_size, self.keep)
        except StreamEnded:
            return False
        self.chunk = (first, cursors[: self.position.batch - first + 1])
        self.pending.extend(plan for plan in plans if plan.batch >= self.next)  # after a restore: from `next` on
        return True

    def state_dict(self) -> dict[str, Any]:
        """The position of the next item: where to plan from, the next batch to yield, and the sample in it."""
        if self.chunk is not None and self.chunk[0] <= self.next < self.chunk[0] + len(self.chunk[1]):
            plan = PlanState(self.next, self.chunk[1][self.next - self.chunk[0]])
        else:  # the next batch is past what is planned: resume planning where planning stands
            plan = self.position
        return {"plan": plan.state_dict(), "next": self.next, "sample": self.sample}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a state ``state_dict`` returned (``Stateful``)."""
        self._restart(PlanState.from_state_dict(state["plan"]), int(state["next"]), int(state["sample"]))


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
