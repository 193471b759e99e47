"""The quality suite's results: each scenario's table (final objective, paired differences, steps to the bar,
compute, gain per extra run) and plot, from the runs ``run.py`` kept under ``<out>/runs/``."""

from __future__ import annotations

import json
from pathlib import Path

import data as suite_data
import numpy as np
import scenarios as suite
import train as trainer

ONLINE = ("odm", "ado", "doremi", "doremi-target", "dga", "bandit")  # online (the rest are static)


def online_method(label: str) -> bool:
    """Whether a result's weights move during the run (an online method, with or without the guard or a prior,
    or a proxy's schedule)."""
    return label.removesuffix(suite.UNGUARDED).removesuffix(suite.WITH_PRIOR) in ONLINE or (
        label.startswith((suite.PROXY, suite.ACROSS)) and not label.startswith(suite.ACROSS_EXPORT)
    )


def slug(point: str) -> str:
    """A grid point's label as a file name."""
    return point.replace(" ", "_").replace("/", "-").replace("=", "")


def objective(history: dict, scenario: suite.Scenario) -> tuple[np.ndarray, np.ndarray]:
    """``(steps, objective)`` at every evaluation of a run."""
    steps = np.array([e["step"] for e in history["evals"]])
    values = np.array([np.mean([e["loss"][name] for name in scenario.objective]) for e in history["evals"]])
    return steps, values


def steps_to_reach(steps: np.ndarray, values: np.ndarray, bar: float) -> float | None:
    """The first step at which the curve reaches ``bar``, interpolated linearly between evaluations."""
    for i in range(1, len(steps)):
        if values[i] <= bar:
            if values[i - 1] <= bar:
                return float(steps[i - 1])
            fraction = (values[i - 1] - bar) / (values[i - 1] - values[i])
            return float(steps[i - 1] + fraction * (steps[i] - steps[i - 1]))
    return None


def load_runs(out: Path, scenario: suite.Scenario, label: str, seeds: int) -> list[dict]:
    folder = out / "runs" / scenario.name
    if label.startswith("grid: "):
        paths = [folder / "grid" / f"{slug(label[6:])}-seed{s}.json" for s in range(seeds)]
    else:
        paths = [folder / label / f"seed{s}.json" for s in range(seeds)]
    return [json.loads(p.read_text()) for p in paths if p.exists()]


def compute(out: Path, scenario: suite.Scenario, label: str, histories: list[dict], steps: int) -> float:
    """What one result of ``label`` cost to train, in plain runs (``steps`` steps of the global batch, forward and
    backward): its own run (with what the method adds each step: reference forwards, alignment gradients, the
    guard's probes) plus what it needs first: the grid's search for the bar, a reference model for DoReMi."""
    plain = steps * suite_data.GLOBAL_BATCH * trainer.FORWARD_BACKWARD
    own = float(np.mean([h["compute"] for h in histories])) / plain
    if label.startswith("grid: "):  # the bar: every point searched on seed 0, uniform and proportional included
        searched = [f"grid: {point}" for point in scenario.grid] + ["uniform", "proportional"]
        return sum(load_runs(out, scenario, name, 1)[0]["compute"] for name in searched) / plain
    if label.startswith((suite.PROXY, suite.EXPORT)):  # the short run that made the schedule, trained first
        folder = out / "runs" / scenario.name / "proxies"
        proxies = [folder / f"{scenario.proxy}-seed{s}.json" for s in range(len(histories))]
        short = [json.loads(p.read_text())["compute"] for p in proxies if p.exists()]
        return own + float(np.mean(short)) / plain
    if label.startswith(("doremi-target", "bandit")):  # a model of the specific set, trained first
        references = sorted((out / "runs" / "references").glob("target-seed*.json"))
        return own + json.loads(references[0].read_text())["compute"] / plain
    if label.startswith("doremi"):  # its reference: the uniform mixture's model, a whole run
        return own + 1.0
    if label == "color-filter":  # its two models, trained and run over every window first
        setup = out / "importance" / f"{scenario.name}-color-filter" / "setup-compute.json"
        return own + json.loads(setup.read_text())["window_passes"] / plain
    return own


def best_grid_point(out: Path, scenario: suite.Scenario) -> str:
    finals = {}
    for point in scenario.grid:
        runs = load_runs(out, scenario, f"grid: {point}", 1)
        if runs:
            finals[point] = objective(runs[0], scenario)[1][-1]
    for baseline in ("uniform", "proportional"):  # they are grid points too
        runs = load_runs(out, scenario, baseline, 1)
        if runs:
            finals[baseline] = objective(runs[0], scenario)[1][-1]
    return min(finals, key=finals.get)


def report(out: Path, scenario: suite.Scenario, seeds: int, steps: int, extras: dict) -> str:
    """The scenario's table (and plot): every method's final objective, its gap to the bar paired by seed,
    and the steps its mean curve needs to reach the bar."""
    best = best_grid_point(out, scenario)
    best_label = best if best in ("uniform", "proportional") else f"grid: {best}"
    labels = [*scenario.methods, *scenario.proxy_labels]
    labels += [best_label] if best_label not in labels else []
    results = {label: load_runs(out, scenario, label, seeds) for label in labels}
    bar_finals = np.array([objective(h, scenario)[1][-1] for h in results[best_label]])
    bar = float(bar_finals.mean())
    what = "mean held-out loss over its domains" if len(scenario.objective) > 1 else "held-out target loss"
    lines = [
        f"### {scenario.name}",
        "",
        f"Objective: {what} (nats per byte, {trainer.EVAL_WINDOWS} windows per set), after {steps} steps; "
        f"mean ± standard deviation over {seeds} seeds. **The bar**: the final objective of the best static "
        f"mixture (**{best}**, the best of {len(scenario.grid) + 2} searched on seed 0, then run on every seed), "
        f"{bar:.4f}. *vs bar*, *vs uniform*: the difference with that method's run of the same seed (model "
        "initialisation and sample order), mean ± standard deviation. *Steps to the bar*: where the mean curve "
        "over seeds first reaches it (interpolated between evaluations), and on how many seeds each run's own "
        "curve does. *Compute*: training compute in plain runs, counting what the method needs first (the "
        "grid's search, a reference model) and what it adds each step (alignment gradients, reference forwards, "
        "the memorisation guard's probes). *Gain per extra run*: the loss below uniform (paired, mean) per plain "
        "run of compute beyond the run itself (`free` where that is under 0.05 runs; negative: it lost).",
        "",
        "| method | kind | final objective | vs bar (paired) | vs uniform (paired) | steps to the bar | compute "
        "| gain per extra run | time per run |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    uniform_finals = np.array([objective(h, scenario)[1][-1] for h in results.get("uniform", [])])
    rows, ratios = [], {}
    for label, histories in results.items():
        if not histories:
            continue
        curves = np.array([objective(h, scenario)[1] for h in histories])
        eval_steps = objective(histories[0], scenario)[0]
        finals = curves[:, -1]
        paired = finals - bar_finals[: len(finals)]
        versus_uniform = finals[: len(uniform_finals)] - uniform_finals[: len(finals)]
        reached = steps_to_reach(eval_steps, curves.mean(axis=0), bar)
        seeds_reaching = sum(steps_to_reach(eval_steps, curve, bar) is not None for curve in curves)
        if reached is None:
            when = f"not reached ({seeds_reaching}/{len(curves)} seeds)"
        else:
            ratios[label] = reached / steps
            when = f"{reached:.0f} ({reached / steps:.2f}x; {seeds_reaching}/{len(curves)} seeds)"
        kind = (
            "proxy" if label.startswith((suite.PROXY, suite.EXPORT)) else "online" if online_method(label) else "static"
        )
        spread = f" ± {finals.std(ddof=1):.4f}" if len(finals) > 1 else ""
        seconds = np.mean([h["seconds"] for h in histories])
        cost = compute(out, scenario, label, histories, steps)
        per_run = _gain_per_extra_run(versus_uniform, cost)
        rows.append((finals.mean(), f"| {label} | {kind} | {finals.mean():.4f}{spread} | {_paired(paired)} | "
                     f"{_paired(versus_uniform)} | {when} | {cost:.2f} | {per_run} | {seconds:.0f} s |"))  # fmt: skip
    lines += [row for _, row in sorted(rows)]
    online = {label: ratio for label, ratio in ratios.items() if online_method(label)}
    if online:
        label = min(online, key=online.get)
        verdict = "meets" if online[label] <= 0.75 else "does not meet"
        lines += ["", f"Best online method: **{label}**, at the bar after {online[label]:.2f}x the steps: {verdict} "
                  "the 0.75x bar."]  # fmt: skip
    else:
        lines += ["", "No online method's mean curve reaches the bar within the run: the 0.75x bar is not met."]
    if extras.get("divergences"):
        nearest = sorted(extras["divergences"].items(), key=lambda kv: kv[1])[:3]
        lines += ["", "Closest domains to the target (KL of hashed n-grams): "
                  + ", ".join(f"{n} {v:.2f}" for n, v in nearest)]  # fmt: skip
    plot(out, scenario, results, bar)
    return "\n".join(lines)


def _gain_per_extra_run(versus_uniform: np.ndarray, cost: float) -> str:
    """The loss below uniform per plain run of compute beyond the run itself (a dash without uniform's runs)."""
    if not len(versus_uniform):
        return "–"
    extra = cost - 1
    return "free" if extra < 0.05 else f"{-versus_uniform.mean() / extra:+.4f}"


def _paired(differences: np.ndarray) -> str:
    """``mean ± sd`` of paired differences (just the mean for one seed, a dash for none)."""
    if not len(differences):
        return "–"
    spread = f" ± {differences.std(ddof=1):.4f}" if len(differences) > 1 else ""
    return f"{differences.mean():+.4f}{spread}"


def plot(out: Path, scenario: suite.Scenario, results: dict[str, list[dict]], bar: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    online = [label for label in results if online_method(label) and results[label]]
    panels = 1 + len(online)
    columns = min(4, panels)  # the objective, then each online method's weights, four to a row
    rows = -(-panels // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4 * rows), squeeze=False)
    axes = axes.ravel()
    for unused in axes[panels:]:
        unused.set_visible(False)
    for label, histories in results.items():
        if not histories:
            continue
        curves = np.array([objective(h, scenario)[1] for h in histories])
        steps = objective(histories[0], scenario)[0]
        mean = curves.mean(axis=0)
        line = axes[0].plot(steps[1:], mean[1:], label=label)[0]
        if len(curves) > 1:
            axes[0].fill_between(steps[1:], curves.min(0)[1:], curves.max(0)[1:], color=line.get_color(), alpha=0.15)
    axes[0].axhline(bar, color="black", linewidth=0.8, linestyle=":")
    axes[0].set(title=f"{scenario.name}: objective (mean over seeds)", xlabel="step", ylabel="nats per byte")
    finals = [np.mean([objective(h, scenario)[1][-1] for h in hs]) for hs in results.values() if hs]
    axes[0].set_ylim(min(finals) - 0.05, max(finals) + 0.4)
    axes[0].legend(fontsize=7)
    for axis, label in zip(axes[1:], online):
        history = results[label][0]
        steps = [s for s, _ in history["weights"]]
        weights = np.array([w for _, w in history["weights"]])
        if weights.shape[1] <= 10:
            for d, name in enumerate(history["names"]):
                axis.plot(steps, weights[:, d], label=name)
            axis.legend(fontsize=7)
        else:  # many domains: the share of the clusters that are mostly the target's kind
            axis.plot(steps, np.sort(weights, axis=1)[:, ::-1][:, :32].sum(1), label="top 32 clusters")
            axis.legend(fontsize=7)
        axis.set(title=f"{label} weights (seed 0)", xlabel="step", ylim=(0, 1))
    figure.tight_layout()
    figure.savefig(out / f"{scenario.name}.png", dpi=80)
    plt.close(figure)
