"""``onlinemix schedule show|export|plot LOG``: a recorded weight schedule."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from onlinemix.cli.common import Commands, command
from onlinemix.loaders.extras import pyplot
from onlinemix.mixing.limits import DEFAULT_REPEAT_BUDGET
from onlinemix.mixing.proxy import WHICH, as_mixture, static_weights, within_budget
from onlinemix.mixing.schedule_log import ScheduleLog, ScheduleLogError, read_schedule

# each command's (or action's) one-line help and its description, as --help shows them
ABOUT = {
    "schedule": (
        "show, export or plot a recorded weight schedule",
        "Read a schedule log written by OnlineMixer(log=...): every weight version of a run.",
    ),
    "show": (
        "summary table: first, min, mean, max, last weight per domain",
        "Print a log's header (the run, its mixture, controller, lag) as text, then each domain's first, "
        "smallest, mean, largest and last weight.",
    ),
    "export": (
        "every version as CSV or JSONL, or static weights as YAML for a mixture file",
        "Write a recorded schedule in another form. csv: a row per step, a column per domain. jsonl: a line per "
        "step. yaml: static weights for another run (the proxy-to-target workflow): the mean over the run's steps"
        " (DoReMi's recipe) or its final weights, as a domains: list, or with --config as a whole mixture file "
        "with those weights (and no mixing: section). The weights are capped by the new run's repeat budget "
        "(--steps long, on the logged mixture's domain sizes): no domain drawn more than --repeat-budget epochs "
        "over, what a cap takes going to the others in proportion; what was capped is said on standard error and "
        "in the file's first line.",
    ),
    "plot": (
        "weights over steps, one line per domain, as a PNG",
        "Draw each domain's weight over the run's steps (needs matplotlib: onlinemix[plot]) and say where the "
        "picture went.",
    ),
}


def _read_log(path: Path) -> ScheduleLog:
    log = read_schedule(path)
    if not len(log.weights):
        raise ScheduleLogError(f"{path} holds no weight versions (the run stopped before its first step)")
    return log


def show(args: argparse.Namespace) -> None:
    """``schedule show``: the header, then each domain's first, smallest, mean, largest and last weight."""
    log = _read_log(args.log)
    header = log.header
    steps = len(log.steps) - 1
    print(f"{args.log}: {steps} optimizer steps (weight versions 0..{steps}), {len(log.domains)} domains")
    print(f"  controller  {header.get('controller', '?')}")
    print(f"  seed        {header.get('seed', '?')}, global batch {header.get('global_batch_size', '?')}")
    print(f"  lag         {header.get('lag', '?')} (batch b drawn with version b // accumulation - lag), "
          f"accumulation {header.get('accumulation', 1)}")  # fmt: skip
    if header.get("config_hash"):
        print(f"  mixture     {header['config_hash'][:16]} (SHA-256 of the mixture file)")
    if header.get("run"):
        print(f"  run         {header['run']}")
    print(f"{'domain':<16} {'first':>8} {'min':>8} {'mean':>8} {'max':>8} {'last':>8}")
    for d, name in enumerate(log.domains):
        column = log.weights[:, d]
        print(
            f"{name:<16} {column[0]:>8.4f} {column.min():>8.4f} {column.mean():>8.4f} "
            f"{column.max():>8.4f} {column[-1]:>8.4f}"
        )


def export(args: argparse.Namespace) -> None:
    """``schedule export``: every version as CSV or JSONL, or static weights as YAML."""
    log = _read_log(args.log)
    if args.format == "yaml":
        recorded = len(log.steps) - 1
        steps = recorded if args.steps is None else args.steps
        weights = static_weights(log, args.weights)
        notes = []
        if args.repeat_budget > 0:
            weights, notes = within_budget(log, weights, steps, args.repeat_budget)
        what = "the mean weights" if args.weights == "mean" else "the final weights"
        about = f"{what} of {args.log} ({log.header.get('controller', '?')} controller, {recorded} steps)"
        if notes:
            about += f"; capped by the repeat budget of {args.repeat_budget:g} epochs over {steps:,} steps: "
            about += ", ".join(notes)
            print(f"capped by the repeat budget ({args.repeat_budget:g} epochs over {steps:,} steps): "
                  + ", ".join(notes), file=sys.stderr)  # fmt: skip
        text = as_mixture(log, weights, about, args.config)
    elif args.format == "csv":
        lines = [",".join(["step", *log.domains])]
        lines += [",".join([str(step), *(repr(float(w)) for w in row)]) for step, row in zip(log.steps, log.weights)]
        text = "\n".join(lines) + "\n"
    else:
        text = "".join(
            json.dumps({"step": int(step), "weights": dict(zip(log.domains, row.tolist()))}) + "\n"
            for step, row in zip(log.steps, log.weights)
        )
    if args.output is None:
        sys.stdout.write(text)
        return
    try:
        args.output.write_text(text)
    except OSError as error:
        raise ValueError(f"cannot write {args.output}: {error.strerror}") from None
    print(f"wrote {args.output}", file=sys.stderr)


def plot(args: argparse.Namespace) -> None:
    """``schedule plot``: each domain's weight over the steps, as a PNG."""
    plt = pyplot()
    log = read_schedule(args.log)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for d, name in enumerate(log.domains):
        axes.plot(log.steps, log.weights[:, d], label=name)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("sampling weight")
    axes.set_title(f"{args.log.name}: {log.header.get('controller', 'schedule')}")
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


def add(commands: Commands) -> None:
    """The ``schedule`` parser and its actions."""
    schedule = command(commands, "schedule", *ABOUT["schedule"], run=None)
    actions = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    showing = command(actions, "show", *ABOUT["show"], show)
    showing.add_argument("log", type=Path, help="the schedule log")
    exporting = command(actions, "export", *ABOUT["export"], export)
    exporting.add_argument("log", type=Path, help="the schedule log")
    exporting.add_argument("--format", choices=["csv", "jsonl", "yaml"], default="csv", help="default csv")
    exporting.add_argument("--weights", choices=WHICH, default="mean", help="yaml: which weights (default mean)")
    exporting.add_argument("--config", type=Path, help="yaml: a mixture file to write again with the exported weights")
    exporting.add_argument(
        "--steps", type=int, help="yaml: the new run's length in optimizer steps (default: the recorded run's)"
    )
    exporting.add_argument(
        "--repeat-budget",
        type=float,
        default=DEFAULT_REPEAT_BUDGET,
        help="yaml: no domain drawn more epochs over the new run than this (0: no cap)",
    )
    exporting.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    plotting = command(actions, "plot", *ABOUT["plot"], plot)
    plotting.add_argument("log", type=Path, help="the schedule log")
    plotting.add_argument("-o", "--output", type=Path, default=Path("weights.png"), help="default weights.png")
