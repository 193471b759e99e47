"""Mixed samples/s of token-bin windows: onlinemix against a plain memmap loader and the peers' mixers.

All loaders read the same four token-bin files (Python's stdlib source as
byte tokens) with the same weights, and produce the same batch: 32 windows of
``seq_len + 1`` tokens as contiguous int64 ``input_ids`` and ``labels``
(``seq_len`` 1024). They run side by side, interleaved over several rounds on
the same machine; the table reports each one's best round and its ratio to
the plain loader.

- plain:     nanoGPT's ``get_batch``, vectorised: per batch, random window
             starts per domain and one fancy-index gather each (no determinism,
             no resume, no workers);
- onlinemix: ``MixedDataset`` (whole batches, ``DataLoader(batch_size=None)``),
             and its per-sample path (``DataLoader(batch_size=32)``);
- webdataset ``RandomMix`` over one per-domain sample stream each;
- torchdata ``nodes.MultiNodeWeightedSampler`` over the same streams;
- in-process with a background thread: onlinemix's ``thread_prefetch`` and torchdata's ``Prefetcher`` node.

Run: ``python benchmarks/loader_throughput.py [--batches 300] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import time
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from onlinemix.loaders import MixedDataset, MixedLoader, PlanSpec, StaticSchedule, TokenBinSource
from onlinemix.loaders.plan import UNLIMITED

SEQ_LEN, BATCH = 1024, 32
WEIGHTS = np.array([0.4, 0.3, 0.2, 0.1])


def build_domains(folder: Path, tokens_per_domain: int = 3_000_000) -> list[Path]:
    """Four token-bin files of stdlib source bytes, split by a hash of the file path."""
    parts: list[list[np.ndarray]] = [[], [], [], []]
    filled = [0, 0, 0, 0]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        domain = zlib.crc32(str(path).encode()) % 4
        if filled[domain] < tokens_per_domain:
            data = np.frombuffer(path.read_bytes(), dtype=np.uint8)
            parts[domain].append(data)
            filled[domain] += len(data)
    paths = []
    for d, chunks in enumerate(parts):
        path = folder / f"domain{d}.bin"
        np.concatenate(chunks).astype(np.uint16).tofile(path)
        paths.append(path)
    return paths


class WindowStream(IterableDataset):
    """Random windows of one domain, one sample at a time: the peers' per-domain input."""

    def __init__(self, path: Path, seed: int):
        self.path, self.seed = path, seed

    def __iter__(self):
        worker = get_worker_info()
        rng = np.random.default_rng([self.seed, worker.id if worker else 0])
        tokens = np.memmap(self.path, dtype=np.uint16, mode="r")
        high = len(tokens) - SEQ_LEN - 1
        while True:
            start = int(rng.integers(high))
            window = torch.from_numpy(tokens[start : start + SEQ_LEN + 1].astype(np.int64))
            yield {"input_ids": window[:-1], "labels": window[1:]}


def plain_batches(paths: list[Path]) -> Iterable[dict]:
    tokens = [np.memmap(p, dtype=np.uint16, mode="r") for p in paths]
    rng = np.random.default_rng(0)
    offsets = np.arange(SEQ_LEN)
    while True:
        counts = rng.multinomial(BATCH, WEIGHTS)
        xs, ys = [], []
        for data, count in zip(tokens, counts):
            starts = rng.integers(len(data) - SEQ_LEN - 1, size=count)[:, None] + offsets
            xs.append(data[starts])
            ys.append(data[starts + 1])
        yield {
            "input_ids": torch.from_numpy(np.concatenate(xs).astype(np.int64)),
            "labels": torch.from_numpy(np.concatenate(ys).astype(np.int64)),
        }


def onlinemix(paths: list[Path], workers: int, output: str = "batches", thread: int = 0) -> Iterable[dict]:
    sources = [TokenBinSource(p, SEQ_LEN) for p in paths]
    spec = PlanSpec([len(s) for s in sources], [UNLIMITED] * 4, seed=0, global_batch_size=BATCH)
    dataset = MixedDataset(sources, ["d0", "d1", "d2", "d3"], spec, StaticSchedule(WEIGHTS), output=output)
    return MixedLoader(dataset, num_workers=workers, prefetch_factor=4 if workers else None, thread_prefetch=thread)


class RandomMixDataset(IterableDataset):
    def __init__(self, paths):
        self.paths = paths

    def __iter__(self):
        import webdataset as wds

        streams = [iter(WindowStream(p, seed=d)) for d, p in enumerate(self.paths)]
        return iter(wds.RandomMix(streams, probs=WEIGHTS.tolist(), longest=True))


def webdataset_mix(paths: list[Path], workers: int) -> Iterable[dict]:
    return DataLoader(RandomMixDataset(paths), batch_size=BATCH, num_workers=workers)


class NodesDataset(IterableDataset):
    def __init__(self, paths):
        self.paths = paths

    def __iter__(self):
        from torchdata.nodes import Batcher, IterableWrapper, Loader, MultiNodeWeightedSampler

        sources = {f"d{d}": IterableWrapper(WindowStream(p, seed=d)) for d, p in enumerate(self.paths)}
        weights = {f"d{d}": float(w) for d, w in enumerate(WEIGHTS)}
        node = Batcher(MultiNodeWeightedSampler(sources, weights), batch_size=BATCH)
        for samples in Loader(node):
            yield torch.utils.data.default_collate(samples)


def torchdata_mix(paths: list[Path], workers: int) -> Iterable[dict]:
    return DataLoader(NodesDataset(paths), batch_size=None, num_workers=workers)


def torchdata_threaded(paths: list[Path]) -> Iterable[dict]:
    """torchdata's own way to overlap loading without processes: its ``Prefetcher`` node (a thread)."""
    from torchdata.nodes import Batcher, IterableWrapper, Loader, Mapper, MultiNodeWeightedSampler, Prefetcher

    sources = {f"d{d}": IterableWrapper(WindowStream(p, seed=d)) for d, p in enumerate(paths)}
    weights = {f"d{d}": float(w) for d, w in enumerate(WEIGHTS)}
    batches = Mapper(Batcher(MultiNodeWeightedSampler(sources, weights), batch_size=BATCH), default_collate)
    return Loader(Prefetcher(batches, prefetch_factor=4))


def measure(make: Callable[[], Iterable[dict]], batches: int) -> float:
    iterator = iter(make())
    for _ in range(5):  # warm-up: worker start, page cache
        next(iterator)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    elapsed = time.perf_counter() - start
    assert batch["input_ids"].shape == (BATCH, SEQ_LEN) and batch["input_ids"].is_contiguous()
    del iterator
    return batches * BATCH / elapsed


def best_rates(loaders: dict[str, Callable[[], Iterable[dict]]], rounds: int, batches: int) -> dict[str, float]:
    """Each loader's best samples/s over ``rounds`` rounds, the loaders interleaved within each round."""
    best = dict.fromkeys(loaders, 0.0)
    for _ in range(rounds):
        for name, make in loaders.items():
            best[name] = max(best[name], measure(make, batches))
    return best


def overlapped(paths: list[Path], batches: int) -> tuple[float, float, float]:
    """Seconds a step takes in process when the loop also waits on a "GPU step" as long as loading one batch
    takes (a sleep: the training thread waits, holding no core and not the GIL), without and with
    ``thread_prefetch``: what the thread is for. Returns (load, without, with) per step, best of 3."""

    def per_step(make: Callable[[], Iterable[dict]], step: float) -> float:
        best = float("inf")
        for _ in range(3):
            iterator = iter(make())
            next(iterator)
            started = time.perf_counter()
            for _ in range(batches):
                next(iterator)
                if step:
                    time.sleep(step)
            best = min(best, (time.perf_counter() - started) / batches)
            del iterator
        return best

    load = per_step(lambda: onlinemix(paths, 0), 0.0)
    return load, per_step(lambda: onlinemix(paths, 0), load), per_step(lambda: onlinemix(paths, 0, thread=2), load)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=300, help="timed batches per loader and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best one counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        paths = build_domains(Path(folder))
        loaders: dict[str, Callable[[], Iterable[dict]]] = {}
        for workers in (0, 2):
            loaders[f"plain memmap get_batch (in-process) | {workers}"] = lambda: plain_batches(paths)
            loaders[f"onlinemix batches | {workers}"] = lambda w=workers: onlinemix(paths, w)
            loaders[f"onlinemix per-sample | {workers}"] = lambda w=workers: onlinemix(paths, w, "samples")
            loaders[f"webdataset RandomMix | {workers}"] = lambda w=workers: webdataset_mix(paths, w)
            loaders[f"torchdata MultiNodeWeightedSampler | {workers}"] = lambda w=workers: torchdata_mix(paths, w)
        loaders["onlinemix batches, thread_prefetch=4 | thread"] = lambda: onlinemix(paths, 0, thread=4)
        loaders["torchdata MultiNodeWeightedSampler + Prefetcher | thread"] = lambda: torchdata_threaded(paths)
        best = best_rates(loaders, args.rounds, args.batches)
        overlap = overlapped(paths, args.batches)
    print(
        f"seq_len {SEQ_LEN}, batch {BATCH}, 4 token-bin domains, weights {WEIGHTS.tolist()}, "
        f"best of {args.rounds} rounds x {args.batches} batches"
    )
    print("| loader | workers | samples/s | vs plain (0 workers) |\n|---|---:|---:|---:|")
    plain = best["plain memmap get_batch (in-process) | 0"]
    for name, rate in best.items():
        loader, workers = name.split(" | ")
        if loader.startswith("plain") and workers == "2":
            continue  # the plain loader has no worker processes
        print(f"| {loader} | {workers} | {rate:,.0f} | {rate / plain:.2f}x |")
    load, without, with_thread = overlap
    print(
        f"\nwith a GPU step in the loop as long as loading a batch ({load * 1e3:.2f} ms, a sleep): {without * 1e3:.2f} "
        f"ms a step without a thread, {with_thread * 1e3:.2f} ms with thread_prefetch=2 ({without / with_thread:.2f}x)"
    )


if __name__ == "__main__":
    main()
