"""Per-document importance scores: DSIR's hashed n-gram estimator (``estimator``), a linear classifier on the same
features (``classifier``), the interface that picks one (``scorers``), per-sample score files (``sidecars``),
online accept/reject in the worker (``acceptance``) and the ``onlinemix importance`` commands (``cli``)."""

from onlinemix.loaders.importance.classifier import HashedClassifier
from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator, NgramHasher
from onlinemix.loaders.importance.scorers import load_scorer

__all__ = ["HashedClassifier", "ImportanceError", "ImportanceEstimator", "NgramHasher", "load_scorer"]
