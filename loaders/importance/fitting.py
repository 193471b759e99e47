"""Fitting a scorer from a target and a mixture's domains (``onlinemix importance fit``).

DSIR's estimator and the n-gram classifier both read the target's documents and a uniform sample of every
domain's (``--raw-docs`` per domain, drawn from the whole domain, not its first lines). CoLoR-Filter's pair of
models is trained instead (``onlinemix.color_filter_training``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from onlinemix.loaders.convert import input_files, read_documents
from onlinemix.loaders.importance.classifier import HashedClassifier
from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator, NgramHasher
from onlinemix.loaders.importance.sidecars import domain_texts
from onlinemix.loaders.sources import Source


def read_files(paths: Sequence[Path], field: str, what: str) -> list[str]:
    """Every document of ``paths`` (files or folders: JSONL, text, ...), with a progress bar named ``what``."""
    files = input_files(paths, "*")
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc=what) as bar:
        return list(read_documents(files, field, bar))


def raw_sample(sources: dict[str, Source], documents: int, seed: int, field: str) -> dict[str, list[str]]:
    """Up to ``documents`` texts of every domain, drawn uniformly at random from the whole domain."""
    rng = np.random.default_rng(seed)
    raw = {}
    for name, source in tqdm(sources.items(), desc="raw domains", unit="domain"):
        size = len(source)
        indices = np.sort(rng.choice(size, min(documents, size), replace=False))
        raw[name] = domain_texts(source, indices, field)
    return raw


def target_of_domain(sources: dict[str, Source], name: str, field: str) -> list[str]:
    """Every text of domain ``name``, as the target."""
    if name not in sources:
        raise ImportanceError(f"--target-domain {name!r} is not a domain of the mixture ({', '.join(sources)})")
    source = sources[name]
    return domain_texts(source, np.arange(len(source)), field)


def fit_ngram_scorer(
    kind: str,
    target: list[str],
    raw: dict[str, list[str]],
    hasher: NgramHasher,
    *,
    alpha: float = 1.0,
    min_words: int = 1,
    negative: list[str] | None = None,
    l2: float = 1e-4,
) -> ImportanceEstimator | HashedClassifier:
    """DSIR's estimator (``kind="dsir"``: each domain's distribution and the target's) or the classifier
    (``"classifier"``: the target's documents against ``negative``, or against the domains' sample)."""
    if kind == "dsir":
        if negative:
            raise ImportanceError("--negative is for --scorer classifier (DSIR fits each domain's own distribution)")
        return ImportanceEstimator.fit(target, raw, hasher, alpha, min_words)
    if kind != "classifier":
        raise ImportanceError(f"unknown n-gram scorer {kind!r} (dsir or classifier)")
    others = negative if negative else [text for texts in raw.values() for text in texts]
    return HashedClassifier.fit(target, others, hasher, l2, min_words)
