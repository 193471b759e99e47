"""The checks a lent GPU is for, in one command that fits in about ten minutes of it.

    .venv/bin/python benchmarks/quality/gpu_slice.py                      # on one GPU
    .venv/bin/python benchmarks/quality/gpu_slice.py --tiny               # the same path on CPU, in a minute

On a GPU (``--device cuda``, the default where one is present) it runs, in this order, so that what finishes
first is what matters most:

1. the CUDA tests (``pytest -k cuda``: the controller's step on the device, CUDA graphs, the asynchronous
   publication);
2. the controller micro-benchmark (``benchmarks/controller_step.py``'s per-step cost of observe + step, CUDA
   graphs included), against the 30 µs goal;
3. a slice of the quality suite at the large size (25M parameters): *targeted+specific*, one seed, uniform
   against DGA (the best online method there at the small size) and the proxy workflow (a quarter-length DGA
   run's schedule stretched, and its static export), ``--steps`` steps each.

It prints each part's output and writes ``<out>/gpu_slice.md`` with the card's name, the benchmark's table and
the slice's. ``--tiny`` runs the same code on the CPU with the small model, a few steps and no CUDA tests: what
the test suite checks, so the command works the day a GPU is lent.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks/: controller_step
import data as suite_data
import results
import scenarios as suite
import train as trainer
from run import execute

HERE = Path(__file__).resolve().parent
SCENARIO, METHOD = "targeted+specific", "dga"


def cuda_tests() -> str:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-k", "cuda", "tests"], capture_output=True,
                          text=True, cwd=HERE.parents[1])  # fmt: skip
    return done.stdout[-3000:] + done.stderr[-2000:]


def controller_benchmark(device: str) -> str:
    from controller_step import controller_cost

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        controller_cost(device, compiled=device == "cuda")  # compiling takes minutes on a CPU: not in the dry run
    return printed.getvalue()


def quality_slice(args: argparse.Namespace) -> str:
    root = suite_data.build(args.out / "data")
    scenario = suite.scenarios(root, args.out)[SCENARIO]
    runs = args.out / "runs" / SCENARIO
    base = {"kind": "run", "scenario": SCENARIO, "seed": 0, "steps": args.steps, "root": str(root),
            "results": str(args.out), "size": args.size, "device": args.device}  # fmt: skip
    short = runs / "proxies" / f"{METHOD}-seed0.json"
    execute([{**base, "method": "uniform", "out": str(runs / "uniform" / "seed0.json")},
             {**base, "method": METHOD, "out": str(runs / METHOD / "seed0.json")},
             {**base, "method": METHOD, "steps": args.steps // suite.PROXY_SHRINK, "out": str(short),
              "log": str(short.with_suffix(".oms"))}], args.workers)  # fmt: skip
    labels = [prefix + METHOD for prefix in (suite.PROXY, suite.EXPORT)]
    execute([{**base, "method": label, "proxy": str(short.with_suffix(".oms")),
              "out": str(runs / label / "seed0.json")} for label in labels], args.workers)  # fmt: skip
    found = {label: results.load_runs(args.out, scenario, label, 1) for label in ["uniform", METHOD, *labels]}
    uniform = results.objective(found["uniform"][0], scenario)[1][-1]
    lines = [f"*{SCENARIO}*, {args.size} model ({trainer.parameters(args.size) / 1e6:.1f}M parameters), "
             f"{args.steps} steps, seed 0, on {args.device}:", "",
             "| method | final target loss | vs uniform | seconds |", "|---|---:|---:|---:|"]  # fmt: skip
    for label, histories in found.items():
        final = results.objective(histories[0], scenario)[1][-1]
        lines.append(f"| {label} | {final:.4f} | {final - uniform:+.4f} | {histories[0]['seconds']:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/gpu-slice"), help="results (default runs/gpu-slice)")
    parser.add_argument("--steps", type=int, help="steps per run (default 1000; 12 with --tiny)")
    parser.add_argument("--tiny", action="store_true", help="on the CPU, the small model, a few steps: a dry run")
    args = parser.parse_args(argv)
    args.device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    args.size = "small" if args.tiny else "large"
    args.steps = args.steps or (12 if args.tiny else 1000)
    args.workers = 1
    if args.steps < trainer.EVAL_POINTS * suite.PROXY_SHRINK:
        parser.error(f"--steps must be at least {trainer.EVAL_POINTS * suite.PROXY_SHRINK}")
    if not args.tiny and args.device != "cuda":
        parser.error("no GPU here: run it with --tiny to check the command on the CPU")
    card = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    sections = [f"# GPU slice on {card}"]
    for title, part in (
        ("CUDA tests", None if args.tiny else cuda_tests),
        (f"Controller observe + step, {args.device} (median µs per training step; goal: 30 µs)",
         lambda: controller_benchmark(args.device)),
        ("Quality slice", lambda: quality_slice(args)),
    ):  # fmt: skip
        if part is None:
            continue
        started = time.perf_counter()
        text = part()
        sections.append(f"## {title} ({time.perf_counter() - started:.0f} s)\n\n{text.strip()}")
        print(sections[-1], flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_slice.md").write_text("\n\n".join(sections) + "\n")
    print(f"wrote {args.out / 'gpu_slice.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
