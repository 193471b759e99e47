"""Does online mixing give a better model for the same compute? The quality suite, in one command.

    .venv/bin/python benchmarks/quality/run.py                       # every scenario, 3 seeds, CPU
    .venv/bin/python benchmarks/quality/run.py --scenarios targeted --seeds 1 --steps 400   # a quick look

For each scenario (see ``scenarios.py``) it trains a tiny byte-level GPT once per method and seed:
the static baselines (uniform, size-proportional, a small grid searched on seed 0 whose best point
is then run on every seed), and every online method once per seed with fixed settings. Every run is
evaluated ``EVAL_POINTS`` times on ``EVAL_WINDOWS`` held-out windows per set, spread over each set.
It writes, per scenario, ``<out>/<scenario>.md`` (the table: the objective's mean and spread over
seeds, and the steps each method needs to reach the best grid point's final loss) and
``<out>/<scenario>.png`` (the objective over steps, and each online method's weights), and
``<out>/summary.md``. Finished runs are kept (``<out>/runs/``): running the command again resumes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import data as suite_data
import scenarios as suite
import train as trainer
from results import best_grid_point, report, slug

from onlinemix.cli import main as onlinemix
from onlinemix.loaders.importance import ImportanceEstimator
from onlinemix.mixing.limits import DEFAULT_REPEAT_BUDGET
from onlinemix.mixing.proxy import static_weights, within_budget
from onlinemix.mixing.schedule_log import read_schedule

REFERENCE_STEPS = 400  # the target reference model: steps on the specific set (kept at its best on the other)


# ----------------------------------------------------------------------------- one task (in a worker process)


def run_task(task: dict) -> str:
    """Train one run (or a reference model) described by ``task``; write its history. Returns a log line."""
    out = Path(task["out"])
    if out.exists():
        return f"kept {out}"
    root = Path(task["root"])
    started = time.perf_counter()
    if task["kind"] == "reference":
        history = trainer.train_reference(
            root / "target/specific.bin", root / "target/align.bin", suite_data.SEQ_LEN, task["seed"], task["steps"],
            Path(task["model"]), task["size"], task["device"],
        )  # fmt: skip
    else:
        scenario = suite.scenarios(root, Path(task["results"]))[task["scenario"]]
        weights, schedule = task.get("weights"), None
        if task.get("proxy") and task["method"].startswith((suite.EXPORT, suite.ACROSS_EXPORT)):
            weights = _exported(Path(task["proxy"]), task["steps"])  # mean weights, capped for this run's length
        elif task.get("proxy"):  # the proxy's schedule, stretched to this run's length
            schedule = Path(task["proxy"])
        chosen = suite.method(task["method"], scenario, weights, task.get("initial"), schedule)
        if task.get("config"):
            chosen.config = Path(task["config"])
        if chosen.align:
            chosen.align = str(root / chosen.align)
        heldout = {name: _heldout_path(root, name) for name in scenario.heldout}
        references = {name: Path(path) for name, path in task.get("references", {}).items()}
        probes = {name: root / path for name, path in scenario.domain_heldout.items()}
        save_model = Path(task["model"]) if task.get("model") else None
        log = Path(task["log"]) if task.get("log") else None
        history = trainer.train(
            root / scenario.config, chosen, task["seed"], task["steps"], heldout, references, probes, save_model,
            task["size"], task["device"], log,
        )  # fmt: skip
    trainer.save(history, out)
    return f"{out.relative_to(out.parents[3])}: {time.perf_counter() - started:.0f} s"


def _exported(proxy: Path, steps: int) -> list[float]:
    """A proxy run's mean weights as static weights for a run of ``steps`` steps, capped by its repeat budget: what
    ``onlinemix schedule export --format yaml --steps STEPS`` writes."""
    log = read_schedule(proxy)
    weights, _ = within_budget(log, static_weights(log, "mean"), steps, DEFAULT_REPEAT_BUDGET)
    return weights.tolist()


def _heldout_path(root: Path, name: str) -> Path:
    return root / "target/heldout.bin" if name == "target" else root / "heldout" / f"{name}.bin"


# ----------------------------------------------------------------------------- planning


# log weights and CoLoR-Filter's loss reductions sum over a document's n-grams or tokens; the classifier's log-odds
# do not
SELECTION_BETA = {"dsir": 1.0, "classifier": 4.0, "color-filter": 1.0}
# CoLoR-Filter's models: GPT-2s of the suite's small model size, the prior trained PRIOR_STEPS steps of 32 windows
# drawn uniformly from the scenario's domains, then fine-tuned TUNING_STEPS steps of 16 pieces of the specific set
PRIOR_STEPS, TUNING_STEPS, TUNING_TOKENS = 400, 30, 256  # tuning: about two passes over the specific set


def selection_setup(root: Path, scenario: suite.Scenario, out: Path, scorer: str = "dsir") -> Path:
    """Fit ``scorer`` (DSIR, the n-gram classifier, CoLoR-Filter's models) on the specific set, score the scenario's
    domains, and write the mixture that resamples by it: uniform weights, each domain's epochs its best half by
    score (Gumbel-top-k on ``beta · score``; the classifier's ``beta`` is larger because its log-odds span a few
    nats where DSIR's log weights span tens to hundreds)."""
    import yaml

    folder = out / "importance" / (scenario.name if scorer == "dsir" else f"{scenario.name}-{scorer}")
    config = root / scenario.config
    sidecars, mixture = folder / "sidecars", folder / "importance.yaml"
    if not mixture.exists():
        folder.mkdir(parents=True, exist_ok=True)
        if scorer == "color-filter":  # one pair of models for every scenario; a domain scored for one is kept
            model = color_filter_models(root, out / "importance" / "color-filter")
            reuse_sidecars(out / "importance", f"-{scorer}", sidecars, scenario_domains(config))
        else:
            model = folder / ("est.npz" if scorer == "dsir" else f"{scorer}.npz")
            onlinemix(["importance", "fit", "--scorer", scorer, "--target", str(root / "target/specific.jsonl"),
                       "--config", str(config), "-o", str(model), "--raw-docs", "2000"])  # fmt: skip
        workers = ["--workers", str(os.cpu_count() or 1)] if scorer == "color-filter" else []
        onlinemix(["importance", "score", str(model), "--config", str(config), "--out", str(sidecars), *workers])
        if scorer == "color-filter":  # what the selection cost before any run: the models, and scoring every window
            models = json.loads((model.parent / "models-compute.json").read_text())["window_passes"]
            scored = [sidecars / f"{name}.importance.npy" for name in scenario_domains(config)]
            windows = sum(len(np.load(path, mmap_mode="r")) for path in scored)
            passes = models + 2 * trainer.FORWARD * windows
            (folder / "setup-compute.json").write_text(json.dumps({"window_passes": passes}))
        raw = yaml.safe_load(config.read_text())
        for domain in raw["domains"]:
            domain["path"] = str((root / domain["path"]).resolve())
            domain["weight"] = 1 / len(raw["domains"])
        raw["importance"] = {"sidecars": str(sidecars.resolve()), "beta": SELECTION_BETA[scorer], "keep": 0.5}
        if scorer == "dsir":
            raw["importance"]["estimator"] = str(model.resolve())
        mixture.write_text(yaml.safe_dump(raw, sort_keys=False))
    return mixture


def scenario_domains(config: Path) -> list[str]:
    import yaml

    return [domain["name"] for domain in yaml.safe_load(config.read_text())["domains"]]


def reuse_sidecars(importance: Path, suffix: str, sidecars: Path, names: list[str]) -> None:
    """Copy the sidecars of ``names`` another scenario has scored with the same scorer (``<scenario><suffix>``):
    the scenarios share their general domains' files. ``score`` checks each copy's fingerprints (the scorer's and
    the source's) and scores afresh any that does not match."""
    import shutil

    sidecars.mkdir(parents=True, exist_ok=True)
    for other in sorted(importance.glob(f"*{suffix}/sidecars")):
        for name in names:
            for path in other.glob(f"{name}.importance.*"):
                if other != sidecars and not (sidecars / path.name).exists():
                    shutil.copy2(path, sidecars / path.name)


def color_filter_models(root: Path, folder: Path) -> Path:
    """CoLoR-Filter's pair of models, trained once for the suite: the prior, a byte-level GPT-2 of the suite's small
    model size trained on windows drawn uniformly from the six general domains, and the same fine-tuned on the
    specific set (``importance fit --scorer color-filter``). Returns the file naming both; writes
    ``models-compute.json`` beside it (their training, in window passes)."""
    import torch
    import transformers

    from onlinemix.color_filter_training import byte_level_tokenizer, train_causal_lm
    from onlinemix.loaders.build import build_sources
    from onlinemix.loaders.config import MixtureConfig
    from onlinemix.loaders.importance.sidecars import domain_texts

    model = folder / "color-filter.json"
    if model.exists():
        return model
    mixture = MixtureConfig.load(root / "general.yaml")
    sources = build_sources(mixture)
    generator = np.random.default_rng(0)
    texts = []
    for source in sources:  # as many windows of each domain as the prior trains on in all, at most
        count = min(len(source), PRIOR_STEPS * suite_data.GLOBAL_BATCH // len(sources) + 1)
        texts += domain_texts(source, generator.choice(len(source), count, replace=False), "text")
    tokenizer = byte_level_tokenizer()
    size = trainer.SIZES["small"]
    gpt = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=TUNING_TOKENS, n_embd=size["width"],
                                  n_layer=size["layers"], n_head=size["heads"])  # fmt: skip
    torch.manual_seed(0)
    prior = train_causal_lm(transformers.GPT2LMHeadModel(gpt), tokenizer, texts, PRIOR_STEPS,
                            batch_size=suite_data.GLOBAL_BATCH, lr=3e-3, desc="CoLoR-Filter prior")  # fmt: skip
    prior.save_pretrained(folder / "prior")
    tokenizer.save_pretrained(folder / "prior")
    onlinemix(["importance", "fit", "--scorer", "color-filter", "--prior", str(folder / "prior"), "--target",
               str(root / "target/specific.jsonl"), "-o", str(model), "--steps", str(TUNING_STEPS), "--lr", "1e-3",
               "--max-tokens", str(TUNING_TOKENS)])  # fmt: skip
    tuning_windows = TUNING_STEPS * 16 * -(-TUNING_TOKENS // mixture.seq_len)  # 16 pieces a step, at most
    passes = trainer.FORWARD_BACKWARD * (PRIOR_STEPS * suite_data.GLOBAL_BATCH + tuning_windows)
    (folder / "models-compute.json").write_text(json.dumps({"window_passes": passes}))
    return model


def importance_setup(root: Path, scenario: suite.Scenario, out: Path) -> tuple[Path, dict[str, float]]:
    """DSIR's mixture (``selection_setup``) and each domain's divergence from the target (for ``closest``)."""
    mixture = selection_setup(root, scenario, out)
    fitted = ImportanceEstimator.load(out / "importance" / scenario.name / "est.npz")
    return mixture, {name: fitted.divergence(name) for name in fitted.raw}


def plan(args: argparse.Namespace, root: Path) -> tuple[list[dict], list[dict], dict]:
    """Two waves of tasks (the second needs the first: the grid's best point, DoReMi's reference models)."""
    runs = args.out / "runs"
    first, second, extras = [], [], {}
    setups = {}
    for name, scenario in suite.scenarios(root).items():  # fit the importance estimators first: grids use them
        if name in args.scenarios and ("importance" in scenario.methods or "closest" in scenario.methods):
            setups[name] = importance_setup(root, scenario, args.out)
    chosen = suite.scenarios(root, args.out)
    for seed in range(args.seeds):
        if any({"doremi-target", "bandit"} & set(chosen[s].methods) for s in args.scenarios):
            model = args.out / "references" / f"target-seed{seed}.pt"
            out = runs / "references" / f"target-seed{seed}.json"
            first.append({"kind": "reference", "seed": seed, "steps": REFERENCE_STEPS, "root": str(root),
                          "model": str(model), "out": str(out), **hardware(args)})  # fmt: skip
    for name in args.scenarios:
        scenario = chosen[name]
        importance, divergences = setups.get(name, (None, None))
        extras[name] = {"divergences": divergences}
        for seed in range(args.seeds):
            base = run_base(args, root, name, seed)
            references = {"target": str(args.out / "references" / f"target-seed{seed}.pt"),
                          "uniform": str(args.out / "models" / name / f"uniform-seed{seed}.pt")}  # fmt: skip
            for method in scenario.methods:
                task = {**base, "method": method, "out": str(runs / name / method / f"seed{seed}.json")}
                if method == "uniform":
                    task["model"] = references["uniform"]
                if method == "closest":
                    task["method"], task["weights"] = "closest", _closest(root, scenario, divergences)
                if method == "importance":
                    task["method"], task["config"] = "uniform", str(importance)
                    task["label"] = "importance"
                if method in ("classifier", "color-filter"):
                    task["method"], task["label"] = "uniform", method
                    task["config"] = str(selection_setup(root, scenario, args.out, method))
                task["references"] = references
                if method.endswith(suite.WITH_PRIOR) or (method == "bandit" and scenario.features is not None):
                    task["initial"] = scenario.grid["DSIR prior, ~32 clusters"]
                # after the models they read: the uniform run's, the target reference
                (second if method.startswith(("doremi", "bandit")) else first).append(task)
            if scenario.proxy is not None:  # the proxy workflows: a short run first, then its schedule or its export
                proxy = runs / name / "proxies" / f"{scenario.proxy}-seed{seed}.json"
                log = proxy.with_suffix(".oms")
                first.append({**base, "method": scenario.proxy, "steps": args.steps // suite.PROXY_SHRINK,
                              "out": str(proxy), "log": str(log)})  # fmt: skip
                for label in scenario.proxy_labels:
                    second.append({**base, "method": label, "proxy": str(log),
                                   "out": str(runs / name / label / f"seed{seed}.json")})  # fmt: skip
            if seed == 0:
                for point, weights in scenario.grid.items():
                    first.append({**base, "method": f"grid: {point}", "weights": weights,
                                  "out": str(runs / name / "grid" / f"{slug(point)}-seed0.json")})  # fmt: skip
    return first, second, extras


def hardware(args: argparse.Namespace) -> dict:
    """What every task trains with: the model's size and the device."""
    return {"size": args.size, "device": args.device}


def run_base(args: argparse.Namespace, root: Path, scenario: str, seed: int) -> dict:
    """The keys every training run of ``scenario`` and ``seed`` shares (its method and output are added)."""
    return {"kind": "run", "scenario": scenario, "seed": seed, "steps": args.steps, "root": str(root),
            "results": str(args.out), **hardware(args)}  # fmt: skip


def best_grid_tasks(args: argparse.Namespace, root: Path) -> list[dict]:
    """The best grid point of each scenario (by its seed-0 objective), on the other seeds."""
    tasks = []
    chosen = suite.scenarios(root, args.out)
    for name in args.scenarios:
        scenario = chosen[name]
        point = best_grid_point(args.out, scenario)
        if point not in scenario.grid:  # uniform or proportional: already run on every seed
            continue
        for seed in range(1, args.seeds):
            out = args.out / "runs" / name / "grid" / f"{slug(point)}-seed{seed}.json"
            tasks.append({**run_base(args, root, name, seed), "method": f"grid: {point}",
                          "weights": scenario.grid[point], "out": str(out)})  # fmt: skip
    return tasks


def _closest(root: Path, scenario: suite.Scenario, divergences: dict[str, float]) -> list[float]:
    import yaml

    names = [d["name"] for d in yaml.safe_load((root / scenario.config).read_text())["domains"]]
    best = min(names, key=lambda n: divergences[n])
    return [1.0 if n == best else 0.0 for n in names]


def execute(tasks: list[dict], workers: int) -> None:
    pending = [task for task in tasks if not Path(task["out"]).exists()]
    if not pending:
        return
    print(f"{len(pending)} runs to train ({len(tasks) - len(pending)} kept), {workers} at a time", flush=True)
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        for done, line in enumerate(pool.map(run_task, pending), 1):
            elapsed = time.perf_counter() - started
            print(f"  [{done}/{len(pending)} {elapsed / 60:.1f} min] {line}", flush=True)


def main(argv: list[str] | None = None) -> int:
    chosen = ["general", "targeted", "targeted+specific", "small-specific", "tiny-specific", "many"]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/quality"), help="results folder (default runs/quality)")
    parser.add_argument("--scenarios", nargs="+", default=chosen, choices=chosen, help="default: all six")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per method (default 3)")
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per run (default 600)")
    parser.add_argument("--workers", type=int, help="runs at a time (default: one per core; 1 on a GPU)")
    parser.add_argument("--device", default="cpu", help="where models train: cpu (default) or cuda")
    parser.add_argument(
        "--size", choices=sorted(trainer.SIZES), help="the model: small (default on CPU) or large (default on cuda)"
    )
    args = parser.parse_args(argv)
    args.size = args.size or ("small" if args.device == "cpu" else "large")
    args.workers = args.workers or (os.cpu_count() or 1 if args.device == "cpu" else 1)
    if args.seeds < 1 or args.steps < trainer.EVAL_POINTS:
        parser.error(f"need --seeds >= 1 and --steps >= {trainer.EVAL_POINTS}")
    started = time.perf_counter()
    print("building the data (once)...", flush=True)
    root = suite_data.build(args.out / "data")
    first, second, extras = plan(args, root)
    execute(first, args.workers)
    execute(second + best_grid_tasks(args, root), args.workers)
    chosen_scenarios = suite.scenarios(root, args.out)
    sections = [
        report(args.out, chosen_scenarios[name], args.seeds, args.steps, extras[name]) for name in args.scenarios
    ]
    summary = "\n\n".join(sections)
    (args.out / "summary.md").write_text(summary + "\n")
    print("\n" + summary + f"\n\nwrote {args.out / 'summary.md'} and a plot per scenario "
          f"({(time.perf_counter() - started) / 60:.1f} min)")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
