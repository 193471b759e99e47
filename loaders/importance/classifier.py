"""A linear classifier on hashed n-grams as a per-document scorer (PreSelect's, and the quality filters' kind).

PreSelect (Shum et al., 2025) and the fastText quality filters of DCLM and GPT-3 train a cheap classifier on
example documents, positive (the kind worth training on: a target set, or documents whose losses track
downstream ability) and negative (ordinary corpus), and score the whole corpus with it. Here the features are
DSIR's (``NgramHasher``: hashed unigrams and bigrams), each document's n-gram counts divided by their number, and
the model is logistic regression with an L2 penalty, fitted by L-BFGS on the whole set at once. The two classes
weigh the same whatever their sizes, so a document's score, the **log-odds** ``w · x + b``, estimates the log
density ratio ``log p_positive(x) / p_negative(x)``: the same kind of number as a DSIR log importance weight, and
resampled the same way (``importance:`` in the mixture file, ``beta`` tempering it). Unlike DSIR's weight it does
not grow with the document's length.

Scoring is ``Features.sums`` over the weight vector: DSIR's scorer's speed. (The fastText bindings were the
other candidate; their last release is from 2024 and the project is archived.)

**File.** ``HashedClassifier.save`` writes one ``.npz``: ``meta`` (JSON: format, version, hasher settings, L2,
``min_words``, documents of each class) with ``weights`` (one per bucket) and ``bias``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onlinemix.loaders.importance.estimator import Features, ImportanceError, NgramHasher, read_versioned

FORMAT = "onlinemix-classifier"
VERSION = 1


@dataclass
class HashedClassifier:
    """Logistic regression on the hashed n-gram frequencies of a document; ``score`` gives its log-odds."""

    hasher: NgramHasher
    weights: np.ndarray  # (buckets,)
    bias: float
    l2: float = 1e-4
    min_words: int = 1
    documents: dict[str, int] = field(default_factory=dict)  # documents fitted: "positive" and "negative"

    name = "classifier"

    @classmethod
    def fit(
        cls,
        positive: Iterable[str],
        negative: Iterable[str],
        hasher: NgramHasher | None = None,
        l2: float = 1e-4,
        min_words: int = 1,
        max_iterations: int = 200,
    ) -> HashedClassifier:
        """Fit on example documents of the kind to keep (``positive``) and of the rest (``negative``).

        ``l2``: the penalty ``l2 / 2 · |w|²`` on the per-document mean loss (each class weighing half): larger
        keeps the weights small and the scores near 0, for a few hundred examples; smaller fits the examples
        harder. Documents with fewer than ``min_words`` words are left out of the fit (and score ``-inf``)."""
        if not l2 >= 0:
            raise ValueError(f"l2 must be >= 0, got {l2}")
        hasher = hasher or NgramHasher()
        positive, negative = list(positive), list(negative)
        if not positive or not negative:
            raise ImportanceError(
                f"a classifier needs examples of both kinds: got {len(positive)} positive and {len(negative)} negative"
            )
        features = hasher.buckets(positive + negative)
        labels = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
        kept = features.words >= max(min_words, 1)
        if not kept[: len(positive)].any() or not kept[len(positive) :].any():
            raise ImportanceError(f"every positive or every negative document has fewer than {min_words} words")
        matrix = _frequencies(features, hasher.num_buckets)
        weights, bias = _logistic_regression(matrix, labels, kept, l2, max_iterations)
        documents = {"positive": int(kept[: len(positive)].sum()), "negative": int(kept[len(positive) :].sum())}
        return cls(hasher, weights, bias, l2, min_words, documents)

    def score(self, texts: Sequence[str], domain: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(log_odds, words)`` of ``texts`` (any domain: one classifier scores them all); documents with fewer
        than ``min_words`` words get ``-inf``."""
        features = self.hasher.buckets(texts)
        ngrams = _ngram_counts(features)
        scores = features.sums(self.weights) / np.maximum(ngrams, 1) + self.bias
        scores[features.words < max(self.min_words, 1)] = -np.inf
        return scores, features.words

    # -- file ----------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """The classifier's settings and provenance, as saved."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "hasher": self.hasher.settings(),
            "l2": self.l2,
            "min_words": self.min_words,
            "documents": self.documents,
        }

    def fingerprint(self) -> str:
        """A short hash of the classifier (settings and weights): sidecars record which one scored them."""
        digest = hashlib.sha256(json.dumps(self.meta(), sort_keys=True).encode())
        digest.update(self.weights.tobytes())
        digest.update(np.float64(self.bias).tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the classifier to one ``.npz`` file."""
        with open(path, "wb") as file:  # np.savez would append ".npz" to a path without it
            np.savez_compressed(file, meta=np.array(json.dumps(self.meta())), weights=self.weights, bias=self.bias)

    @classmethod
    def load(cls, path: str | Path) -> HashedClassifier:
        """Read a classifier written by ``save`` (its format version checked)."""
        meta, (weights, bias) = read_versioned(path, FORMAT, VERSION, ("weights", "bias"), "a classifier")
        return cls(
            NgramHasher(**meta["hasher"]), weights, float(bias), meta["l2"], meta["min_words"], meta["documents"]
        )


def _ngram_counts(features: Features) -> np.ndarray:
    """The n-grams of each document: its words, plus its bigrams where the hasher makes them."""
    bigrams = np.maximum(features.words - 1, 0) if len(features.bigrams) else 0
    return features.words + bigrams


def _frequencies(features: Features, buckets: int) -> torch.Tensor:
    """A sparse ``(documents, buckets)`` matrix: each document's bucket counts over its number of n-grams."""
    words = features.words
    rows = [np.repeat(np.arange(len(words)), words)]
    columns = [features.unigrams]
    if len(features.bigrams):
        rows.append(np.repeat(np.arange(len(words)), np.maximum(words - 1, 0)))
        columns.append(features.bigrams)
    row, column = np.concatenate(rows), np.concatenate(columns)
    values = 1.0 / np.maximum(_ngram_counts(features), 1)[row]
    indices = torch.from_numpy(np.stack([row, column]))
    return torch.sparse_coo_tensor(
        indices, torch.from_numpy(values), (len(words), buckets), check_invariants=True
    ).coalesce()


def _logistic_regression(
    matrix: torch.Tensor, labels: np.ndarray, kept: np.ndarray, l2: float, max_iterations: int
) -> tuple[np.ndarray, float]:
    """Weights and bias minimising the class-balanced logistic loss plus ``l2 / 2 · |w|²`` (L-BFGS, float64)."""
    y = torch.from_numpy(labels)
    positives = float((labels * kept).sum())
    # each class weighs half, whatever its size: the log-odds then estimate a density ratio, not a class prior
    sample_weight = torch.from_numpy(kept * np.where(labels == 1, 0.5 / positives, 0.5 / (kept.sum() - positives)))
    weights = torch.zeros(matrix.shape[1], 1, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(1, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=max_iterations, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        logits = torch.sparse.mm(matrix, weights).squeeze(1) + bias
        loss = (sample_weight * torch.nn.functional.binary_cross_entropy_with_logits(logits, y, reduction="none")).sum()
        loss = loss + l2 / 2 * (weights * weights).sum()
        loss.backward()
        return loss

    optimizer.step(objective)
    return weights.detach().squeeze(1).numpy().copy(), float(bias.detach())
