"""Importance inside the stream without a sidecar: accept or reject each sample in the worker.

For a domain with no precomputed weights, the worker scores a sample when
the plan hands it over and keeps it with probability::

    a(s) = min(1, exp(beta · (s − tau)))

where ``s`` is the sample's DSIR log importance weight per word (so that long
and short documents compare) and ``tau`` the ``quantile`` of ``s`` over a
warm-up sample of the domain, fixed when the dataset is built. A rejected
slot reads the next candidate, up to ``max_reads``; after that it keeps the
last one (and says so in the ``reads`` field).

Everything is a pure function of ``(seed, domain, sample id)``, so restarts
and any number of workers or ranks reproduce the same choices:

- sample ``i`` is *acceptable* iff ``u(seed, domain, i) < a(s_i)``, one
  uniform hash per sample, drawn once and for all: the accepted samples are a
  fixed random subset (Poisson sampling with inclusion ``a(s_i)``);
- the slot whose plan sample is ``i0`` reads, after a rejection, candidate
  ``r`` = a uniform hash of ``(seed, domain, i0, r)`` over the domain.

Each batch carries ``reads`` (candidates read per slot: 1 when the first was
accepted) and ``importance`` (the kept sample's log weight); the mean of
``reads`` is the cost of the selection, ``1 / mean(a)`` in expectation.
"""

from __future__ import annotations

import math

import numpy as np

from onlinemix.loaders import rng
from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator
from onlinemix.loaders.importance.sidecars import domain_texts
from onlinemix.loaders.sources import Source


class OnlineAcceptance:
    """Accept/reject of one domain's samples by importance, scored in the worker."""

    def __init__(
        self,
        estimator: ImportanceEstimator,
        name: str,
        domain: int,
        source: Source,
        seed: int,
        beta: float,
        tau: float = 0.0,
        max_reads: int = 32,
        field: str = "text",
    ):
        if not (math.isfinite(beta) and beta >= 0) or max_reads < 1:
            raise ValueError(f"need beta >= 0 and max_reads >= 1, got beta={beta}, max_reads={max_reads}")
        self.estimator, self.name, self.source, self.field = estimator, name, source, field
        self.beta, self.tau, self.max_reads = beta, tau, max_reads
        self._key = rng.key(seed, rng.TAG_ACCEPT, domain)

    def calibrate(self, quantile: float = 0.5, warmup: int = 512) -> OnlineAcceptance:
        """Set ``tau`` to the ``quantile`` of the per-word log weights of ``warmup`` samples drawn uniformly."""
        if not 0 <= quantile <= 1 or warmup < 1:
            raise ValueError(f"need 0 <= quantile <= 1 and warmup >= 1, got {quantile}, {warmup}")
        draws = np.unique(rng.uniform(rng.key(self._key, -1), np.arange(warmup)) * len(self.source))
        per_word, _ = self.score(draws.astype(np.int64))
        finite = per_word[np.isfinite(per_word)]
        if not len(finite):
            raise ImportanceError(f"domain {self.name!r}: none of {len(draws)} warm-up samples is long enough to score")
        self.tau = float(np.quantile(finite, quantile))
        return self

    def score(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(per-word log weight, log weight)`` of samples ``ids`` (``-inf`` for samples too short)."""
        log_weights, words = self.estimator.score(domain_texts(self.source, ids, self.field), self.name)
        return log_weights / np.maximum(words, 1), log_weights

    def acceptable(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Whether each sample is kept, and its log weight."""
        per_word, log_weights = self.score(ids)
        with np.errstate(over="ignore"):
            probability = np.minimum(1.0, np.exp(self.beta * (per_word - self.tau)))
        return rng.uniform(self._key, ids) < probability, log_weights

    def choose(self, first: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """For the plan's samples ``first``: ``(kept sample, candidates read, its log weight)`` per slot."""
        first = np.asarray(first, dtype=np.int64)
        chosen, reads, log_weights = first.copy(), np.zeros(len(first), np.int64), np.zeros(len(first))
        pending = np.arange(len(first))
        for attempt in range(1, self.max_reads + 1):
            kept, log_weights[pending] = self.acceptable(chosen[pending])
            reads[pending] += 1
            pending = pending[~kept]
            if not pending.size or attempt == self.max_reads:
                break
            u = rng.uniform(rng.key(self._key, attempt), first[pending])
            chosen[pending] = (u * len(self.source)).astype(np.int64)
        return chosen, reads, log_weights
