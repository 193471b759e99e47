"""What a run's mixture did, as one flat dict of numbers for the dashboards people already watch.

``OnlineMixing.metrics()`` (``OnlineMixer.metrics``) returns, by the latest published weight version::

    mixing/version                    the weight version the figures are of (the step it was published after)
    mixing/samples_per_second         samples the run drew per second since the last read
    mixing/weight/<domain>            its weight
    mixing/loss/<domain>              its samples' mean training loss since the last read (absent: not drawn)
    mixing/loss_mean/<domain>         the running mean of that loss over the run (an EMA over steps)
    mixing/heldout/<domain>           its smoothed held-out loss, where the trainer gives probes
    mixing/held/<domain>              1 where a limit holds it (the memorisation guard), else 0
    mixing/epochs/<domain>            the epochs of it drawn so far

Names are grouped so that a dashboard shows one panel per kind. Nothing here reads the device: every number
comes from the packet the mixer already copies to the host with each step's weights (asynchronously, on a
GPU), so a read every N steps costs nothing in between, and costs no synchronisation when it happens. On a
GPU the latest published version may trail the step just taken by the copy under way: ``mixing/version``
says which it is. With several ranks, the weights, epochs and holds are every rank's; the training losses are
of the rank's own share of each batch (log rank 0's, as trainers do).
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Sequence

import numpy as np

LOSS_EMA = 0.95  # the running mean's decay per step: about the last 20 steps


class MixingMetrics:
    """The host side of the metrics: updated by the mixer at each publication, read by ``read()``."""

    def __init__(self, names: Sequence[str], samples_per_step: int):
        self.names = list(names)
        self.samples_per_step = samples_per_step
        k = len(self.names)
        self._lock = threading.Lock()  # the publisher thread writes, the trainer reads
        self.version = 0
        self.weights = np.full(k, np.nan)
        self.epochs = np.zeros(k)
        self.held = np.zeros(k)
        self.heldout = np.full(k, np.nan)
        self.loss_sums, self.loss_counts = np.zeros(k), np.zeros(k)  # since the last read
        self.loss_mean = np.full(k, np.nan)
        self._read_at, self._read_version = time.perf_counter(), 0

    def publish(
        self,
        version: int,
        weights: np.ndarray,
        epochs: np.ndarray,
        held: np.ndarray,
        heldout: np.ndarray,
        loss_sums: np.ndarray,
        loss_counts: np.ndarray,
    ) -> None:
        """One published version: its weights and what the step that made it observed."""
        with self._lock:
            self.version = version
            self.weights, self.epochs, self.held, self.heldout = weights, epochs, held, heldout
            self.loss_sums += loss_sums
            self.loss_counts += loss_counts
            drawn = loss_counts > 0
            means = np.divide(loss_sums, np.maximum(loss_counts, 1))
            fresh = drawn & np.isnan(self.loss_mean)
            self.loss_mean = np.where(fresh, means, self.loss_mean)
            self.loss_mean = np.where(drawn & ~fresh, LOSS_EMA * self.loss_mean + (1 - LOSS_EMA) * means,
                                      self.loss_mean)  # fmt: skip

    def read(self) -> dict[str, float]:
        """The figures (see the module docstring); the per-read losses and the throughput start afresh."""
        with self._lock:
            now = time.perf_counter()
            elapsed = now - self._read_at
            steps = self.version - self._read_version
            figures: dict[str, float] = {"mixing/version": float(self.version)}
            if steps > 0 and elapsed > 0:
                figures["mixing/samples_per_second"] = steps * self.samples_per_step / elapsed
            for d, name in enumerate(self.names):
                figures[f"mixing/weight/{name}"] = float(self.weights[d])
                if self.loss_counts[d] > 0:
                    figures[f"mixing/loss/{name}"] = float(self.loss_sums[d] / self.loss_counts[d])
                if not math.isnan(self.loss_mean[d]):
                    figures[f"mixing/loss_mean/{name}"] = float(self.loss_mean[d])
                if not math.isnan(self.heldout[d]):
                    figures[f"mixing/heldout/{name}"] = float(self.heldout[d])
                figures[f"mixing/held/{name}"] = float(self.held[d])
                figures[f"mixing/epochs/{name}"] = float(self.epochs[d])
            self.loss_sums[:], self.loss_counts[:] = 0, 0
            self._read_at, self._read_version = now, self.version
            return figures
