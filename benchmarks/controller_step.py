"""Cost of online mixing: controller observe+step per training step, and loader throughput with moving weights.

1. ``observe() + step()`` of each controller for k domains and a batch of B
   per-sample losses, on the CPU (and CUDA when present), median of many steps.
2. Samples/s of ``MixedDataset`` whose weights change every step (published
   through the weights channel, or computed by ODM from each batch) against
   the same loader with static weights, side by side in one run, for several
   lags, two batch shapes, in-process and with 2 workers. With static weights
   a plan call covers 64 batches; with online weights it can cover only the
   ``lag + 1`` batches whose weights are published, so its fixed cost is
   paid more often. That cost is per batch, the read grows with the batch:
   the ratio depends on the batch's size. The machine is shared and noisy:
   best of 5 rounds of 1,000 batches per cell.

Run: ``python benchmarks/controller_step.py``
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from onlinemix.loaders import MixedDataset, MixedLoader, PlanSpec, StaticSchedule, TokenBinSource
from onlinemix.loaders.channel import DEFAULT_LAG, VersionedSchedule, WeightsChannel
from onlinemix.loaders.plan import UNLIMITED
from onlinemix.mixing.controllers import DGAController, DoReMiController, ODMController
from onlinemix.mixing.mixer import OnlineMixer


def controller_cost(device: str, compiled: bool = True) -> None:
    """µs per training step: median over single steps on the CPU; on CUDA, rounds of 100 steps between syncs
    (what a training loop pays: the host's launches, or the GPU's work if that is longer)."""
    print(f"\ncontroller observe+step, {device} (median µs per training step)")
    print("| controller | k=8, B=256 | k=64, B=4096 | k=1024, B=4096 |\n|---|---:|---:|---:|")
    variants = [
        ("DoReMi", DoReMiController, {}),
        ("ODM", ODMController, {}),
        ("DGA", DGAController, {}),
    ]
    if compiled:  # torch.compile's first call takes a while on a CPU
        variants += [("DoReMi, compiled accumulation", DoReMiController, {"compile": True})]
    if device == "cuda":
        variants += [("DoReMi, CUDA graphs", DoReMiController, {"graph": True})]
        variants += [("ODM, CUDA graphs", ODMController, {"graph": True})]
    for name, cls, options in variants:
        cells = []
        for k, batch in ((8, 256), (64, 4096), (1024, 4096)):
            controller = cls(torch.full((k,), 1 / k, device=device), **options)
            losses = torch.rand(batch, device=device)
            domains = torch.randint(0, k, (batch,), device=device)
            reference, alignment = losses * 0.9, losses[:k] if name == "DGA" else None

            def one_step(controller=controller, losses=losses, domains=domains, reference=reference, align=alignment):
                controller.observe(losses, domains, reference=reference)
                if align is not None:
                    controller.observe_alignment(align)
                controller.step()

            for _ in range(50):
                one_step()
            times = []
            if device == "cuda":
                for _ in range(20):
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    for _ in range(100):
                        one_step()
                    torch.cuda.synchronize()
                    times.append((time.perf_counter() - start) / 100)
            else:
                for _ in range(300):
                    start = time.perf_counter()
                    one_step()
                    times.append(time.perf_counter() - start)
            cells.append(f"{statistics.median(times) * 1e6:,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def loader_throughput(batches: int = 1000, rounds: int = 5) -> None:
    # Two batch shapes: the plan's cost per batch is fixed, the read grows with the batch.
    shapes = [(256, 32), (1024, 64)]
    runs = [("static", 0), ("channel", 4), ("channel", DEFAULT_LAG), ("channel", 64), ("controller", DEFAULT_LAG)]
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for d in range(4):
            path = Path(folder) / f"d{d}.bin"
            np.random.default_rng(d).integers(0, 50_000, 4_000_000, dtype=np.uint16).tofile(path)
            paths.append(path)
        rotations = [np.roll([0.4, 0.3, 0.2, 0.1], step) for step in range(4)]

        def run(seq_len: int, size: int, workers: int, mode: str, lag: int) -> float:
            sources = [TokenBinSource(p, seq_len) for p in paths]
            spec = PlanSpec([len(s) for s in sources], [UNLIMITED] * 4, seed=0, global_batch_size=size)
            data = MixedDataset(sources, list("abcd"), spec, StaticSchedule(np.full(4, 0.25)))
            mixer = OnlineMixer(ODMController(torch.full((4,), 0.25)), data, lag=lag) if mode == "controller" else None
            channel = None
            if mode == "channel":
                channel = WeightsChannel(np.full(4, 0.25))
                data.schedule = VersionedSchedule(channel, lag=lag)
            loader = iter(MixedLoader(data, num_workers=workers))
            warmup = 20  # worker start-up is not throughput
            for step in range(1, warmup + batches + 1):
                if step == warmup + 1:
                    start = time.perf_counter()
                batch = next(loader)
                if mixer:
                    mixer.observe(1.0 + batch["domain"].float(), batch["domain"])
                    mixer.step()
                if channel:  # new weights every step, without a controller: the loader's own cost
                    channel.publish(step, rotations[step % 4])
            return batches * size / (time.perf_counter() - start)

        print(
            f"\nloader throughput with weights changing every step / the same loader with static weights, "
            f"4 domains, best of {rounds} runs of {batches} batches each, side by side"
        )
        header = [f"{what}, lag {lag}{' (default)' if lag == DEFAULT_LAG else ''}" for what, lag in runs[1:]]
        print("| seq_len x batch | workers | static (samples/s) | " + " | ".join(header) + " |")
        print("|---|---:|---:|" + "---:|" * len(header))
        for seq_len, size in shapes:
            for workers in (0, 2):
                best = dict.fromkeys(runs, 0.0)
                for _ in range(rounds):
                    for mode, lag in runs:
                        best[mode, lag] = max(best[mode, lag], run(seq_len, size, workers, mode, lag))
                static = best["static", 0]
                cells = [f"{best[run_] / static:.2f}x" for run_ in runs[1:]]
                print(f"| {seq_len} x {size} | {workers} | {static:,.0f} | " + " | ".join(cells) + " |")
    print("channel: new weights published every step; controller: ODM computes them from the batch (in the loop)")


if __name__ == "__main__":
    controller_cost("cpu")
    if torch.cuda.is_available():
        controller_cost("cuda")
    loader_throughput()
