"""Importance inside the stream: what resampling and accept/reject cost the loader, and what they select.

    python benchmarks/importance_stream.py --documents 3000 --batches 150

Two JSONL domains from Python's standard library: ``code`` (source pieces of
about 285 tokens) and ``prose`` (every other docstring); the target is the
other docstrings. After ``importance fit`` and ``score``, the same mixture is
read side by side, in-process, three ways:

- plain: uniform within each domain;
- resampled: each domain's epoch by Gumbel-top-k on its sidecar (beta, keep);
- accept/reject: no sidecar, each sample scored in the worker and kept with
  probability ``min(1, exp(beta (s - tau)))``.

Columns: samples/s (and the ratio to plain), samples read per sample
delivered, and the KL reduction ``KL(target || code) - KL(target || drawn)``
of the ``code`` samples drawn (how much closer to the target they are).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from importance_throughput import corpus

from onlinemix.cli import main as cli
from onlinemix.loaders import MixedDataset, MixedLoader
from onlinemix.loaders.importance.estimator import ImportanceEstimator
from onlinemix.loaders.importance.sidecars import domain_texts


def write_jsonl(path: Path, texts: list[str]) -> None:
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=3000, help="code pieces")
    parser.add_argument("--batches", type=int, default=150, help="batches of 32 read per stream")
    parser.add_argument("--beta", type=float, default=1.0)
    args = parser.parse_args()

    code, docstrings = corpus(args.documents)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        write_jsonl(root / "code.jsonl", code)
        write_jsonl(root / "prose.jsonl", docstrings[::2])
        write_jsonl(root / "target.jsonl", docstrings[1::2])
        domains = [{"name": name, "source": "jsonl", "path": f"{name}.jsonl"} for name in ("code", "prose")]
        base = {"seed": 0, "global_batch_size": 32, "seq_len": 256, "domains": domains}
        (root / "plain.yaml").write_text(yaml.safe_dump(base))
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            cli(["importance", "fit", "--target", str(root / "target.jsonl"), "--config", str(root / "plain.yaml"),
                 "-o", str(root / "est.npz"), "--min-words", "5"])  # fmt: skip
            cli(["importance", "score", str(root / "est.npz"), "--config", str(root / "plain.yaml"),
                 "--out", str(root / "scores")])  # fmt: skip
        streams = {
            "plain": {},
            "resampled (keep 0.5)": {"sidecars": "scores", "beta": args.beta, "keep": 0.5},
            "accept/reject (tau: median)": {"estimator": "est.npz", "beta": args.beta, "accept_quantile": 0.5},
        }
        for number, (name, importance) in enumerate(streams.items()):
            path = root / f"stream{number}.yaml"
            path.write_text(yaml.safe_dump({**base, "importance": importance} if importance else base))
            streams[name] = path

        estimator = ImportanceEstimator.load(root / "est.npz")
        print(f"code: {len(code)} pieces, prose: {len(docstrings[::2])} docstrings, target: {len(docstrings[1::2])}")
        print(f"beta {args.beta}, {args.batches} batches of 32, in-process, median of 3 runs\n")
        print("| stream | samples/s | vs plain | reads per sample | KL reduction of the code drawn |")
        print("|---|---:|---:|---:|---:|")
        plain_rate = None
        for name, path in streams.items():
            rates = []
            for _ in range(3):
                dataset = MixedDataset.from_config(path, num_batches=args.batches)
                start = time.perf_counter()
                batches = list(MixedLoader(dataset))
                rates.append(args.batches * 32 / (time.perf_counter() - start))
            rate = float(np.median(rates))
            plain_rate = plain_rate or rate
            reads = np.concatenate([b["reads"].numpy() for b in batches]) if "reads" in batches[0] else np.ones(1)
            drawn = np.concatenate([b["index"][b["domain"] == 0].numpy() for b in batches])
            counts = estimator.hasher.counts(domain_texts(dataset.sources[0], drawn, "text"))
            reduction = estimator.kl_reduction(counts, "code")
            print(f"| {name} | {rate:,.0f} | {rate / plain_rate:.2f}x | {reads.mean():.2f} | {reduction:.4f} |")


if __name__ == "__main__":
    main()
