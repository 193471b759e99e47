"""Per-domain statistics of a DSIR estimator's sidecars (``onlinemix importance report``)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from onlinemix.loaders.importance.estimator import ImportanceEstimator
from onlinemix.loaders.importance.sidecars import domain_texts, load_sidecar
from onlinemix.loaders.sources import Source


def effective_sample_size(log_weights: np.ndarray) -> float:
    """``(Σ w)² / Σ w²`` of ``w = exp(log_weights)``, computed without overflow; ``-inf`` entries are 0."""
    finite = log_weights[np.isfinite(log_weights)]
    if not len(finite):
        return 0.0
    scaled = np.exp(finite - finite.max())
    return float(scaled.sum() ** 2 / (scaled**2).sum())


@dataclass
class DomainReport:
    """One domain's row: samples scored, those too short to score, the mean log weight, the effective sample size
    of the raw and tempered weights, the KL reduction of a top selection, the divergence from the target, and
    the prior weight it implies; ``log_weights``: the finite ones, for a histogram."""

    name: str
    samples: int
    short: int
    mean: float
    ess: float
    tempered_ess: float
    kl_reduction: float
    divergence: float
    prior: float
    log_weights: np.ndarray


def domain_reports(
    estimator: ImportanceEstimator,
    sources: dict[str, Source],
    sidecars: Path,
    field: str = "text",
    top: float = 0.1,
    beta: float = 0.5,
    prior_temperature: float = 1.0,
) -> list[DomainReport]:
    """A ``DomainReport`` per domain, from its sidecar in ``sidecars``."""
    prior = dict(zip(sources, estimator.domain_prior(list(sources), prior_temperature)))
    rows = []
    for name, source in sources.items():
        weights = load_sidecar(sidecars, name, source, field)
        finite = np.isfinite(weights)
        k = max(1, int(top * finite.sum()))
        chosen = np.sort(np.argsort(-np.where(finite, weights, -np.inf), kind="stable")[:k])
        selected = estimator.hasher.counts(domain_texts(source, chosen, field))
        rows.append(
            DomainReport(
                name,
                len(weights),
                int((~finite).sum()),
                float(weights[finite].mean()) if finite.any() else float("nan"),
                effective_sample_size(weights),
                effective_sample_size(beta * weights),
                estimator.kl_reduction(selected, name),
                estimator.divergence(name),
                prior[name],
                weights[finite],
            )
        )
    return rows
