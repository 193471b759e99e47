"""How fast ``onlinemix prepare`` tokenizes a corpus: against the tokenizer itself, and with more workers.

``--domains`` JSONL domains of Python's stdlib source (``--mb`` of text each, different files in each), a
4,096-token BPE ``tokenizer.json`` trained here on the same text (no download). It prints, side by side in
one run:

- the tokenizer's own ``encode_batch`` over one domain's documents, in one process: the ceiling per worker;
- ``prepare`` with 1 and 2 local worker processes, and 2 Ray tasks on a local Ray cluster (``--skip-ray``
  leaves it out): MB of text per second, per worker against the tokenizer's own, and 2 workers against 1;
- the same files as ONE domain (a folder of them), which prepare tokenizes file by file: 1 and 2 workers;
- that every engine wrote byte-identical caches;
- what a 1 TB corpus would take at the measured rate per worker, on a few worker counts.

Every process's tokenizer runs on one thread (``RAYON_NUM_THREADS=1``), so a worker is a core: a Hugging Face
tokenizer otherwise spreads ``encode_batch`` over every core by itself. ``prepare`` parallelises over domains,
so the scaling needs at least as many domains as workers.

Run: ``python benchmarks/prepare_throughput.py [--domains 4] [--mb 6] [--skip-ray]``
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = "1"  # before any tokenizer starts its pool

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from onlinemix.loaders.prepare import prepare

TERABYTE = 1e12


ENCODE_ALONE = """
import json, sys, time
from tokenizers import Tokenizer
tokenizer = Tokenizer.from_file(sys.argv[1])
texts = [json.loads(line)["text"] for line in open(sys.argv[2])]
started = time.perf_counter()
for i in range(0, len(texts), 256):
    tokenizer.encode_batch(texts[i : i + 256])
print(time.perf_counter() - started)
"""


def tokenizer_alone(tokenizer: Path, corpus: Path) -> float:
    """Seconds the tokenizer's own ``encode_batch`` takes over ``corpus``, in a fresh process (its file read
    and JSON parsing not counted)."""
    done = subprocess.run(
        [sys.executable, "-c", ENCODE_ALONE, str(tokenizer), str(corpus)], capture_output=True, text=True, check=True
    )
    return float(done.stdout.strip())


def cache_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: (p / "tokens.bin").read_bytes() for p in sorted(cache.iterdir()) if (p / "meta.json").exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=4, help="JSONL domains (default 4)")
    parser.add_argument("--mb", type=float, default=6.0, help="MB of text per domain (default 6)")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray engine")
    args = parser.parse_args()
    # here, not at the top: spawned workers import this file again, and need none of it
    from packing import bpe_tokenizer, stdlib_files, write_jsonl

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        files = stdlib_files()  # each domain its own share of them
        corpora = [
            write_jsonl(folder / f"domain{d}.jsonl", files[d :: args.domains], args.mb) for d in range(args.domains)
        ]
        tokenizer = bpe_tokenizer(corpora[0], folder)
        mixture = {
            "seed": 0,
            "global_batch_size": 8,
            "seq_len": 1024,
            "tokenizer": str(tokenizer),
            "domains": [{"name": p.stem, "source": "jsonl", "path": str(p)} for p in corpora],
        }
        config = folder / "mixture.yaml"
        config.write_text(yaml.safe_dump(mixture))
        megabytes = sum(p.stat().st_size for p in corpora) / 1e6  # JSONL as stored (text plus a little JSON)

        alone = corpora[0].stat().st_size / 1e6 / tokenizer_alone(tokenizer, corpora[0])
        runs = [("local", 1), ("local", 2)] + ([] if args.skip_ray else [("ray", 2)])
        rates, caches = {}, {}
        for engine, workers in runs:
            cache = folder / f"cache-{engine}-{workers}"
            os.environ["ONLINEMIX_CACHE_DIR"] = str(cache)
            started = time.perf_counter()
            results = prepare(config, workers=workers, engine=engine)
            seconds = time.perf_counter() - started
            assert all(r.status == "built" for r in results), [(r.domain, r.status, r.detail) for r in results]
            rates[engine, workers] = megabytes / seconds
            caches[engine, workers] = cache_bytes(cache)
        identical = all(c == caches["local", 1] for c in caches.values())
        # the same files as one domain: a folder of them, tokenized file by file, then assembled
        (folder / "one").mkdir()
        for corpus in corpora:
            os.link(corpus, folder / "one" / corpus.name)
        single = folder / "single.yaml"
        single.write_text(yaml.safe_dump({**mixture, "domains": [{"name": "all", "source": "jsonl", "path": "one"}]}))
        one_domain, one_caches = {}, []
        for workers in (1, 2):
            os.environ["ONLINEMIX_CACHE_DIR"] = str(folder / f"cache-one-{workers}")
            started = time.perf_counter()
            assert prepare(single, workers=workers)[0].status == "built"
            one_domain[workers] = megabytes / (time.perf_counter() - started)
            one_caches.append(cache_bytes(folder / f"cache-one-{workers}"))
        identical = identical and one_caches[0] == one_caches[1]

    print(f"\n{args.domains} domains x {args.mb:g} MB of stdlib source, a 4,096-token BPE tokenizer, one thread each")
    print(f"{'what':<34}{'MB/s':>8}{'per worker vs tokenizer':>26}{'vs 1 worker':>14}")
    print(f"{'tokenizer encode_batch, 1 process':<34}{alone:>8.2f}{'1.00x':>26}{'':>14}")
    for (engine, workers), rate in rates.items():
        per_worker = rate / workers / alone
        scaling = rate / rates["local", 1]
        label = f"prepare --engine {engine} --workers {workers}"
        print(f"{label:<34}{rate:>8.2f}{per_worker:>25.2f}x{scaling:>13.2f}x")
    for workers, rate in one_domain.items():
        label = f"one domain of {args.domains} files, {workers} w."
        print(f"{label:<34}{rate:>8.2f}{rate / workers / alone:>25.2f}x{rate / one_domain[1]:>13.2f}x")
    print(f"caches identical across engines and worker counts: {identical}")
    per_worker = rates["local", 1]
    for workers in (2, 64, 512):
        hours = TERABYTE / 1e6 / (per_worker * workers) / 3600
        print(f"a 1 TB corpus on {workers:>3} workers at {per_worker:.2f} MB/s each: {hours:,.1f} hours")
    if not identical:
        raise SystemExit("the engines wrote different caches")


if __name__ == "__main__":
    main()
