"""Cost of the plan and of a controller step as the number of domains grows from 8 to 10,000.

- plan, static weights: ``plan_batches`` over chunks of 64 batches (what a
  loader with fixed weights does), per batch;
- plan, online weights: one ``plan_batches`` call per batch (weights known
  only one step ahead: the worst case of online mixing), per batch;
- ODM ``observe + step`` for a batch of 4096 per-sample losses (CPU);
- then, at 8 domains, the plan's cost per batch as the global batch grows
  from 256 to 4,096 slots (its work per slot is a few hashes).

Global batch 1024 (ranks take slices of it; the plan is the same on each),
domain sizes drawn between 1,000 and 1,000,000 samples, weights from a
Dirichlet draw. Target: under 1 ms per batch at 10,000 domains.

Run: ``python benchmarks/domain_scale.py``
"""

from __future__ import annotations

import statistics
import time

import numpy as np
import torch

from onlinemix.loaders.plan import UNLIMITED, PlanSpec, PlanState, plan_batches
from onlinemix.mixing.controllers import ODMController

GLOBAL_BATCH = 1024


def per_batch_us(run, repeats: int, batches_per_call: int) -> float:
    for _ in range(3):  # warm-up: first calls page in fresh memory
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) / batches_per_call)
    return statistics.median(times) * 1e6


def plan_costs(k: int, global_batch: int) -> tuple[float, float]:
    """µs per batch with static weights (64 batches a call) and with new weights every batch (1 a call)."""
    rng = np.random.default_rng(k)
    sizes = rng.integers(1_000, 1_000_000, size=k)
    weights = rng.dirichlet(np.ones(k))
    spec = PlanSpec(sizes, [UNLIMITED] * k, seed=0, global_batch_size=global_batch)
    state = PlanState.start(k)
    chunk = np.broadcast_to(weights, (64, k))
    static = per_batch_us(lambda: plan_batches(spec, state, chunk), 20, 64)
    online = per_batch_us(lambda: plan_batches(spec, state, weights[None, :]), 200, 1)
    return static, online


def row(k: int) -> str:
    static, online = plan_costs(k, GLOBAL_BATCH)
    controller = ODMController(torch.full((k,), 1 / k))
    losses = torch.rand(4096)
    domains = torch.randint(0, k, (4096,))

    def step() -> None:
        controller.observe(losses, domains)
        controller.step()

    control = per_batch_us(step, 300, 1)
    return f"| {k:,} | {static:,.0f} | {online:,.0f} | {control:,.0f} |"


def main() -> None:
    print(f"global batch {GLOBAL_BATCH}; median µs per batch (plan) or per training step (controller)")
    print("| domains | plan, static (64 per call) | plan, online (1 per call) | ODM observe+step, B=4096 |")
    print("|---:|---:|---:|---:|")
    for k in (8, 64, 1024, 10_000):
        print(row(k))
    print("\n8 domains, median µs per batch")
    print("| global batch | plan, static | plan, online | static, ns per slot |")
    print("|---:|---:|---:|---:|")
    for global_batch in (256, 1024, 4096):
        static, online = plan_costs(8, global_batch)
        print(f"| {global_batch:,} | {static:,.0f} | {online:,.0f} | {static * 1000 / global_batch:,.0f} |")


if __name__ == "__main__":
    main()
