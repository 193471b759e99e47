"""Samples/s per rank with 1, 2 and 4 data-parallel ranks (``torch.distributed``, gloo, one process each).

Each rank iterates its slice of the same mixture (four token-bin domains of
stdlib source, ``seq_len`` 1024, global batch 32 x world size so that every
rank's batch stays 32) with weights that change every step through an
``OnlineMixer`` whose statistics are all-reduced over the ranks — the full
multi-rank path: plan, read, observe, all-reduce, update, publish. Ranks run
at the same time, so on a machine with fewer cores than ranks they share
them: read the per-rank rate against the cores available.

Run: ``python benchmarks/rank_throughput.py [--steps 200]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from loader_throughput import BATCH, SEQ_LEN, WEIGHTS, build_domains

from onlinemix.loaders import MixedDataset, MixedLoader, PlanSpec, StaticSchedule, TokenBinSource
from onlinemix.loaders.plan import UNLIMITED
from onlinemix.mixing.controllers import ODMController
from onlinemix.mixing.mixer import OnlineMixer


def rank_main(rank: int, world: int, sync: str, folder: str, steps: int, results: multiprocessing.Queue) -> None:
    rendezvous = f"file://{folder}/rendezvous-{world}-{sync}"
    dist.init_process_group("gloo", init_method=rendezvous, rank=rank, world_size=world)
    sources = [TokenBinSource(path, SEQ_LEN) for path in sorted(Path(folder).glob("domain*.bin"))]
    spec = PlanSpec([len(s) for s in sources], [UNLIMITED] * 4, seed=0, global_batch_size=BATCH * world)
    dataset = MixedDataset(sources, ["d0", "d1", "d2", "d3"], spec, StaticSchedule(WEIGHTS), num_batches=steps + 10)
    mixer = OnlineMixer(ODMController(torch.from_numpy(WEIGHTS).float()), dataset, lag=2, sync=sync)
    loader = MixedLoader(dataset)
    for step, batch in enumerate(loader):
        if step == 10:  # warm-up done
            dist.barrier()
            start = time.perf_counter()
        mixer.observe(batch["domain"].float(), batch["domain"])  # a stand-in loss: the cost is the same
        mixer.step()
    elapsed = time.perf_counter() - start
    results.put((rank, steps * BATCH / elapsed))
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed steps per rank")
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory() as folder:
        build_domains(Path(folder))
        rates = {}
        for world in (1, 2, 4):
            for sync in ("all_reduce", "none"):
                results = context.Queue()
                processes = [
                    context.Process(target=rank_main, args=(rank, world, sync, folder, args.steps, results))
                    for rank in range(world)
                ]
                for process in processes:
                    process.start()
                per_rank = [results.get(timeout=600)[1] for _ in processes]
                for process in processes:
                    process.join()
                rates[world, sync] = float(np.mean(per_rank))
    print(f"seq_len {SEQ_LEN}, batch {BATCH} per rank, weights updated every step, {os.cpu_count()} CPU cores")
    print("| ranks | samples/s per rank | vs 1 rank | samples/s in all | per rank without the all-reduce |")
    print("|---:|---:|---:|---:|---:|")
    for world in (1, 2, 4):
        rate, alone = rates[world, "all_reduce"], rates[world, "none"]
        print(f"| {world} | {rate:,.0f} | {rate / rates[1, 'all_reduce']:.2f}x | {rate * world:,.0f} | {alone:,.0f} |")


if __name__ == "__main__":
    main()
