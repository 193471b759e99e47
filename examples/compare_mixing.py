"""Same model, same budget, six mixtures: does online mixing pay off on real text?

    python examples/prepare_data.py --out examples/data
    python examples/compare_mixing.py --config examples/data/mixture.yaml --steps 400 --out runs/compare

Runs ``examples/train_gpt.py`` once per method (uniform and size-proportional
static weights, then DoReMi with the uniform run as its reference, ODM, DGA
toward the held-out ``target`` set, and ``importance``: each domain drawn by
DSIR importance toward that target, its best half per epoch, with ODM adding
the importance to its reward; ``importance.yaml`` beside the data), then:

- prints a table of the final validation loss per domain and on the target,
  and how many steps each method needed to reach the best static mixture's
  final target loss (``results.md``);
- draws the target loss over steps and each online method's weights over
  steps (``mixing.png``);
- replays DGA's recorded schedule with no controller and no workers, and
  checks it makes exactly the batches the online run trained on.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import yaml
from onlinemix.loaders import MixedDataset, MixedLoader
from onlinemix.mixing.schedule_log import read_schedule, replay_schedule
from train_gpt import parser as train_parser  # examples/ is on the path when this script runs
from train_gpt import train

from onlinemix.cli import main as onlinemix

STATIC = ("uniform", "proportional")
ONLINE = ("doremi", "odm", "dga", "importance")
IMPORTANCE = {"beta": 1.0, "keep": 0.5}  # the importance run: each domain's epoch is its best half by DSIR weight
IMPORTANCE_MIXING = {"controller": "odm", "warmup": 10, "importance_gain": 0.01}  # ... and ODM adds the weights


def importance_config(config: Path) -> Path:
    """``importance.yaml`` beside ``config``: its domains from uniform weights, drawn by DSIR importance toward
    the held-out target (``val/target.jsonl``), after fitting the estimator and scoring every domain."""
    folder = config.parent
    estimator, sidecars = folder / "est.npz", folder / "importance"
    target = folder / "val" / "target.jsonl"
    onlinemix(["importance", "fit", "--target", str(target), "--config", str(config), "-o", str(estimator)])
    onlinemix(["importance", "score", str(estimator), "--config", str(config), "--out", str(sidecars)])
    raw = yaml.safe_load(config.read_text())
    for domain in raw["domains"]:
        domain["weight"] = 1 / len(raw["domains"])
    raw["importance"] = {"sidecars": sidecars.name, "estimator": estimator.name, **IMPORTANCE}
    raw["mixing"] = IMPORTANCE_MIXING
    path = folder / "importance.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def run(method: str, args: argparse.Namespace) -> dict:
    out = args.out
    config, how = (importance_config(args.config), "config") if method == "importance" else (args.config, method)
    argv = [
        f"--config={config}",
        f"--method={how}",
        f"--steps={args.steps}",
        f"--eval-every={args.eval_every}",
        f"--workers={args.workers}",
        f"--log={out / f'{method}.oms'}",
        f"--checkpoint={out / f'{method}.pt'}",
    ]
    if method == "uniform":
        argv.append(f"--save-model={out / 'reference.pt'}")
    if method == "doremi":
        argv.append(f"--reference={out / 'reference.pt'}")
    return train(train_parser().parse_args(argv))


def steps_to_reach(history: dict, loss: float, name: str) -> int | None:
    """The first evaluated step at which ``name``'s validation loss is at most ``loss``."""
    return next((e["step"] for e in history["evals"] if e["loss"][name] <= loss), None)


def table(histories: dict[str, dict], target: str, steps: int) -> str:
    names = list(next(iter(histories.values()))["evals"][-1]["loss"])
    statics = [method for method in STATIC if method in histories] or list(histories)
    best_static = min(statics, key=lambda m: histories[m]["evals"][-1]["loss"][target])
    bar = histories[best_static]["evals"][-1]["loss"][target]
    header = ["method", *names, f"steps to {bar:.3f} on {target}"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, history in histories.items():
        final = history["evals"][-1]["loss"]
        reached = steps_to_reach(history, bar, target)
        when = "not reached" if reached is None else f"{reached} ({reached / steps:.2f}x)"
        cells = [f"**{loss:.3f}**" if name == target else f"{loss:.3f}" for name, loss in final.items()]
        lines.append("| " + " | ".join([method, *cells, when]) + " |")
    note = f"Validation loss after {steps} steps (nats/token); bar: the best static mixture ({best_static})."
    return note + "\n\n" + "\n".join(lines)


def plot(histories: dict[str, dict], out: Path, target: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 1 + len(ONLINE), figsize=(5 * (1 + len(ONLINE)), 4))
    for method, history in histories.items():
        steps = [e["step"] for e in history["evals"]]
        axes[0].plot(steps, [e["loss"][target] for e in history["evals"]], label=method)
    axes[0].set(title=f"validation loss on {target}", xlabel="step", ylabel="nats / token")
    axes[0].legend()
    for axis, method in zip(axes[1:], ONLINE):
        log = read_schedule(out / f"{method}.oms")
        for d, name in enumerate(log.domains):
            axis.plot(log.steps, log.weights[:, d], label=name)
        axis.set(title=f"{method} weights", xlabel="step", ylim=(0, 1))
        axis.legend()
    figure.tight_layout()
    path = out / "mixing.png"
    figure.savefig(path, dpi=90)
    return path


def replay_matches(config: Path, log: Path, trained: list) -> int:
    """Batches of a controller-less replay of ``log`` (no workers) that equal the recorded run's."""
    dataset = MixedDataset.from_config(config, num_batches=len(trained))
    dataset.schedule = replay_schedule(log, dataset.names)
    replayed = [np.stack([b["domain"], b["index"]], 1).tolist() for b in MixedLoader(dataset, num_workers=0)]
    if len(replayed) != len(trained):
        return 0
    return sum(a == b for a, b in zip(replayed, trained))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=Path("examples/data/mixture.yaml"))
    parser.add_argument("--steps", type=int, default=400, help="optimizer steps per run")
    parser.add_argument("--eval-every", type=int, default=25)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--target", default="target", help="the heldout.yaml set the quality bar is measured on")
    parser.add_argument("--methods", nargs="+", default=[*STATIC, *ONLINE], choices=[*STATIC, *ONLINE])
    parser.add_argument("--out", type=Path, default=Path("runs/compare"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    histories = {method: run(method, args) for method in args.methods}
    report = table(histories, args.target, args.steps)
    print("\n" + report)
    (args.out / "results.md").write_text(report + "\n")
    if all(method in histories for method in ONLINE):
        print(f"wrote {plot(histories, args.out, args.target)}")
    if "dga" in histories:
        same = replay_matches(args.config, args.out / "dga.oms", histories["dga"]["trained"])
        print(f"replay of {args.out / 'dga.oms'} without a controller: {same}/{args.steps} batches identical")


if __name__ == "__main__":
    main()
