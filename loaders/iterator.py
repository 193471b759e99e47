"""``MixedIterator``: one DataLoader worker's pass over a ``MixedDataset``'s plan, with its exact position; and
``Batch``, the whole per-rank batch it yields, which refuses to be batched or split among the ranks again."""

from __future__ import annotations

import collections
import itertools
import sys
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data._utils.collate import default_collate_fn_map

from onlinemix.loaders.plan import BatchPlan, PlanState, StreamEnded, cursors_before, plan_batches

if TYPE_CHECKING:
    from onlinemix.loaders.dataset import MixedDataset

PLAN_CHUNK = 64  # batches each worker plans per call: amortises the per-call cost (a few µs)
PREFETCH_BATCHES = 8  # a worker's batches whose samples domains on object storage fetch ahead, as a group


class Batch(dict):
    """A whole per-rank batch (``output="batches"``): a ``dict`` of tensors, field by field.

    Its own type so that a ``DataLoader`` told to batch whole batches again (``batch_size`` set instead of
    ``None``) fails with a message saying so, instead of stacking them into an extra dimension; and so
    that ``accelerate`` slicing one rank's batch for the other ranks (its dispatcher) is refused too.
    """

    def __init__(self, *args: Any, **kwargs: Any):
        if "accelerate" in sys.modules:  # its dispatcher rebuilds each slice of a batch as the batch's type
            refuse_accelerate_resharding(sys._getframe(1), "slice_tensors")
        super().__init__(*args, **kwargs)


def refuse_accelerate_resharding(frame: Any, function: str) -> None:
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
