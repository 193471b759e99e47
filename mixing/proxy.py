"""A recorded run's weights for another run: the proxy-to-target workflow.

A small proxy run (fewer steps, a smaller model) records its schedule; a larger run then trains on it, as the
whole schedule stretched to its length (``ScheduledController.from_log(log, steps=N)``) or as static weights
(``static_weights``: the mean over the run, DoReMi's recipe, or the final weights; ``as_mixture``: a mixture file
with them, what ``onlinemix schedule export --format yaml`` writes).

Either way the weights pass the limits that protect the new run: a share the proxy could afford over its few
steps can draw a small domain tens of epochs over in a run four times as long. So static weights for a run of
``steps`` steps are capped by its repeat budget (``within_budget``), the way a live controller's cap does it:
no domain above ``budget · size / (samples per step · steps)``, what that takes going to the others in
proportion.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from onlinemix.loaders.config import load_yaml
from onlinemix.mixing.limits import budget_cap, water_fill
from onlinemix.mixing.schedule_log import ScheduleLog, ScheduleLogError

WHICH = ("mean", "final")


def static_weights(log: ScheduleLog, which: str = "mean") -> np.ndarray:
    """A log's ``"final"`` weights, or the ``"mean"`` over its versions (DoReMi's recipe), summing to 1."""
    if which not in WHICH:
        raise ValueError(f"which must be one of {WHICH}, got {which!r}")
    weights = log.weights[-1] if which == "final" else log.weights.mean(axis=0)
    return weights / weights.sum()


def within_budget(
    log: ScheduleLog, weights: np.ndarray, steps: int, repeat_budget: float
) -> tuple[np.ndarray, list[str]]:
    """Static ``weights`` (one per domain of ``log``) capped for a run of ``steps`` optimizer steps on the logged
    mixture (its domains' sizes and samples per step, from the log's header) so that no domain is drawn past
    ``repeat_budget`` epochs; returns the weights and, for each domain capped, ``"name 0.234 -> 0.059"``."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if not repeat_budget > 0:
        raise ValueError(f"repeat_budget must be a number of epochs > 0, got {repeat_budget!r}")
    sizes = log.header.get("mixture", {}).get("sizes")
    if not sizes or len(sizes) != len(log.domains):
        raise ScheduleLogError("the log's header records no domain sizes (written before they were): cannot cap")
    per_step = int(log.header["global_batch_size"]) * int(log.header.get("accumulation", 1))
    share = repeat_budget * torch.tensor(sizes, dtype=torch.float64) / (per_step * steps)
    cap = budget_cap(share, None)
    capped = water_fill(torch.from_numpy(np.asarray(weights, dtype=np.float64)), cap)
    capped = (capped / capped.sum()).numpy()
    notes = [f"{name} {before:.4f} -> {after:.4f}"
             for name, before, after in zip(log.domains, weights, capped) if after < before - 1e-9]  # fmt: skip
    return capped, notes


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
