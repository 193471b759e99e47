"""How fast ``onlinemix prepare`` tokenizes a corpus: against the tokenizer backends themselves, by stage, and with
more workers.

One JSONL file of Python's stdlib source (``--mb`` of it, 200 by default: large enough that start-up does not
decide the rates), and a 4,096-token byte-level BPE ``tokenizer.json`` trained here on the same text (no
download). It prints, side by side in one run:

- each backend's own batch encoding over the same documents, in one process: ``fastokens``'
  ``encode_batch_flat`` (what onlinemix uses) and ``tokenizers``' ``encode_batch`` (on a share of them: it is
  slow); the ceiling per worker;
- a first open's stages, each timed alone on ``--stage-mb`` of text in every format (JSONL, .jsonl.zst, a folder
  of text files, Parquet): read the bytes, decompress, split and parse, tokenize, pack (ids laid end to end with
  their end-of-text tokens, cast), write; and the first open itself against the backend's own rate;
- ``prepare`` of the one large file with 1 and 2 local workers and 2 Ray tasks on a local Ray cluster
  (``--skip-ray`` leaves it out), which cut it into parts of 32 MB; 2 workers against 1, Ray against local;
- that every engine wrote the same bytes, and the same as a cache built with ``tokenizers`` alone;
- what a 1 TB corpus costs in core-hours at the measured rate per worker.

Every process's tokenizer runs on one thread (``RAYON_NUM_THREADS=1``), so a worker is a core.

Run: ``python benchmarks/prepare_throughput.py [--mb 200] [--stage-mb 40] [--skip-ray] [--skip-tokenizers]``
"""

from __future__ import annotations

import os

os.environ["RAYON_NUM_THREADS"] = os.environ["RAYON_RS_NUM_CPUS"] = "1"  # before any tokenizer starts its pool

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

from onlinemix.loaders.prepare import prepare
from onlinemix.loaders.tokenizers import BACKEND_ENV, HFTokenizer

TERABYTE = 1e12
BATCH = 256  # documents per encoding call, as the token cache encodes them


def documents_of(corpus: Path) -> list[str]:
    with open(corpus, "rb") as lines:
        return [json.loads(line)["text"] for line in lines if line.strip()]


def encode_rates(tokenizer: Path, texts: list[str]) -> dict[str, float]:
    """MB of text per second of each backend's own batch encoding (tokenizers on 20 MB of the texts: it is slow)."""
    import fastokens
    import tokenizers

    rates = {}
    step = max(1, round(sum(len(t) for t in texts) / 20e6))
    for name, share in (("fastokens encode_batch_flat", texts), ("tokenizers encode_batch", texts[::step])):
        if name.startswith("fastokens"):
            encoder = fastokens.Tokenizer.from_file(str(tokenizer))
            encode = encoder.encode_batch_flat
        else:
            encoder = tokenizers.Tokenizer.from_file(str(tokenizer))
            encode = encoder.encode_batch
        started = time.perf_counter()
        for i in range(0, len(share), BATCH):
            encode(share[i : i + BATCH], add_special_tokens=False)
        rates[name] = sum(len(t.encode()) for t in share) / 1e6 / (time.perf_counter() - started)
    return rates


def stage_times(files: dict[str, Path], tokenizer: Path, scratch: Path) -> dict[str, dict[str, float]]:
    """Seconds of each stage of a first open, each stage timed alone (the stages a build runs one after another)."""
    import zstandard

    from onlinemix.loaders.sources import JsonlSource, ParquetSource, TextSource

    ours = HFTokenizer(tokenizer)
    ours.encode_flat(["warm up: the backend compiles its patterns on first use"])
    times = {}
    for kind, path in files.items():
        row: dict[str, float] = {}
        started = time.perf_counter()
        raw = b"".join(p.read_bytes() for p in (sorted(path.iterdir()) if path.is_dir() else [path]))
        row["read"] = time.perf_counter() - started
        if kind == ".jsonl.zst":
            started = time.perf_counter()
            zstandard.ZstdDecompressor().decompressobj().decompress(raw)
            row["decompress"] = time.perf_counter() - started
        source = {"JSONL": JsonlSource, ".jsonl.zst": JsonlSource, "text": TextSource, "Parquet": ParquetSource}[kind]
        started = time.perf_counter()
        texts = list(source(path).documents())  # reading again, from the page cache: split and parse it is
        row["split and parse"] = time.perf_counter() - started - row.get("decompress", 0.0)
        started = time.perf_counter()
        encoded = [ours.encoder.encode_batch_flat(texts[i : i + BATCH]) for i in range(0, len(texts), BATCH)]
        row["tokenize"] = time.perf_counter() - started
        started = time.perf_counter()
        from onlinemix.loaders.tokenizers import with_ends

        packed = []
        for ids, offsets in encoded:
            ends = np.frombuffer(offsets, dtype=np.uint64)[1:].astype(np.int64)
            packed.append(with_ends(np.frombuffer(ids, dtype=np.uint32), ends, ours.eot_id)[0].astype(np.uint16))
        row["pack"] = time.perf_counter() - started
        started = time.perf_counter()
        with open(scratch / "stage.bin", "wb") as out:
            out.write(np.concatenate(packed).tobytes())
            out.flush()
            os.fsync(out.fileno())
        row["write"] = time.perf_counter() - started
        row["megabytes"] = sum(len(t.encode()) for t in texts) / 1e6
        times[kind] = row
    return times


def first_open_rate(path: Path, kind: str, tokenizer: Path, cache: Path) -> float:
    """MB of text per second of a first open of ``path`` as one domain (one process, the token cache built)."""
    from onlinemix import MixedDataset

    source = {"JSONL": "jsonl", ".jsonl.zst": "jsonl", "text": "text", "Parquet": "parquet"}[kind]
    config = {"seed": 0, "global_batch_size": 8, "seq_len": 1024, "tokenizer": str(tokenizer), "cache_dir": str(cache),
              "domains": [{"name": "d", "source": source, "path": str(path)}]}  # fmt: skip
    (cache.parent / f"{source}.yaml").write_text(yaml.safe_dump(config))
    started = time.perf_counter()
    (opened,) = MixedDataset.from_config(cache.parent / f"{source}.yaml").sources
    return opened.cache.meta["characters"] / 1e6 / (time.perf_counter() - started)


def formats(corpus: Path, megabytes: float, folder: Path) -> dict[str, Path]:
    """The first ``megabytes`` of ``corpus`` as JSONL, .jsonl.zst, a folder of text files and Parquet."""
    import pyarrow
    import pyarrow.parquet as pq
    import zstandard

    texts, size = [], 0
    for text in documents_of(corpus):
        texts.append(text)
        size += len(text.encode())
        if size >= megabytes * 1e6:
            break
    plain = folder / "stage.jsonl"
    plain.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    packed = folder / "stage.jsonl.zst"
    packed.write_bytes(zstandard.ZstdCompressor(level=3).compress(plain.read_bytes()))
    (folder / "text").mkdir()
    for number, text in enumerate(texts):
        (folder / "text" / f"{number:06d}.txt").write_text(text)
    pq.write_table(pyarrow.table({"text": texts}), folder / "stage.parquet", row_group_size=2048)
    return {"JSONL": plain, ".jsonl.zst": packed, "text": folder / "text", "Parquet": folder / "stage.parquet"}


def ray_start_up(workers: int) -> float:
    """Seconds a local Ray cluster takes to start and run one trivial task on each of ``workers`` CPUs (what a
    prepare on Ray pays before its first part)."""
    import ray

    started = time.perf_counter()
    ray.init(num_cpus=workers, log_to_driver=False)
    ray.get([ray.remote(lambda: None).remote() for _ in range(workers)])
    seconds = time.perf_counter() - started
    ray.shutdown()
    return seconds


def cache_bytes(cache: Path) -> dict[str, bytes]:
    return {p.name: (p / "tokens.bin").read_bytes() for p in sorted(cache.iterdir()) if (p / "meta.json").exists()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=200.0, help="MB of text in the large file (default 200)")
    parser.add_argument("--stage-mb", type=float, default=40.0, help="MB of text per format for the stages (40)")
    parser.add_argument("--skip-ray", action="store_true", help="leave out the Ray engine")
    parser.add_argument(
        "--skip-tokenizers",
        action="store_true",
        help="leave out the prepare with tokenizers alone (at ~2 MB/s a worker: long for a large --mb)",
    )
    args = parser.parse_args()
    # here, not at the top: spawned workers import this file again, and need none of it
    from packing import bpe_tokenizer, stdlib_files, write_jsonl

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        corpus = write_jsonl(folder / "corpus.jsonl", stdlib_files(), args.mb)
        tokenizer = bpe_tokenizer(corpus, folder, every_byte=True)
        texts = documents_of(corpus)
        megabytes = sum(len(t.encode()) for t in texts) / 1e6  # text, as the backends see it
        alone = encode_rates(tokenizer, texts)
        backend_rate = alone["fastokens encode_batch_flat"]
        del texts

        files = formats(corpus, args.stage_mb, folder)
        stages = stage_times(files, tokenizer, folder)
        opens = {kind: first_open_rate(path, kind, tokenizer, folder / f"open-{i}") for i, (kind, path) in
                 enumerate(files.items())}  # fmt: skip

        mixture = {"seed": 0, "global_batch_size": 8, "seq_len": 1024, "tokenizer": str(tokenizer),
                   "domains": [{"name": "web", "source": "jsonl", "path": str(corpus)}]}  # fmt: skip
        config = folder / "mixture.yaml"
        config.write_text(yaml.safe_dump(mixture))
        runs = [("local", 1), ("local", 2)] + ([] if args.skip_ray else [("ray", 2)])
        rates, caches = {}, {}
        for engine, workers in runs:
            cache = folder / f"cache-{engine}-{workers}"
            os.environ["ONLINEMIX_CACHE_DIR"] = str(cache)
            started = time.perf_counter()
            (result,) = prepare(config, workers=workers, engine=engine)
            assert result.status == "built", (result.status, result.detail)
            rates[engine, workers] = megabytes / (time.perf_counter() - started)
            caches[engine, workers] = cache_bytes(cache)
            if (engine, workers) != ("local", 1):
                shutil.rmtree(cache)
        identical = all(c == caches["local", 1] for c in caches.values())
        reference_rate, same_as_tokenizers = None, None
        if not args.skip_tokenizers:
            os.environ["ONLINEMIX_CACHE_DIR"], os.environ[BACKEND_ENV] = str(folder / "cache-tokenizers"), "tokenizers"
            started = time.perf_counter()
            (result,) = prepare(config, workers=2)
            reference_rate = megabytes / (time.perf_counter() - started)
            del os.environ[BACKEND_ENV]
            same_as_tokenizers = cache_bytes(folder / "cache-tokenizers") == caches["local", 1]

    print(f"\none JSONL file of {megabytes:,.0f} MB of stdlib source, a 4,096-token byte-level BPE, one thread each")
    print("\n| what | MB/s | vs fastokens alone |\n|---|---:|---:|")
    for name, rate in alone.items():
        print(f"| {name}, 1 process | {rate:.1f} | {rate / backend_rate:.2f}x |")
    stage_names = ["read", "decompress", "split and parse", "tokenize", "pack", "write"]
    print(f"\nstages of a first open, {args.stage_mb:g} MB of text each, seconds per 100 MB of text (each alone):")
    print("| format | " + " | ".join(stage_names) + " | first open MB/s | vs fastokens alone |")
    print("|---|" + "---:|" * (len(stage_names) + 2))
    for kind, row in stages.items():
        cells = [f"{row[s] * 100 / row['megabytes']:.2f}" if s in row else "–" for s in stage_names]
        print(f"| {kind} | " + " | ".join(cells) + f" | {opens[kind]:.1f} | {opens[kind] / backend_rate:.2f}x |")
    print("\n| prepare, one file in parts of 32 MB | MB/s | per worker vs fastokens alone | vs 1 local worker |")
    print("|---|---:|---:|---:|")
    for (engine, workers), rate in rates.items():
        print(f"| --engine {engine} --workers {workers} | {rate:.1f} | {rate / workers / backend_rate:.2f}x | "
              f"{rate / rates['local', 1]:.2f}x |")  # fmt: skip
    if reference_rate is not None:
        reference = f"{reference_rate / rates['local', 1]:.2f}x"
        print(f"| --workers 2, {BACKEND_ENV}=tokenizers | {reference_rate:.1f} | | {reference} |")
    if ("ray", 2) in rates:
        print(f"\nRay against local processes at 2 workers: {rates['ray', 2] / rates['local', 2]:.2f}x; a local Ray "
              f"cluster's start-up and first tasks alone: {ray_start_up(2):.1f} s (the whole prepare at 2 local "
              f"workers: {megabytes / rates['local', 2]:.1f} s)")  # fmt: skip
    checked = "not checked" if same_as_tokenizers is None else same_as_tokenizers
    print(f"caches identical across engines and worker counts: {identical}; as tokenizers': {checked}")
    per_worker = rates["local", 1]
    print(f"a 1 TB corpus at {per_worker:.1f} MB/s a worker: {TERABYTE / 1e6 / per_worker / 3600:,.1f} core-hours")
    if not identical or same_as_tokenizers is False:
        raise SystemExit("the caches differ")


if __name__ == "__main__":
    main()
