"""Samples/s from an S3 server against the same data on local disk, side by side in one run.

The server is moto's S3 server on loopback (the one the tests start: ``tests/s3server.py``), so the network is
the fastest there is and what is measured is onlinemix's own cost of reading over HTTP: range requests, their
batching, and fetching ahead of the plan. It prints, for a mixture of a token-bin domain and a JSONL domain of
Python's stdlib source (byte tokenizer, its token cache in the bucket too):

- local disk (memory maps): the ceiling;
- the bucket, with windows fetched ahead of the plan (the default) and without (each batch waits for its own
  requests), in the main process and with 2 DataLoader workers;
- the first open of the bucket's mixture (listing, content digests, the token cache's metadata);
- that every variant gave the same batches as local disk.

A real object store has 10-50 ms of latency per request where loopback has well under one; fetching ahead
hides it only if the batches ahead are requested early enough, which is what the "ahead" rows show.

Run: ``python benchmarks/storage_throughput.py [--batches 200] [--seq-len 1024] [--batch-size 32]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the loopback S3 server of the tests
from s3server import S3Server, filesystem, set_environment

from onlinemix.loaders import MixedDataset
from onlinemix.loaders.prepare import prepare


def write_data(folder: Path, tokens: int, megabytes: float) -> None:
    from packing import stdlib_files, write_jsonl

    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rng.integers(0, 256, tokens, dtype=np.uint16).tofile(folder / "web.bin")
    write_jsonl(folder / "code.jsonl", stdlib_files(), megabytes)


def mixture(folder: Path, where: str, name: str, args: argparse.Namespace, **extra) -> Path:
    raw = {
        "seed": 0,
        "global_batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "domains": [
            {"name": "web", "source": "tokenbin", "path": f"{where}/web.bin", "weight": 0.6},
            {"name": "code", "source": "jsonl", "path": f"{where}/code.jsonl", "weight": 0.4},
        ],
        **extra,
    }
    path = folder / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


REQUESTS = [0]  # range requests this process sent (counted by a wrapper around s3fs's)


def count_requests() -> None:
    import s3fs

    original = s3fs.S3FileSystem._cat_file

    async def counted(self, *args, **kwargs):
        REQUESTS[0] += 1
        return await original(self, *args, **kwargs)

    s3fs.S3FileSystem._cat_file = counted


def server_rate(requests: int = 200) -> float:
    """Range requests per second the server answers alone: random 2 KiB ranges of web.bin, 32 at a time."""
    fs = filesystem()
    size = fs.info("corpus/web.bin")["size"]
    starts = np.random.default_rng(1).integers(0, size - 2048, requests).tolist()
    started = time.perf_counter()
    fs.cat_ranges(["corpus/web.bin"] * requests, starts, [start + 2048 for start in starts], batch_size=32)
    return requests / (time.perf_counter() - started)


def measure(make: Callable[[], torch.utils.data.DataLoader | MixedDataset], batches: int) -> tuple[float, list, float]:
    """Samples/s over ``batches`` batches after 3 of warm-up, the first 3 batches' token ids (for comparison), and
    the range requests per batch this process sent (its DataLoader workers' are not counted)."""
    iterator = iter(make())
    first = [next(iterator)["input_ids"].clone() for _ in range(3)]
    sent, started = REQUESTS[0], time.perf_counter()
    for _ in range(batches):
        batch = next(iterator)
    seconds = time.perf_counter() - started
    del iterator
    return batches * len(batch["input_ids"]) / seconds, first, (REQUESTS[0] - sent) / batches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", type=int, default=200, help="timed batches per variant (default 200)")
    parser.add_argument("--batch-size", type=int, default=32, help="samples per batch (default 32)")
    parser.add_argument("--seq-len", type=int, default=1024, help="tokens per sample (default 1024)")
    args = parser.parse_args()
    server = S3Server().start()
    set_environment(server)
    try:
        with tempfile.TemporaryDirectory() as scratch:
            root = Path(scratch)
            os.environ["ONLINEMIX_CACHE_DIR"] = str(root / "local-cache")
            write_data(root / "data", tokens=20_000_000, megabytes=8)
            server.upload(root / "data", "corpus")
            filesystem().mkdir("caches")
            local = mixture(root, str(root / "data"), "local.yaml", args)
            remote = mixture(root, "s3://corpus", "remote.yaml", args, cache_dir="s3://caches/onlinemix")
            prepare(local, workers=1)
            prepare(remote, workers=1)  # the JSONL domain's token cache, uploaded to the bucket
            os.environ["ONLINEMIX_CACHE_DIR"] = str(root / "fresh-node")  # a node that has nothing locally
            started = time.perf_counter()
            MixedDataset.from_config(remote)
            first_open = time.perf_counter() - started

            def dataset(config: Path, ahead: bool = True) -> MixedDataset:
                made = MixedDataset.from_config(config)
                made.prefetching = ahead and made.prefetching
                return made

            def workers(config: Path) -> torch.utils.data.DataLoader:
                return torch.utils.data.DataLoader(dataset(config), batch_size=None, num_workers=2)

            variants = {
                "local disk, main process": lambda: dataset(local),
                "S3, fetched ahead": lambda: dataset(remote),
                "S3, not fetched ahead": lambda: dataset(remote, ahead=False),
                "local disk, 2 workers": lambda: workers(local),
                "S3, fetched ahead, 2 workers": lambda: workers(remote),
            }
            count_requests()
            alone = server_rate()
            results = {name: measure(make, args.batches) for name, make in variants.items()}
    finally:
        server.kill()
    reference = results["local disk, main process"]
    print(f"\nbatches of {args.batch_size} x {args.seq_len} tokens: a token-bin domain (40 MB) and a JSONL domain's "
          "token cache, on local disk and on moto's S3 server on loopback")  # fmt: skip
    print(f"the server alone answers {alone:,.0f} range requests/s (moto: its cost per request, not the network's)")
    print(f"{'variant':<32}{'samples/s':>12}{'vs local':>10}{'requests/batch':>16}{'same batches':>14}")
    for name, (rate, first, requests) in results.items():
        same = all(torch.equal(a, b) for a, b in zip(first, reference[1]))
        counted = f"{requests:.1f}" if "workers" not in name else "-"
        print(f"{name:<32}{rate:>12,.0f}{rate / reference[0]:>9.3f}x{counted:>16}{same!s:>14}")
    ahead = results["S3, fetched ahead"][2]
    print(
        f"at the 5,500 GET/s an S3 prefix serves, {ahead:.1f} requests per batch of {args.batch_size} would allow "
        f"{5500 / max(ahead, 1e-9) * args.batch_size:,.0f} samples/s (an extrapolation, not a measurement)"
    )
    print(f"first open of the bucket's mixture on a node with an empty local cache: {first_open:.2f} s")


if __name__ == "__main__":
    main()
