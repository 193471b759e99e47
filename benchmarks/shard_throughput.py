"""Mixed samples/s over MDS and WebDataset shards: onlinemix against the formats' own mixers.

Four domains of Python's stdlib source (files split by a hash of their path),
byte-tokenized and packed into windows of ``seq_len + 1`` tokens by
``onlinemix convert``, once as MDS shards and once as WebDataset shards. Every
loader yields the same batch: 32 windows as int64 ``input_ids`` and
``labels`` (``seq_len`` 1024), drawn with weights 0.4/0.3/0.2/0.1. They run
side by side, interleaved over rounds; the best round counts.

- onlinemix over the MDS shards and over the WebDataset shards (whole
  batches; the same loader that takes online weights);
- mosaicml-streaming ``StreamingDataset(streams=[Stream(proportion=w), ...])``
  over the MDS shards (shuffled, fixed proportions);
- webdataset ``RandomMix`` over one shuffled, resampled ``WebDataset`` per
  domain (fixed probabilities).

Run: ``python benchmarks/shard_throughput.py [--batches 200] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import sysconfig
import tempfile
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from loader_throughput import BATCH, SEQ_LEN, WEIGHTS, best_rates
from torch.utils.data import DataLoader, IterableDataset

from onlinemix.loaders import MixedDataset, MixedLoader, PlanSpec, StaticSchedule
from onlinemix.loaders.convert import convert
from onlinemix.loaders.plan import UNLIMITED
from onlinemix.loaders.sources import MdsSource, WebDatasetSource
from onlinemix.loaders.transforms import TokenWindow


def build_shards(folder: Path, bytes_per_domain: int = 2_000_000) -> tuple[list[Path], list[Path]]:
    """Four domains of stdlib source, as packed MDS shards and packed WebDataset shards."""
    files: list[list[Path]] = [[], [], [], []]
    filled = [0, 0, 0, 0]
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        domain = zlib.crc32(str(path).encode()) % 4
        if filled[domain] < bytes_per_domain:
            files[domain].append(path)
            filled[domain] += path.stat().st_size
    mds, wds = [], []
    for d, inputs in enumerate(files):
        for fmt, out in (("mds", mds), ("webdataset", wds)):
            path = folder / f"{fmt}{d}"
            convert(inputs, path, fmt, pack=SEQ_LEN, shard_bytes=8 << 20, progress=False)
            out.append(path)
    return mds, wds


def window(record: dict) -> dict:
    """A shard record (a packed window of ``seq_len + 1`` token ids) as ``input_ids`` and ``labels``."""
    return TokenWindow()(record["document"])


def onlinemix(sources: list, workers: int) -> Iterable[dict]:
    spec = PlanSpec([len(s) for s in sources], [UNLIMITED] * 4, seed=0, global_batch_size=BATCH)
    dataset = MixedDataset(sources, ["d0", "d1", "d2", "d3"], spec, StaticSchedule(WEIGHTS))
    return MixedLoader(dataset, num_workers=workers, prefetch_factor=4 if workers else None)


def streaming_mix(folders: list[Path], workers: int) -> Iterable[dict]:
    from streaming import Stream, StreamingDataset
    from streaming.base.util import clean_stale_shared_memory

    clean_stale_shared_memory()  # each round builds a fresh StreamingDataset over the same folders

    class Windows(StreamingDataset):
        def __getitem__(self, index: int) -> dict:
            window = torch.from_numpy(super().__getitem__(index)["tokens"].astype(np.int64))
            return {"input_ids": window[:-1], "labels": window[1:]}

    streams = [Stream(local=str(folder), proportion=float(w)) for folder, w in zip(folders, WEIGHTS)]
    dataset = Windows(streams=streams, batch_size=BATCH, shuffle=True, shuffle_seed=0, epoch_size=10**6)
    return DataLoader(dataset, batch_size=BATCH, num_workers=workers)


class RandomMixDataset(IterableDataset):
    def __init__(self, folders: list[Path]):
        self.folders = folders

    def __iter__(self):
        import webdataset as wds

        def window(sample: dict) -> dict:
            tokens = torch.from_numpy(sample["npy"].astype(np.int64))
            return {"input_ids": tokens[:-1], "labels": tokens[1:]}

        streams = [
            iter(
                wds.WebDataset([str(p) for p in sorted(folder.glob("*.tar"))], resampled=True, shardshuffle=False)
                .shuffle(1000)
                .decode()
                .map(window)
            )
            for folder in self.folders
        ]
        return iter(wds.RandomMix(streams, probs=WEIGHTS.tolist(), longest=True))


def webdataset_mix(folders: list[Path], workers: int) -> Iterable[dict]:
    return DataLoader(RandomMixDataset(folders), batch_size=BATCH, num_workers=workers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200, help="timed batches per loader and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best one counts")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        mds, wds = build_shards(Path(folder))
        # Records read straight from the shards (a transform), as for data too large to cache locally.
        mds_sources = [MdsSource(p, transform=window) for p in mds]
        wds_sources = [WebDatasetSource(p, transform=window) for p in wds]
        loaders: dict[str, Callable[[], Iterable[dict]]] = {}
        for w in args.workers:
            loaders[f"onlinemix over MDS | {w}"] = lambda w=w: onlinemix(mds_sources, w)
            loaders[f"mosaicml-streaming StreamingDataset (MDS) | {w}"] = lambda w=w: streaming_mix(mds, w)
            loaders[f"onlinemix over WebDataset | {w}"] = lambda w=w: onlinemix(wds_sources, w)
            loaders[f"webdataset RandomMix (WebDataset) | {w}"] = lambda w=w: webdataset_mix(wds, w)
        best = best_rates(loaders, args.rounds, args.batches)
    samples = sum(len(s) for s in mds_sources)
    print(
        f"seq_len {SEQ_LEN}, batch {BATCH}, 4 domains ({samples:,} packed windows), weights {WEIGHTS.tolist()}, "
        f"best of {args.rounds} rounds x {args.batches} batches"
    )
    print("| loader | workers | samples/s | vs the faster peer |\n|---|---:|---:|---:|")
    for w in args.workers:
        peer = max(
            best[f"mosaicml-streaming StreamingDataset (MDS) | {w}"], best[f"webdataset RandomMix (WebDataset) | {w}"]
        )
        for name, rate in best.items():
            loader, workers = name.split(" | ")
            if workers == str(w):
                print(f"| {loader} | {workers} | {rate:,.0f} | {rate / peer:.2f}x |")


if __name__ == "__main__":
    main()
