"""DSIR importance estimates: hashed n-gram features and the estimator (``estimator``), per-sample weight files
(``sidecars``), online accept/reject in the worker (``acceptance``) and the ``onlinemix importance`` commands
(``cli``)."""

from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator, NgramHasher

__all__ = ["ImportanceError", "ImportanceEstimator", "NgramHasher"]
