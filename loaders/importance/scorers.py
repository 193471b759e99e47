"""Per-document scorers behind ``onlinemix importance score``: one interface, several kinds.

A scorer is any object with ``score(texts, domain) -> (scores, words)`` (a float64 score per document, higher
for documents worth more, ``-inf`` for those it cannot score; and each document's word count), ``fingerprint()``
(a short string that changes whenever its scores would) and ``min_words``. Its scores go into the same sidecars
(``sidecars.py``), which the stream resamples (``importance:`` in the mixture file) by ``exp(beta · score)``: a
score should be on the scale of a log density ratio.

Built in: ``dsir`` (``ImportanceEstimator``: hashed n-gram distributions of the target and of each domain),
``classifier`` (``HashedClassifier``: logistic regression on hashed n-grams, PreSelect's kind) and
``color-filter`` (``ConditionalLossScorer``: the loss reduction of a causal LM fine-tuned on the target over the
same LM before it, CoLoR-Filter's). Anything else is ``package.module:Class``, whose ``Class.load(path)`` returns
a scorer.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from onlinemix.loaders.importance.classifier import FORMAT as CLASSIFIER_FORMAT
from onlinemix.loaders.importance.classifier import HashedClassifier
from onlinemix.loaders.importance.color_filter import FORMAT as COLOR_FILTER_FORMAT
from onlinemix.loaders.importance.color_filter import ConditionalLossScorer
from onlinemix.loaders.importance.estimator import FORMAT as DSIR_FORMAT
from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator


class Scorer(Protocol):
    """What ``onlinemix importance score`` needs of a scorer (see the module docstring)."""

    min_words: int  # documents with fewer words score -inf (and are counted as short)

    def score(self, texts: Sequence[str], domain: str) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, words)`` of ``texts`` from ``domain``: float64, higher for documents worth more."""
        ...

    def fingerprint(self) -> str:
        """A short string that changes whenever the scores would."""
        ...


SCORERS = {"dsir": ImportanceEstimator, "classifier": HashedClassifier, "color-filter": ConditionalLossScorer}
FORMATS = {DSIR_FORMAT: "dsir", CLASSIFIER_FORMAT: "classifier", COLOR_FILTER_FORMAT: "color-filter"}


def file_kind(path: str | Path) -> str:
    """Which built-in scorer wrote ``path`` (read from the file's own ``meta``)."""
    try:
        with open(path, "rb") as file:
            first = file.read(1)
        if first == b"{":  # a JSON file that names models (CoLoR-Filter's)
            found = json.loads(Path(path).read_text()).get("format")
        else:
            with np.load(path, allow_pickle=False) as data:
                found = json.loads(str(data["meta"])).get("format")
    except (OSError, KeyError, ValueError, AttributeError) as error:
        raise ImportanceError(f"{path}: not a scorer file of onlinemix ({error})") from None
    if found not in FORMATS:
        raise ImportanceError(f"{path}: unknown scorer format {found!r} (known: {sorted(FORMATS)})")
    return FORMATS[found]


def load_scorer(path: str | Path, kind: str | None = None) -> Scorer:
    """The scorer in ``path``: of ``kind`` (``dsir``, ``classifier`` or ``package.module:Class``), or of the kind
    the file says (``None``)."""
    kind = kind or file_kind(path)
    if kind in SCORERS:
        return SCORERS[kind].load(path)
    module_name, colon, class_name = kind.partition(":")
    if not colon or not module_name or not class_name:
        raise ImportanceError(f"unknown scorer {kind!r}: use one of {sorted(SCORERS)} or package.module:Class")
    try:
        cls = getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as error:
        raise ImportanceError(f"scorer {kind!r}: {error}") from None
    scorer = cls.load(path)
    missing = [name for name in ("score", "fingerprint", "min_words") if not hasattr(scorer, name)]
    if missing:
        raise ImportanceError(f"scorer {kind!r} has no {', '.join(missing)} (see onlinemix.loaders.importance.scorers)")
    return scorer
