"""``MixedLoader``: a ``DataLoader`` over a ``MixedDataset`` that can checkpoint and resume exactly.

The loader counts the batches it has handed to the training loop. Its
``state_dict()`` is the plan position after the last of them — ``(batch,
cursors)``, a few integers — so a run resumed from it continues with the
very next batch, whatever ``num_workers`` either run used. Batches the
DataLoader had prefetched but not yet handed out are simply made again.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from typing import Any

from onlinemix.loaders.channel import VersionedSchedule, WeightsChannel
from onlinemix.loaders.dataset import MixedDataset
from onlinemix.loaders.plan import PlanState, fast_forward
from torch.utils.data import DataLoader

STATE_VERSION = 1


class MixedLoader:
    """Iterate a ``MixedDataset`` through a stock ``DataLoader``, with ``state_dict`` / ``load_state_dict``.

    The keyword arguments are the ``DataLoader``'s own and mean what they mean
    there. ``num_workers`` only changes speed, never the batches. With
    ``persistent_workers=True`` the workers survive from one ``iter()`` to the
    next and still start where the loader stands (the start position lives in
    shared memory).
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
    ):
        self.dataset = dataset
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
        self._position = dataset.start_state()
        self._handed_out = 0  # batches yielded since _position was last brought up to date
        self._dataloader: DataLoader | None = None

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
        self.dataset.set_start(self.position)
        if self._dataloader is None or not self._dataloader_kwargs["persistent_workers"]:
            self._warn_if_prefetch_outruns_weights()
            self._dataloader = DataLoader(self.dataset, **self._dataloader_kwargs)
        for batch in self._dataloader:
            self._handed_out += 1
            yield batch

    def _warn_if_prefetch_outruns_weights(self) -> None:
        """With live weights, a worker can only make the batches whose weights are published: about
        ``lag x accumulation`` ahead of training. A DataLoader that prefetches more leaves workers waiting."""
        schedule, workers = self.dataset.schedule, self._dataloader_kwargs["num_workers"]
        if not (workers and isinstance(schedule, VersionedSchedule) and isinstance(schedule.table, WeightsChannel)):
            return
        factor = self._dataloader_kwargs["prefetch_factor"] or 2  # the DataLoader's default
        depth, ahead = workers * factor, schedule.lag * schedule.accumulation
        if depth > ahead:
            warnings.warn(
                f"the DataLoader prefetches {depth} batches (num_workers={workers} x prefetch_factor={factor}) but the "
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
        return {"version": STATE_VERSION, "position": position.state_dict(), "mixture": self.identity()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at the checkpointed position; the next ``iter()`` starts there."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported loader state version {state.get('version')!r} (expected {STATE_VERSION})")
        ours = self.identity()
        for key, value in state["mixture"].items():
            if ours.get(key) != value:
                raise ValueError(
                    f"checkpoint does not match this mixture: {key} was {value!r} when saved, is now {ours.get(key)!r}"
                )
        self._position = PlanState.from_state_dict(state["position"])
        self._handed_out = 0

    def identity(self) -> dict[str, Any]:
        """What a checkpoint's mixture must share with this one (world size and workers may differ)."""
        spec = self.dataset.spec
        return {
            "domains": list(self.dataset.names),
            "sizes": [int(n) for n in spec.sizes],
            "caps": [int(c) for c in spec.caps],
            "seed": spec.seed,
            "global_batch_size": spec.global_batch_size,
            "sampling": spec.sampling,
            "order": ["samples" if shards is None else f"shards:{len(shards)}" for shards in spec.shards],
        }
