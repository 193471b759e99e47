"""Cost of online mixing: controller observe+step per training step, and loader throughput with moving weights.

1. ``observe() + step()`` of each controller for k domains and a batch of B
   per-sample losses, on the CPU (and CUDA when present), median of many steps.
2. Samples/s of ``MixedDataset`` whose weights change every step (ODM on
   synthetic losses, published through the weights channel) against the same
   loader with static weights, side by side in one run.

Run: ``python benchmarks/controller_step.py``
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from loaders import MixedDataset, MixedLoader, PlanSpec, StaticSchedule, TokenBinSource
from loaders.channel import VersionedSchedule, WeightsChannel
from loaders.plan import UNLIMITED
from mixing.controllers import DGAController, DoReMiController, ODMController
from mixing.mixer import OnlineMixer


def controller_cost(device: str) -> None:
    print(f"\ncontroller observe+step, {device} (median µs per training step)")
    print("| controller | k=8, B=256 | k=64, B=4096 | k=1024, B=4096 |\n|---|---:|---:|---:|")
    variants = [
        ("DoReMi", DoReMiController, False),
        ("ODM", ODMController, False),
        ("DGA", DGAController, False),
        ("DoReMi, compiled accumulation", DoReMiController, True),
    ]
    for name, cls, compiled in variants:
        cells = []
        for k, batch in ((8, 256), (64, 4096), (1024, 4096)):
            controller = cls(torch.full((k,), 1 / k, device=device), compile=compiled)
            losses = torch.rand(batch, device=device)
            domains = torch.randint(0, k, (batch,), device=device)
            reference = losses * 0.9
            times = []
            for i in range(300):
                start = time.perf_counter()
                controller.observe(losses, domains, reference=reference)
                if name == "DGA":
                    controller.observe_alignment(losses[:k])
                controller.step()
                if device == "cuda":
                    torch.cuda.synchronize()
                if i >= 50:
                    times.append(time.perf_counter() - start)
            cells.append(f"{statistics.median(times) * 1e6:,.0f}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def loader_throughput(batches: int = 400, rounds: int = 3) -> None:
    seq_len, size = 256, 32
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for d in range(4):
            path = Path(folder) / f"d{d}.bin"
            np.random.default_rng(d).integers(0, 50_000, 2_000_000, dtype=np.uint16).tofile(path)
            paths.append(path)

        def dataset() -> MixedDataset:
            sources = [TokenBinSource(p, seq_len) for p in paths]
            spec = PlanSpec([len(s) for s in sources], [UNLIMITED] * 4, seed=0, global_batch_size=size)
            return MixedDataset(sources, list("abcd"), spec, StaticSchedule(np.full(4, 0.25)))

        def run(mode: str) -> float:
            data = dataset()
            mixer = OnlineMixer(ODMController(torch.full((4,), 0.25)), data, lag=4) if mode == "controller" else None
            channel = None
            if mode == "channel":
                channel = WeightsChannel(np.full(4, 0.25))
                data.schedule = VersionedSchedule(channel, lag=4)
            loader = iter(MixedLoader(data))
            start = time.perf_counter()
            for step in range(1, batches + 1):
                batch = next(loader)
                if mixer:
                    mixer.observe(1.0 + batch["domain"].float(), batch["domain"])
                    mixer.step()
                if channel:  # new weights every step, without a controller: the loader's own cost
                    channel.publish(step, np.roll([0.4, 0.3, 0.2, 0.1], step))
            return batches * size / (time.perf_counter() - start)

        best = {"static": 0.0, "channel": 0.0, "controller": 0.0}
        for _ in range(rounds):
            for mode in best:
                best[mode] = max(best[mode], run(mode))
    print(f"\nloader throughput, seq_len {seq_len}, batch {size}, 4 domains, in-process, best of {rounds}")
    print(f"static weights: {best['static']:,.0f} samples/s")
    print(
        f"new weights every step through the channel (lag 4): {best['channel']:,.0f} samples/s "
        f"= {best['channel'] / best['static']:.2f}x static"
    )
    print(
        f"the same with ODM computing them (controller and publication included): {best['controller']:,.0f} "
        f"samples/s = {best['controller'] / best['static']:.2f}x static"
    )


if __name__ == "__main__":
    controller_cost("cpu")
    if torch.cuda.is_available():
        controller_cost("cuda")
    loader_throughput()
