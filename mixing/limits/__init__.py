"""Limits: what stands between the weights a controller proposes and the weights a run draws with.

One class a module, applied in this order by ``build``:

- ``TrustRegion`` (``trust_region``): within ``KL(w ‖ starting weights) ≤ δ`` nats;
- ``MinRatio`` (``min_ratio``): no weight below a fraction of its starting weight;
- ``MemorisationGuard`` (``repeat_budget``, ``heldout_tolerance``, ``heldout_ema``): the repeat budget's caps
  and the held-out probes' holds;
- ``Floor`` (``min_prob``): every weight at least ``min_prob``.

``Limit`` (``base.py``) is the interface a limit of your own implements.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from onlinemix.mixing.limits.base import Limit
from onlinemix.mixing.limits.floor import Floor
from onlinemix.mixing.limits.guard import DEFAULT_REPEAT_BUDGET, MemorisationGuard, budget_cap, water_fill
from onlinemix.mixing.limits.min_ratio import MinRatio
from onlinemix.mixing.limits.settings import LIMIT_KNOBS
from onlinemix.mixing.limits.trust_region import TrustRegion

DEFAULT_TRUST_REGION = 0.5  # nats
GUARD_KNOBS = ("repeat_budget", "heldout_tolerance", "heldout_ema")


def build(defaults: Mapping[str, Any], given: Mapping[str, Any]) -> list[Limit]:
    """The ordered limits a controller applies: its class's ``defaults`` (knob -> value) with the knobs
    ``given`` replacing them. A knob set to ``None`` turns its limit off; a limit none of whose knobs is in
    either mapping is not there (a static controller's defaults are empty: it has no limits unless asked)."""
    unknown = sorted(set(given) - set(LIMIT_KNOBS))
    if unknown:
        raise TypeError(f"unknown limit knob {unknown[0]!r} (the knobs: {', '.join(LIMIT_KNOBS)})")
    knobs = {**defaults, **given}
    limits: list[Limit] = []
    if knobs.get("trust_region") is not None:
        limits.append(TrustRegion(knobs["trust_region"]))
    if knobs.get("min_ratio") is not None:
        limits.append(MinRatio(knobs["min_ratio"]))
    if any(knob in knobs for knob in GUARD_KNOBS):
        guard = {"repeat_budget": DEFAULT_REPEAT_BUDGET, "heldout_tolerance": 0.02, "heldout_ema": 0.5}
        limits.append(MemorisationGuard(**{**guard, **{k: knobs[k] for k in GUARD_KNOBS if k in knobs}}))
    if knobs.get("min_prob"):
        limits.append(Floor(knobs["min_prob"]))
    elif knobs.get("min_prob") is not None:
        Floor(knobs["min_prob"])  # 0 is no floor, but a bad value is still an error
    return limits


__all__ = [
    "DEFAULT_REPEAT_BUDGET",
    "DEFAULT_TRUST_REGION",
    "LIMIT_KNOBS",
    "Floor",
    "Limit",
    "MemorisationGuard",
    "MinRatio",
    "TrustRegion",
    "budget_cap",
    "build",
    "water_fill",
]
