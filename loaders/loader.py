"""``MixedLoader``: a ``MixedDataset`` read through a stock ``DataLoader``, checkpointed and resumed exactly.

``MixedLoader`` is not itself a ``torch.utils.data.DataLoader`` (``isinstance`` is false): it makes one
per ``iter()`` where one is needed (``loader.dataloader``: worker processes, ``pin_memory``, per-sample output;
in process it iterates the dataset itself) and counts the batches it has handed to the training loop. Its
``state_dict()`` is the plan position after the last of them — ``(batch, cursors)``, a few integers —
so a run resumed from it continues with the very next batch, whatever ``num_workers`` either run used.
Batches the DataLoader had prefetched but not yet handed out are simply made again.

**A thread instead of processes.** ``MixedLoader(dataset, thread_prefetch=2)`` makes the next batches in a
background thread of the training process (gathering from memory maps and the plan's numba kernels release
the GIL), so loading overlaps training without worker processes and without moving batches between
processes. The batches and the checkpoints are those of ``num_workers=0``: one thread makes them in order.

**A stream, not epochs.** Each ``iter()`` continues where the loader stands, so ``for epoch in ...:
for batch in loader:`` goes on through the stream; ``len(loader)`` is the number of batches left.
Iterating a loader whose stream is over (``num_batches`` handed out, or every domain with weight at
its ``max_epochs``) is an error saying so, never a silently empty epoch.
"""

from __future__ import annotations

import queue
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader

from onlinemix.loaders.channel import VersionedSchedule, WeightsChannel
from onlinemix.loaders.dataset import MixedDataset
from onlinemix.loaders.identity import identity_mismatch
from onlinemix.loaders.plan import UNLIMITED, PlanState, StaticSchedule, StreamEnded, fast_forward
from onlinemix.loaders.state_digest import seal, unseal

STATE_VERSION = 1


class StreamOver(RuntimeError):
    """``iter()`` of a loader whose stream has no batch left."""


def as_is(batch: Any) -> Any:
    """The DataLoader's ``collate_fn`` for whole batches: the batch as the dataset made it (module level, so that
    spawned workers can unpickle it)."""
    return batch


class ThreadPrefetch(Iterator):
    """The items of ``iterator``, made up to ``depth`` ahead by a background thread, in the same order; an
    exception in the thread is raised where its item would have come. ``close()`` (or dropping it) stops the
    thread at its next item."""

    _END = object()

    def __init__(self, iterator: Iterator, depth: int):
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(iterator,), name="onlinemix-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, iterator: Iterator) -> None:
        try:
            for item in iterator:
                if not self._put(item):
                    return
            self._put(self._END)
        except BaseException as error:  # handed to the consumer, raised there; then the stream ends
            self._put(error) and self._put(self._END)

    def _put(self, item: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __next__(self) -> Any:
        item = self._queue.get()
        if item is self._END:
            self._queue.put(self._END)  # every later call ends too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread (it finishes the item it is making, then ends)."""
        self._stop.set()

    def __del__(self) -> None:
        self.close()


# Identity keys with one value per domain, and what a mismatch message calls the value.
class MixedLoader:
    """Iterate a ``MixedDataset`` through a stock ``DataLoader``, with ``state_dict`` / ``load_state_dict``.

    The keyword arguments are the ``DataLoader``'s own and mean what they mean
    there. ``num_workers`` only changes speed, never the batches. With
    ``persistent_workers=True`` the workers survive from one ``iter()`` to the
    next and still start where the loader stands (the start position lives in
    shared memory).

    ``thread_prefetch``: with ``num_workers=0``, how many batches a background thread makes ahead of the
    training loop (default 0: each batch is made when it is asked for). The trade-off against worker
    processes: no process start-up and no copy of each batch between processes, but one core's worth of
    loading, shared with the training thread's Python.
    """

    def __init__(
        self,
        dataset: MixedDataset,
        num_workers: int = 0,
        *,
        pin_memory: bool = False,
        prefetch_factor: int | None = None,
        persistent_workers: bool = False,
        multiprocessing_context: Any = None,
        timeout: float = 0,
        worker_init_fn: Callable[[int], None] | None = None,
        thread_prefetch: int = 0,
    ):
        if not isinstance(thread_prefetch, int) or thread_prefetch < 0:
            raise ValueError(f"thread_prefetch must be an integer >= 0, got {thread_prefetch!r}")
        if thread_prefetch and num_workers:
            raise ValueError(
                f"thread_prefetch makes batches in a thread of this process; with num_workers={num_workers} the "
                "worker processes make them (and prefetch_factor says how many ahead): choose one"
            )
        self.dataset = dataset
        self.thread_prefetch = thread_prefetch
        self._dataloader_kwargs = dict(
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=prefetch_factor,
            persistent_workers=persistent_workers,
            multiprocessing_context=multiprocessing_context,
            timeout=timeout,
            worker_init_fn=worker_init_fn,
            batch_size=None if dataset.output == "batches" else dataset.local_batch_size,
        )
        if dataset.output == "batches":  # a batch is a dict of tensors already: the DataLoader's default_convert
            self._dataloader_kwargs["collate_fn"] = as_is  # would only copy the dict (~10 µs a batch)
        self._position = dataset.start_state()
        self._handed_out = 0  # batches yielded since _position was last brought up to date
        self._dataloader: DataLoader | None = None

    @property
    def batch_size(self) -> int:
        """Samples per batch this loader hands out: the global batch size divided by the world size."""
        return self.dataset.local_batch_size

    @property
    def dataloader(self) -> DataLoader | None:
        """The ``DataLoader`` of the current (or last) ``iter()``; ``None`` before the first, and in process.

        In process (``num_workers=0``, whole batches, no ``pin_memory``) the loader iterates the dataset itself:
        the batches are the same, without a DataLoader's per-batch bookkeeping.
        """
        return self._dataloader

    @property
    def _in_process(self) -> bool:
        kwargs = self._dataloader_kwargs
        return not kwargs["num_workers"] and not kwargs["pin_memory"] and self.dataset.output == "batches"

    def __len__(self) -> int:
        """Batches left from the loader's position, where that is known.

        Known when the dataset has ``num_batches``, and, for a mixture with repeat caps, when its weights are
        static (the plan then says exactly where the caps end the stream). Otherwise ``TypeError``, as for any
        iterable without a length.
        """
        dataset = self.dataset
        if dataset.num_batches >= UNLIMITED:
            raise TypeError("a MixedLoader without num_batches streams on: it has no length (set num_batches)")
        position = self.position
        if (dataset.spec.caps >= UNLIMITED).all():
            return max(0, dataset.num_batches - position.batch)
        if not isinstance(dataset.schedule, StaticSchedule):
            raise TypeError(
                "the length of a capped mixture (max_epochs) with online weights is unknown: where the caps end the "
                "stream depends on weights not chosen yet"
            )
        try:
            fast_forward(dataset.spec, position, dataset.num_batches, dataset.schedule)
        except StreamEnded as end:
            return end.batch - self.position.batch
        return dataset.num_batches - self.position.batch

    @property
    def position(self) -> PlanState:
        """The plan position of the next batch this loader will hand out."""
        return self.position_at(self._position.batch + self._handed_out)

    def position_at(self, batch: int) -> PlanState:
        """The plan position before ``batch``, one of the batches handed out so far (or the next).

        For trainers that fetch ahead of what they train on (Lightning's
        fetcher holds one batch back): checkpoint the batch after the last one
        trained, not the last one fetched.
        """
        handed_out = self._position.batch + self._handed_out
        if not self._position.batch <= batch <= handed_out:
            raise ValueError(
                f"batch {batch} is not one this loader can still checkpoint at: it has handed out batches "
                f"up to {handed_out - 1}, and positions before batch {self._position.batch} are gone"
            )
        if batch > self._position.batch:
            fast_forward(self.dataset.spec, self._position, batch, self.dataset.schedule)
            self._handed_out = handed_out - batch
        return self._position.copy()

    def __iter__(self) -> Iterator[dict[str, Any]]:
        position = self.position
        self._check_not_over(position)
        self.dataset.set_start(position)
        if self._in_process:
            # Whole batches made here, not pinned: all a DataLoader would add is its per-batch bookkeeping
            # (a profiler annotation, a fetcher, an identity collate: ~20 µs a batch, a fifth of making one).
            self._warn_if_prefetch_outruns_weights()
            batches = iter(self.dataset)
        else:
            if self._dataloader is None or not self._dataloader_kwargs["persistent_workers"]:
                self._warn_if_prefetch_outruns_weights()
                # Its own generator: creating the DataLoader's iterator draws worker seeds from it, and drawing from
                # the global torch RNG instead would shift dropout and everything else a resumed run restores.
                generator = torch.Generator().manual_seed(0)
                self._dataloader = DataLoader(self.dataset, generator=generator, **self._dataloader_kwargs)
            batches = iter(self._dataloader)
        if self.thread_prefetch:
            batches = ThreadPrefetch(batches, self.thread_prefetch)
        try:
            while True:
                self._check_weights_can_arrive(self._position.batch + self._handed_out)
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                self._handed_out += 1
                yield batch
        finally:  # a loop that breaks out (or an error) stops the thread too
            if isinstance(batches, ThreadPrefetch):
                batches.close()

    def _check_weights_can_arrive(self, batch: int) -> None:
        """Fail at once, naming the fix, when the next batch needs weights that no step will publish.

        The batch's weights come from step ``batch // accumulation - lag``; the trainer publishes them with
        ``step()`` after each optimizer step, in this process, between two batches. If it has not, and asks
        for the next batch anyway, that batch would wait for ever (until the channel's timeout): the usual
        cause is a training loop that never calls ``step()``.
        """
        schedule = self.dataset.schedule
        if not (isinstance(schedule, VersionedSchedule) and isinstance(schedule.table, WeightsChannel)):
            return
        needed, stepped = schedule.version(batch), schedule.table.promised
        if needed > stepped:
            raise RuntimeError(
                f"batch {batch} is drawn with the weights of step {needed}, but the mixer has stepped {stepped} "
                f"time(s): call mixer.step() (or mixing.step()) once after each optimizer step, after observe()"
            )

    def _check_not_over(self, position: PlanState) -> None:
        """An error saying the stream is over, instead of an empty pass."""
        dataset = self.dataset
        if position.batch >= dataset.num_batches:
            raise StreamOver(
                f"this loader has handed out all {dataset.num_batches} batches of its stream (num_batches): a mixture "
                "is a stream, not epochs. Build the dataset with the num_batches you want in all"
            )
        try:
            fast_forward(dataset.spec, position.copy(), position.batch + 1, dataset.schedule)
        except StreamEnded as end:
            raise StreamOver(
                f"the stream ended at batch {end.batch}: every domain with a positive weight has reached its "
                "max_epochs (raise them, or give weight to an uncapped domain)"
            ) from None

    def _warn_if_prefetch_outruns_weights(self) -> None:
        """With live weights, a worker can only make the batches whose weights are published: about
        ``lag x accumulation`` ahead of training. A DataLoader that prefetches more leaves workers waiting."""
        schedule, workers = self.dataset.schedule, self._dataloader_kwargs["num_workers"]
        live = isinstance(schedule, VersionedSchedule) and isinstance(schedule.table, WeightsChannel)
        if not (live and (workers or self.thread_prefetch)):
            return
        factor = self._dataloader_kwargs["prefetch_factor"] or 2  # the DataLoader's default
        depth, ahead = (workers * factor if workers else self.thread_prefetch), schedule.lag * schedule.accumulation
        making = f"num_workers={workers} x prefetch_factor={factor}" if workers else "thread_prefetch"
        if depth > ahead:
            warnings.warn(
                f"the DataLoader prefetches {depth} batches ({making}) but the "
                f"weights of only about {ahead} batches ahead are published (lag {schedule.lag} x accumulation "
                f"{schedule.accumulation}): workers will wait for training; a lag of at least "
                f"{-(-depth // schedule.accumulation)} keeps them busy",
                stacklevel=3,
            )

    def state_dict(self, batch: int | None = None) -> dict[str, Any]:
        """Plain ints and strings: the position, plus what the mixture must match on resume.

        ``batch``: checkpoint as if only the batches before it had been handed
        out (see ``position_at``); default: every batch handed out so far.
        """
        position = self.position if batch is None else self.position_at(batch)
        return seal({"version": STATE_VERSION, "position": position.state_dict(), "mixture": self.identity()})

    def start_at(self, position: PlanState) -> None:
        """Make the next ``iter()`` start at plan ``position`` (of this loader's mixture), e.g. one
        ``fast_forward`` found: what ``load_state_dict`` does with a checkpoint's."""
        self._position = position.copy()
        self._handed_out = 0

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the checkpointed position; the next ``iter()`` starts there. A damaged state (its digest, see
        ``state_digest``) is a ``CheckpointError``."""
        state = unseal(state, "the loader's checkpoint", ("version", "position", "mixture"))
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r} (expected {STATE_VERSION})")
        problem = identity_mismatch(state["mixture"], self.identity(), self.dataset.names)
        if problem:
            raise ValueError(f"checkpoint does not match this mixture: {problem}")
        self.start_at(PlanState.from_state_dict(state["position"]))

    def identity(self) -> dict[str, Any]:
        """What a checkpoint's mixture must share with this one (world size and workers may differ): the
        dataset's ``identity()`` and, with online weights, ``lag`` and ``accumulation``, which decide the weight
        version each batch is drawn with."""
        schedule = self.dataset.schedule
        online = isinstance(schedule, VersionedSchedule)
        return {
            "lag": schedule.lag if online else None,
            "accumulation": schedule.accumulation if online else None,
            **self.dataset.identity(),
        }
