"""Weights on the probability simplex: checking them and the static rules that make them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

SUM_TOLERANCE = 1e-3  # how far from 1 given weights may sum before it is an error


def temperature_weights(sizes: Sequence[int], temperature: float) -> np.ndarray:
    """``p_d ∝ size_d ** (1 / T)``: T = 1 is size-proportional, large T tends to uniform."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    sizes = np.asarray(sizes, dtype=np.float64)
    # In log space, so that large sizes and small temperatures do not overflow.
    logits = np.log(sizes) / temperature
    weights = np.exp(logits - logits.max())
    return weights / weights.sum()


def check_weights(weights: Sequence[float], names: Sequence[str], what: str = "weights") -> np.ndarray:
    """Validate a weight vector over named domains and return it normalised exactly to sum 1.

    Errors name the offending domain: a negative, NaN or infinite weight, all
    zeros, a wrong length, or a sum further than ``SUM_TOLERANCE`` from 1.
    """
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(names),):
        raise ValueError(
            f"{what}: expected {len(names)} weights (one per domain {list(names)}), got shape {weights.shape}"
        )
    for name, weight in zip(names, weights):
        if not np.isfinite(weight):
            raise ValueError(f"{what}: domain {name!r} has non-finite weight {weight}")
        if weight < 0:
            raise ValueError(f"{what}: domain {name!r} has negative weight {weight}")
    total = weights.sum()
    if total <= 0:
        raise ValueError(f"{what}: all weights are zero")
    if abs(total - 1.0) > SUM_TOLERANCE:
        raise ValueError(f"{what}: weights sum to {total:.6g}, not 1 (tolerance {SUM_TOLERANCE})")
    return weights / total
