"""The weights channel: trainer -> DataLoader workers, versioned by optimizer step.

Version ``v`` is the weight vector in force after ``v`` optimizer steps
(version 0: the initial weights). **Batch ``b`` is drawn with version
``max(0, b // accumulation - lag)``** (``accumulation``: loader batches per
optimizer step, 1 unless gradients are accumulated over micro-batches), so
the plan stays a pure function of ``(seed, b, weight history)``: a worker that
runs ahead of training waits for the version it needs instead of guessing, and
a recorded history replays exactly.

``WeightsChannel`` keeps the latest ``capacity`` versions in a shared-memory
ring (torch tensors: they travel to workers under fork and spawn, and
``persistent_workers`` see new versions without restarting). The trainer
side publishes; the workers' side reads through ``VersionedSchedule``, the
plan's ``WeightSchedule``. ``ReplaySchedule`` serves a recorded history the
same way, with no trainer at all.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import torch

# Covers the DataLoader's prefetch depth (prefetch_factor 2 x num_workers) up to 8 workers, so workers never
# wait on training; the weights in force are then 16 optimizer steps old, a small part of a run of thousands.
DEFAULT_LAG = 16
DEFAULT_TIMEOUT = 600.0  # seconds a worker waits for weights before it gives up
SUM_TOLERANCE = 1e-3  # how far from 1 a published weight vector may sum (float32 controllers round)


class WeightsTimeout(RuntimeError):
    """A worker waited too long for a version the trainer had not published."""


class WeightTable:
    """Something that knows weight versions: ``latest()`` and ``rows(first, last)``."""

    num_domains: int

    def latest(self) -> int:
        """The newest step whose weights are here (-1 before the first)."""
        raise NotImplementedError

    def rows(self, first: int, last: int) -> np.ndarray:
        """Versions ``first .. last`` (inclusive, all known) as a ``(rows, k)`` float64 array."""
        raise NotImplementedError

    def wait_for(self, version: int) -> None:
        """Return once ``version`` is known (at once, for a table known in advance)."""


class WeightsChannel(WeightTable):
    """A shared-memory ring of the latest weight versions, written by the trainer, read by workers.

    Args:
        initial: version 0, the weights before the first step.
        capacity: versions kept. Must exceed ``lag`` plus how far the slowest
            worker can lag behind training (its prefetch depth); 4096 is plenty.
        timeout: seconds a reader waits for an unpublished version.
    """

    def __init__(self, initial: np.ndarray | torch.Tensor, capacity: int = 4096, timeout: float = DEFAULT_TIMEOUT):
        initial = torch.as_tensor(initial, dtype=torch.float64).cpu()
        if initial.ndim != 1:
            raise ValueError(f"initial weights must be a vector, got shape {tuple(initial.shape)}")
        if not (abs(initial.sum().item() - 1.0) <= SUM_TOLERANCE and initial.min().item() >= 0):
            raise ValueError(f"initial weights are not a distribution (finite, >= 0, summing to 1): {initial.tolist()}")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0 seconds, got {timeout}")
        self.num_domains = initial.numel()
        self._row_shape = (self.num_domains,)
        self.capacity = capacity
        self.timeout = timeout
        self._ring = torch.zeros(capacity, self.num_domains, dtype=torch.float64).share_memory_()
        self._latest = torch.zeros(1, dtype=torch.int64).share_memory_()
        self._ring[0] = initial
        # Versions the trainer has stepped to in this process (publication may follow a moment later, from a
        # CUDA copy): what a loader in the same process may wait for without a deadlock.
        self.promised = 0
        self._views()

    def _views(self) -> None:
        # numpy views of the shared tensors: reading or writing a few numbers through numpy costs
        # ~1 µs, through torch indexing ~10. Made again in each process (see __getstate__).
        self._ring_np, self._latest_np = self._ring.numpy(), self._latest.numpy()

    def __getstate__(self) -> dict[str, Any]:
        # Under spawn the shared tensors travel as handles; numpy views would travel as copies.
        return {key: value for key, value in self.__dict__.items() if not key.endswith("_np")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._views()

    def latest(self) -> int:
        """The newest published version."""
        return self._latest_np.item()

    def publish(self, version: int, weights: np.ndarray | torch.Tensor) -> None:
        """Make ``weights`` version ``version`` (must be exactly ``latest() + 1``)."""
        # Once per training step, in the training loop: each check here is the cheapest form of itself
        # (isinstance on torch.Tensor alone costs ~165 ns, np.shape ~275; the whole call ~0.5 µs).
        expected = self._latest_np.item() + 1
        if version != expected:
            raise ValueError(f"versions are published in order: expected {expected}, got {version}")
        if type(weights) is not np.ndarray:
            weights = weights.detach().cpu().numpy() if isinstance(weights, torch.Tensor) else np.asarray(weights)
        if weights.shape != self._row_shape:
            raise ValueError(f"expected {self.num_domains} weights, got shape {weights.shape}")
        # What a worker reads must be a distribution: NaN or inf make the sum fail the test, all zeros too
        # (the plan would read such a row as "every domain exhausted" and end the stream).
        total = weights.sum()
        if not (abs(total - 1.0) <= SUM_TOLERANCE and weights.min() >= 0):
            raise ValueError(
                f"weights of version {version} are not a distribution (finite, >= 0, summing to 1): {weights.tolist()}"
            )
        self._ring_np[version % self.capacity] = weights  # converted to float64 as it is copied
        self._latest_np[0] = version  # written last: readers never see a half-written row
        self.promised = max(self.promised, version)

    def rows(self, first: int, last: int) -> np.ndarray:
        latest = self.latest()
        if last > latest or first < 0:
            raise ValueError(f"versions {first}..{last} are not all published (latest {latest})")
        if first <= latest - self.capacity:
            raise ValueError(
                f"weight version {first} was overwritten (the channel keeps {self.capacity} versions, latest "
                f"{latest}); raise capacity"
            )
        low, high = first % self.capacity, last % self.capacity
        if low <= high:  # the common case: no wrap around the ring's end
            return self._ring_np[low : high + 1].copy()
        return self._ring_np[np.arange(first, last + 1) % self.capacity]  # fancy indexing copies

    def wait_for(self, version: int) -> None:
        """Block until ``version`` is published; ``WeightsTimeout`` after ``timeout`` seconds."""
        if self.latest() >= version:
            return
        deadline = time.monotonic() + self.timeout
        pause = 1e-4
        while self.latest() < version:
            if time.monotonic() > deadline:
                raise WeightsTimeout(
                    f"waited {self.timeout:g} s for the weights of step {version} (latest published: "
                    f"{self.latest()}); is the training loop calling mixer.step() after each optimizer step?"
                )
            time.sleep(pause)
            pause = min(pause * 2, 0.01)

    def state_dict(self, last_versions: int) -> dict[str, Any]:
        """The newest ``last_versions`` versions (what batches still to come may need)."""
        latest = self.latest()
        first = max(0, latest - last_versions + 1)
        return {"first": first, "weights": self.rows(first, latest).tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the recent weight versions of a checkpoint."""
        weights = np.asarray(state["weights"], dtype=np.float64)
        first = int(state["first"])
        for offset, row in enumerate(weights):
            self._ring[(first + offset) % self.capacity] = torch.from_numpy(row)
        self._latest[0] = self.promised = first + len(weights) - 1


class ReplayTable(WeightTable):
    """A recorded history: version ``v`` is row ``v``.

    Past the last row, ``past_end`` decides: ``"error"`` (default) fails with a message naming the
    version asked for and where the record ends; ``"hold"`` keeps the last row for every later version
    (e.g. to train on past the end of a proxy run's schedule).
    """

    PAST_END = ("error", "hold")

    def __init__(self, weights: np.ndarray, past_end: str = "error", source: str = "the recorded schedule"):
        self.weights = np.asarray(weights, dtype=np.float64)
        if self.weights.ndim != 2 or not len(self.weights):
            raise ValueError(f"{source} holds no weight versions")
        if past_end not in self.PAST_END:
            raise ValueError(f"past_end must be one of {self.PAST_END}, got {past_end!r}")
        self.num_domains = self.weights.shape[1]
        self.past_end, self.source = past_end, source

    def latest(self) -> int:
        """The newest version it can give: the last recorded step, or every step with ``past_end="hold"``."""
        return (1 << 62) if self.past_end == "hold" else len(self.weights) - 1

    def wait_for(self, version: int) -> None:
        if version > self.latest():
            raise ValueError(
                f"weight version {version} is past the end of {self.source} (versions 0..{len(self.weights) - 1}: a "
                f"run of {len(self.weights) - 1} steps); replay with past_end='hold' to keep its last weights beyond it"
            )

    def rows(self, first: int, last: int) -> np.ndarray:
        return self.weights[np.minimum(np.arange(first, last + 1), len(self.weights) - 1)]


class VersionedSchedule:
    """The plan's ``WeightSchedule`` over a table of versions.

    Batch ``b`` belongs to optimizer step ``b // accumulation`` and uses version
    ``max(0, b // accumulation - lag)``: every micro-batch of a step gets the
    same weights, and a step's micro-batches can all be fetched before it runs.
    """

    def __init__(self, table: WeightTable, lag: int = DEFAULT_LAG, accumulation: int = 1):
        if lag < 1:
            raise ValueError(f"lag must be >= 1 (batch b uses the weights of step b - lag), got {lag}")
        if accumulation < 1:
            raise ValueError(f"accumulation (loader batches per optimizer step) must be >= 1, got {accumulation}")
        self.table = table
        self.lag = lag
        self.accumulation = accumulation

    def version(self, batches: np.ndarray | int) -> np.ndarray | int:
        """The weight version batch(es) ``batches`` are drawn with."""
        if isinstance(batches, int):
            return max(0, batches // self.accumulation - self.lag)
        return np.maximum(0, np.asarray(batches) // self.accumulation - self.lag)

    def weights_for(self, start: int, stop: int) -> np.ndarray:
        """The weights of each batch in ``batches``: version ``max(0, b // accumulation - lag)``."""
        first = self.version(start)
        self.table.wait_for(first)
        # Serve every batch whose version is already known: a worker plans them in one go.
        unknown = (self.table.latest() + self.lag + 1) * self.accumulation  # the first batch of an unknown version
        stop = max(start + 1, min(stop, unknown))
        rows = self.table.rows(first, self.version(stop - 1))
        if len(rows) == stop - start:  # a version per batch (no accumulation, past the first lag batches)
            return rows
        return rows[self.version(np.arange(start, stop)) - first]
