"""What packing document sources costs: the first open (tokenizing into the cache), reads, and disk.

Python's stdlib source as JSONL documents (one file per document; ``--mb`` of text), plain and gzipped,
read as a packed ``jsonl`` domain; against it, the same tokens pre-converted to a token-bin file. It
prints, side by side in one run:

- the first open's cost per GB of input, with the byte tokenizer and with a BPE ``tokenizer.json``
  (trained here, in memory, on the same text; no download), and a second open (the cache, found);
- samples/s of ``MixedLoader`` over the packed domain against the token-bin file (best of interleaved
  rounds; the same windows, checked);
- the cache's size against the input's.

Run: ``python benchmarks/packing.py [--mb 40] [--batches 300] [--rounds 3]``
"""

from __future__ import annotations

import argparse
import gzip
import json
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
from loader_throughput import BATCH, SEQ_LEN, best_rates

from onlinemix.loaders import MixedDataset, MixedLoader, TokenBinSource
from onlinemix.loaders.sources import JsonlSource, TokenizedSource
from onlinemix.loaders.tokenizers import ByteTokenizer, HFTokenizer


def stdlib_files() -> list[Path]:
    """Python's standard library source files, sorted: real text every machine with Python has."""
    return sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py"))


def write_jsonl(path: Path, files: list[Path], megabytes: float) -> Path:
    """``files`` as JSONL documents (one file each), repeated until ``megabytes`` of text are written."""
    size = 0
    with open(path, "w") as out:
        while size < megabytes * 1e6:
            for file in files:
                text = file.read_text(errors="replace")
                out.write(json.dumps({"text": text}) + "\n")
                size += len(text.encode())
                if size >= megabytes * 1e6:
                    break
    return path


def write_corpus(folder: Path, megabytes: float) -> tuple[Path, Path]:
    """Stdlib files as JSONL documents, repeated to ``megabytes`` of text; and the same gzipped."""
    plain = write_jsonl(folder / "corpus.jsonl", stdlib_files(), megabytes)
    packed = folder / "corpus.jsonl.gz"
    with open(plain, "rb") as source, gzip.open(packed, "wb", compresslevel=6) as target:
        target.write(source.read())
    return plain, packed


def bpe_tokenizer(corpus: Path, folder: Path, every_byte: bool = False) -> Path:
    """A 4,096-token byte-level BPE trained on the first documents of the corpus (in memory, a few seconds);
    ``every_byte``: every byte a token of its own, as GPT-2's (else a byte the sample lacks has none)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet() if every_byte else []
    trainer = trainers.BpeTrainer(
        vocab_size=4096, special_tokens=["<|endoftext|>"], show_progress=False, initial_alphabet=alphabet
    )
    with open(corpus) as lines:
        sample = [json.loads(line)["text"] for _, line in zip(range(300), lines)]
    tokenizer.train_from_iterator(sample, trainer)
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return path


def first_open(corpus: Path, tokenizer, cache: Path) -> tuple[float, TokenizedSource]:
    started = time.perf_counter()
    source = TokenizedSource(JsonlSource(corpus), tokenizer, SEQ_LEN, cache_dir=cache)
    len(source)  # opening builds the cache
    return time.perf_counter() - started, source


def loader(source) -> MixedLoader:
    return MixedLoader(MixedDataset.from_sources({"text": source}, BATCH, seed=0), num_workers=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=40, help="megabytes of text (default 40)")
    parser.add_argument("--batches", type=int, default=300, help="timed batches per loader and round")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the best one counts")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        folder = Path(name)
        plain, gz = write_corpus(folder, args.mb)
        gigabytes = plain.stat().st_size / 1e9
        rows = []
        for label, corpus, tokenizer in (
            ("byte tokenizer, .jsonl", plain, ByteTokenizer()),
            ("byte tokenizer, .jsonl.gz", gz, ByteTokenizer()),
            ("BPE tokenizer.json (4,096 tokens), .jsonl", plain, HFTokenizer(bpe_tokenizer(plain, folder))),
        ):
            cache = folder / f"cache-{len(rows)}"
            seconds, source = first_open(corpus, tokenizer, cache)
            again, _ = first_open(corpus, tokenizer, cache)
            disk = sum(f.stat().st_size for f in cache.rglob("*") if f.is_file())
            rows.append((label, seconds / gigabytes, again, disk, corpus.stat().st_size, source))
        print(f"{args.mb:g} MB of stdlib source as JSONL ({gigabytes * 1e3:.0f} MB), seq_len {SEQ_LEN}")
        print("| input | first open, s per GB of text | second open | cache on disk | vs the input file |")
        print("|---|---:|---:|---:|---:|")
        for label, per_gb, again, disk, size, _ in rows:
            print(f"| {label} | {per_gb:.0f} | {again * 1e3:.0f} ms | {disk / 1e6:.1f} MB | {disk / size:.2f}x |")

        packed = rows[0][5]
        tokens = np.memmap(next((folder / "cache-0").rglob("tokens.bin")), dtype=np.uint16, mode="r")
        np.asarray(tokens).tofile(folder / "same.bin")
        tokenbin = TokenBinSource(folder / "same.bin", SEQ_LEN, dtype="uint16")
        everything = np.arange(0, len(packed), max(1, len(packed) // 1000))
        assert np.array_equal(packed.read_batch(everything)["input_ids"], tokenbin.read_batch(everything)["input_ids"])
        best = best_rates(
            {"token-bin file": lambda: loader(tokenbin), "packed JSONL (cache)": lambda: loader(packed)},
            args.rounds,
            args.batches,
        )
        print(f"\nreads, batch {BATCH} x {SEQ_LEN + 1} tokens, in-process, best of {args.rounds} rounds:")
        print("| domain | samples/s | vs token-bin |\n|---|---:|---:|")
        for label, rate in best.items():
            print(f"| {label} | {rate:,.0f} | {rate / best['token-bin file']:.2f}x |")


if __name__ == "__main__":
    main()
