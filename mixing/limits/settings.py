"""The knobs that name limits (``trust_region``, ``min_ratio``, ``repeat_budget``, ``heldout_tolerance``,
``heldout_ema``, ``min_prob``) and the checks their values pass.

A mixture file's ``mixing:`` section and a controller's keyword arguments speak in these knobs; each controller
class names its defaults in one mapping (``Controller.default_limits``), and ``limits.build`` turns the two into
the ordered list of limit objects the controller applies.
"""

from __future__ import annotations

from typing import Any

LIMIT_KNOBS = ("trust_region", "min_ratio", "repeat_budget", "heldout_tolerance", "heldout_ema", "min_prob")


def positive_number(value: Any, knob: str, what: str) -> float:
    """``value`` as a float, or a ``ValueError`` naming ``knob`` (a YAML ``true`` is not a number here)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{knob} must be {what} > 0 (or None), got {value!r}")
    return float(value)


def fraction(value: Any, knob: str) -> float:
    """``value`` in ``(0, 1)`` as a float, or a ``ValueError`` naming ``knob``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"{knob} must be a fraction in (0, 1) (or None), got {value!r}")
    return float(value)
