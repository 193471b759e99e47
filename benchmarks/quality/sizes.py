"""Does the ranking hold when the model grows, and does a small model's mixture carry to a larger one?

    .venv/bin/python benchmarks/quality/run.py --out runs/quality                    # the small size, first
    .venv/bin/python benchmarks/quality/sizes.py --small runs/quality --out runs/quality-medium

It reads the small size's results (``--small``): for each scenario (default *targeted+specific* and
*tiny-specific*, where online mixing won at the small size and a proxy could memorise), the best static grid
point the small size found — the transfer a user would make, not searched again — and the best online method at
the small size among those that need no reference model (ODM, ADO, DGA). At ``--size`` (medium: 1.26M
parameters, 9x the small model's) it trains, per seed:

- ``uniform``, the small size's grid point (``grid: ...``) and the online method itself;
- the proxy workflow at this size: a quarter-length run of the online method, its schedule stretched to the
  whole run (``proxy-<method>``) and its mean weights exported (``export-<method>``);
- the proxy across sizes: the *small* model's whole run of the online method, its schedule replayed on this
  model (``small-<method>``) and exported (``small-export-<method>``): RegMix's and DoReMi's route, a small
  model finding the mixture for a large one.

Compute is counted in runs of this size: a run's own, plus the run that made its schedule (or, for the grid's
point, the small size's search that chose it), a small run costing its share of parameters (the FLOPs of a
window scale with them). It writes ``<out>/sizes.md`` (a table per
scenario, with the small size's gains beside this size's) and a plot per scenario, and keeps every run: running
it again resumes. Out of CI: an hour or more on two cores (``--workers``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as suite_data
import results
import scenarios as suite
import train as trainer
from run import execute, run_base

CANDIDATES = ("odm", "ado", "dga")  # online methods that need no reference model (at another size: none trained)


def best_online(small: Path, scenario: suite.Scenario, seeds: int) -> str:
    """The online method with the lowest mean final objective at the small size."""
    finals = {}
    for label in scenario.methods:
        runs = results.load_runs(small, scenario, label, seeds) if label in CANDIDATES else []
        if runs:
            finals[label] = np.mean([results.objective(run, scenario)[1][-1] for run in runs])
    if not finals:
        raise SystemExit(f"{small}: no results of {', '.join(CANDIDATES)} in {scenario.name}: run run.py first")
    return min(finals, key=finals.get)


def plan(args: argparse.Namespace, root: Path, chosen: dict[str, suite.Scenario]) -> tuple[list, list, dict]:
    """Two waves (the second replays the first's schedules) and, per scenario, what was chosen at the small size."""
    runs, first, second, picked = args.out / "runs", [], [], {}
    for name in args.scenarios:
        scenario = chosen[name]
        point = results.best_grid_point(args.small, scenario)
        grid_label = point if point in ("uniform", "proportional") else f"grid: {point}"
        online = best_online(args.small, scenario, args.seeds)
        picked[name] = {"grid": grid_label, "online": online}
        for seed in range(args.seeds):
            base = run_base(args, root, name, seed)
            for label in dict.fromkeys(["uniform", grid_label, online]):
                task = {**base, "method": label, "out": str(runs / name / label / f"seed{seed}.json")}
                if label.startswith("grid: "):
                    task["weights"] = scenario.grid[point]
                    task["out"] = str(runs / name / "grid" / f"{results.slug(point)}-seed{seed}.json")
                first.append(task)
            short = runs / name / "proxies" / f"{online}-seed{seed}.json"  # a quarter-length run at this size
            whole = runs / name / "small" / f"{online}-seed{seed}.json"  # the small model's whole run
            first.append({**base, "method": online, "steps": args.steps // suite.PROXY_SHRINK, "out": str(short),
                          "log": str(short.with_suffix(".oms"))})  # fmt: skip
            first.append({**base, "method": online, "size": "small", "out": str(whole),
                          "log": str(whole.with_suffix(".oms"))})  # fmt: skip
            for prefixes, log in (((suite.PROXY, suite.EXPORT), short), ((suite.ACROSS, suite.ACROSS_EXPORT), whole)):
                for prefix in prefixes:
                    label = prefix + online
                    second.append({**base, "method": label, "proxy": str(log.with_suffix(".oms")),
                                   "out": str(runs / name / label / f"seed{seed}.json")})  # fmt: skip
    return first, second, picked


def cost(args: argparse.Namespace, scenario: suite.Scenario, label: str, histories: list[dict], online: str) -> float:
    """Training compute of ``label``'s results in plain runs of this size (see the module docstring)."""
    plain = args.steps * suite_data.GLOBAL_BATCH * trainer.FORWARD_BACKWARD
    own = float(np.mean([h["compute"] for h in histories])) / plain
    folder = args.out / "runs" / scenario.name
    if label.startswith((suite.PROXY, suite.EXPORT)):
        made = [folder / "proxies" / f"{online}-seed{s}.json" for s in range(len(histories))]
        return own + results_mean(made, "compute") / plain
    share = trainer.parameters("small") / trainer.parameters(args.size)
    if label.startswith(suite.ACROSS):  # ACROSS_EXPORT starts with it too
        made = [folder / "small" / f"{online}-seed{s}.json" for s in range(len(histories))]
        return own + share * results_mean(made, "compute") / plain
    if label.startswith("grid: "):  # the search that chose the point: every point and the two baselines, small
        return own + share * (len(scenario.grid) + 2)
    return own


def results_mean(paths: list[Path], key: str) -> float:
    import json

    return float(np.mean([json.loads(path.read_text())[key] for path in paths if path.exists()]))


def report(args: argparse.Namespace, scenario: suite.Scenario, picked: dict[str, str]) -> str:
    """The scenario's table: each result at this size, paired with uniform's; the small size's gain beside it."""
    online = picked["online"]
    labels = ["uniform", picked["grid"], online, *(prefix + online for prefix in (suite.PROXY, suite.EXPORT,
              suite.ACROSS, suite.ACROSS_EXPORT))]  # fmt: skip
    found = {label: results.load_runs(args.out, scenario, label, args.seeds) for label in dict.fromkeys(labels)}
    small = {label: results.load_runs(args.small, scenario, label, args.seeds) for label in found}
    finals = {label: np.array([results.objective(h, scenario)[1][-1] for h in runs]) for label, runs in found.items()}
    small_finals = {label: np.array([results.objective(h, scenario)[1][-1] for h in runs])
                    for label, runs in small.items()}  # fmt: skip
    uniform, small_uniform = finals["uniform"], small_finals["uniform"]
    curve = np.array([results.objective(h, scenario)[1] for h in found["uniform"]]).mean(0)
    steps = results.objective(found["uniform"][0], scenario)[0]
    seconds = np.mean([h["seconds"] for runs in found.values() for h in runs if h is not None])
    lines = [
        f"### {scenario.name}, {args.size} ({trainer.parameters(args.size) / 1e6:.2f}M parameters)",
        "",
        f"Objective as in the small suite's table, after {args.steps} steps; mean ± standard deviation over "
        f"{args.seeds} seeds. *vs uniform*: paired by seed. *Small size*: the same method's result at the small "
        f"size ({trainer.parameters('small') / 1e6:.2f}M parameters) against its uniform, from the small suite "
        "(for `small-...`: the small model's own online run, whose schedule is replayed here). *Compute*: in plain "
        f"runs of this size. One run took {seconds / 60:.1f} minutes on average here. The last sixth of the run "
        f"lowered uniform's objective by {curve[-2] - curve[-1]:.3f} (from step {steps[-2]} to {steps[-1]}; the "
        f"first sixth by {curve[0] - curve[1]:.3f}).",
        "",
        "| method | final objective | vs uniform (paired) | compute | small size: vs uniform (paired) |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, runs in found.items():
        if not len(runs):
            lines.append(f"| {label} | not run | | | |")
            continue
        values = finals[label]
        paired = values[: len(uniform)] - uniform[: len(values)]
        spread = f" ± {values.std(ddof=1):.4f}" if len(values) > 1 else ""
        if label.startswith(suite.ACROSS):
            counterpart = small_finals.get(online, np.array([]))
        else:
            counterpart = small_finals.get(label, np.array([]))
        small_paired = counterpart[: len(small_uniform)] - small_uniform[: len(counterpart)]
        lines.append(
            f"| {label} | {values.mean():.4f}{spread} | {_paired(paired)} | "
            f"{cost(args, scenario, label, runs, online):.2f} | {_paired(small_paired)} |"
        )
    bar = float(np.mean(finals[picked["grid"]])) if len(finals[picked["grid"]]) else float(np.mean(uniform))
    results.plot(args.out, scenario, {label: runs for label, runs in found.items() if runs}, bar)
    return "\n".join(lines)


def _paired(differences: np.ndarray) -> str:
    if not len(differences):
        return "–"
    spread = f" ± {differences.std(ddof=1):.4f}" if len(differences) > 1 else ""
    return f"{differences.mean():+.4f}{spread}"


def main(argv: list[str] | None = None) -> int:
    names = ["targeted+specific", "tiny-specific", "small-specific", "targeted", "general"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", type=Path, default=Path("runs/quality"), help="the small size's results folder")
    parser.add_argument("--out", type=Path, default=Path("runs/quality-medium"), help="this study's results folder")
    parser.add_argument("--size", choices=sorted(set(trainer.SIZES) - {"small"}), default="medium",
                        help="the larger model (default medium; large on a GPU)")  # fmt: skip
    parser.add_argument("--scenarios", nargs="+", choices=names, default=["targeted+specific", "tiny-specific"])
    parser.add_argument("--seeds", type=int, default=3, help="seeds (default 3)")
    parser.add_argument("--steps", type=int, default=600, help="steps per run (default 600: the small size's)")
    parser.add_argument("--workers", type=int, help="runs at a time (default: one per core; 1 on a GPU)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = parser.parse_args(argv)
    args.workers = args.workers or (os.cpu_count() or 1 if args.device == "cpu" else 1)
    if not (args.small / "data").is_dir():
        parser.error(f"{args.small} holds no small-size results: run benchmarks/quality/run.py --out {args.small}")
    started = time.perf_counter()
    root = suite_data.build(args.small / "data")  # the same data as the small size (built there, checked here)
    args.out.mkdir(parents=True, exist_ok=True)
    chosen = suite.scenarios(root, args.small)
    first, second, picked = plan(args, root, chosen)
    execute(first, args.workers)
    execute(second, args.workers)
    sections = [report(args, chosen[name], picked[name]) for name in args.scenarios]
    summary = "\n\n".join(sections)
    (args.out / "sizes.md").write_text(summary + "\n")
    print("\n" + summary + f"\n\nwrote {args.out / 'sizes.md'} ({(time.perf_counter() - started) / 60:.1f} min)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
