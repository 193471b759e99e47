"""A recorded run's weights for another run: the proxy-to-target workflow.

A small proxy run (fewer steps, a smaller model) records its schedule; a larger run then trains on it, as the
whole schedule stretched to its length (``ScheduledController.from_log(log, steps=N)``) or as static weights
(``static_weights``: the mean over the run, DoReMi's recipe, or the final weights; ``as_mixture``: a mixture file
with them, what ``onlinemix schedule export --format yaml`` writes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import yaml

from onlinemix.loaders.config import load_yaml
from onlinemix.mixing.schedule_log import ScheduleLog

WHICH = ("mean", "final")


def static_weights(log: ScheduleLog, which: str = "mean") -> np.ndarray:
    """A log's ``"final"`` weights, or the ``"mean"`` over its versions (DoReMi's recipe), summing to 1."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    weights = log.weights[-1] if which == "final" else log.weights.mean(axis=0)
    return weights / weights.sum()


def as_mixture(log: ScheduleLog, weights: np.ndarray, about: str, config: Path | None = None) -> str:
    """``weights`` (one per domain of ``log``) as YAML: a ``domains:`` list of weights to paste, or, with
    ``config``, that whole mixture file with its domains' weights replaced and no ``mixing:`` section (the
    weights are static now). ``about``: the comment line it starts with."""
    named = dict(zip(log.domains, np.round(weights, 6).tolist()))
    header = f"# {about}\n"
    if config is None:
        lines = [f"  - {{name: {name}, weight: {weight}}}" for name, weight in named.items()]
        return (
            header
            + "# paste each weight into its domain of a mixture file (or pass --config MIXTURE)\ndomains:\n"
            + ("\n".join(lines) + "\n")
        )
    raw = load_yaml(config)
    names = [domain.get("name") for domain in raw.get("domains", [])]
    if sorted(names) != sorted(named):
        raise ValueError(f"{config} has the domains {names}, the log has {list(named)}")
    for domain in raw["domains"]:
        domain["weight"] = named[domain["name"]]
    raw.pop("mixing", None)
    return header + yaml.safe_dump(raw, sort_keys=False)
