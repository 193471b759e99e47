"""Build small real-text domains from Python's own standard library source (no download).

Four domains, each a different kind of text a model can tell apart:

- ``code``:  the stdlib's ``.py`` files, comments and docstrings included   -> token-bin
- ``tests``: the stdlib's test suite (``test/``)                            -> token-bin
- ``docs``:  every module, class and function docstring, one per line       -> JSONL
- ``web``:   the HTML, CSS, XML and JSON-ish files shipped with Python       -> token-bin

Tokens are UTF-8 bytes (``loaders.ByteTokenizer``; ids 0-255, 256 ends a
file), stored as uint16. A ``mixture.yaml`` that mixes them is written beside
the data, and ``heldout.yaml`` names text kept out of training: a validation
set per domain (``val/``) and ``target``, a small set of docstrings that
targeted mixing (DGA) aligns with. Usage::

    python examples/prepare_data.py --out examples/data [--max-mb 4]
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
import sysconfig
from pathlib import Path

import numpy as np
from tqdm import tqdm

from onlinemix.loaders.tokenizers import ByteTokenizer

MIXTURE = """\
# Python-stdlib mixture written by examples/prepare_data.py
seed: 1234
global_batch_size: 32
seq_len: {seq_len}
domains:
  - {{name: code,  source: tokenbin, path: code.bin,  dtype: uint16, weight: 0.4}}
  - {{name: tests, source: tokenbin, path: tests.bin, dtype: uint16, weight: 0.2}}
  - {{name: docs,  source: jsonl,    path: docs.jsonl, field: text, weight: 0.2}}
  - {{name: web,   source: tokenbin, path: web.bin,   dtype: uint16, weight: 0.2}}
"""
HELDOUT = """\
# Held-out text written by examples/prepare_data.py: a validation set per training domain, and
# `target`, a few docstrings that targeted mixing aligns with (disjoint from docs' validation set).
seed: 0
global_batch_size: 32
seq_len: {seq_len}
domains:
  - {{name: code,   source: tokenbin, path: val/code.bin,  dtype: uint16}}
  - {{name: tests,  source: tokenbin, path: val/tests.bin, dtype: uint16}}
  - {{name: docs,   source: jsonl,    path: val/docs.jsonl, field: text}}
  - {{name: web,    source: tokenbin, path: val/web.bin,   dtype: uint16}}
  - {{name: target, source: jsonl,    path: val/target.jsonl, field: text}}
"""
VALIDATION_BYTES = 200_000  # held-out text per token-bin domain
VALIDATION_DOCS, TARGET_DOCS = 1024, 256
WEB_SUFFIXES = {".html", ".htm", ".css", ".xml", ".xsl", ".js", ".json", ".svg", ".txt", ".rst"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*") if p.is_file() and "site-packages" not in p.parts)


def docstrings(source: str) -> list[str]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return []
    nodes = [tree, *(n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef)))]
    return [doc for node in nodes if (doc := ast.get_docstring(node)) and len(doc) > 40]


def write_bin(path: Path, texts: list[str], max_bytes: int, tokenizer: ByteTokenizer) -> int:
    """Tokenize ``texts`` into ``path`` until ``max_bytes`` tokens; returns how many texts were used."""
    tokens, total = [], 0
    for text in texts:
        if total >= max_bytes:
            break
        tokens.append(tokenizer.encode(text))
        total += len(tokens[-1])
    np.concatenate(tokens).astype(np.uint16).tofile(path)
    return len(tokens)


def write_jsonl(path: Path, texts: list[str]) -> None:
    with open(path, "w") as file:
        for text in texts:
            file.write(json.dumps({"text": text}) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("examples/data"), help="output folder")
    parser.add_argument("--max-mb", type=float, default=4.0, help="cap per token-bin domain, in MB of text")
    parser.add_argument("--seq-len", type=int, default=128, help="seq_len written into mixture.yaml")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    cap = int(args.max_mb * 1e6)
    tokenizer = ByteTokenizer()

    groups: dict[str, list[str]] = {"code": [], "tests": [], "docs": [], "web": []}
    for path in tqdm(stdlib_files(), desc="reading the stdlib", unit="file", mininterval=1.0):
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if path.suffix == ".py":
            groups["tests" if "test" in path.parts or "tests" in path.parts else "code"].append(text)
            groups["docs"].extend(docstrings(text))
        elif path.suffix in WEB_SUFFIXES:
            groups["web"].append(text)

    rng = np.random.default_rng(0)  # interleave files so a cap keeps a spread of packages
    (args.out / "val").mkdir(exist_ok=True)
    summary = {}
    for name in ("code", "tests", "web"):
        texts = [groups[name][i] for i in rng.permutation(len(groups[name]))]
        if len(texts) < 2:
            raise SystemExit(f"{name}: the stdlib at {sysconfig.get_paths()['stdlib']} has {len(texts)} such files")
        held_out = write_bin(args.out / "val" / f"{name}.bin", texts, VALIDATION_BYTES, tokenizer)
        if held_out == len(texts):  # keep at least one file for training
            held_out = write_bin(args.out / "val" / f"{name}.bin", texts[:-1], VALIDATION_BYTES, tokenizer)
        write_bin(args.out / f"{name}.bin", texts[held_out:], cap, tokenizer)
        summary[name] = (args.out / f"{name}.bin").stat().st_size // 2
    docs = [groups["docs"][i] for i in rng.permutation(len(groups["docs"]))]
    held_out = VALIDATION_DOCS + TARGET_DOCS
    write_jsonl(args.out / "val" / "docs.jsonl", docs[:VALIDATION_DOCS])
    write_jsonl(args.out / "val" / "target.jsonl", docs[VALIDATION_DOCS:held_out])
    write_jsonl(args.out / "docs.jsonl", docs[held_out:])
    summary["docs"] = len(docs) - held_out
    (args.out / "mixture.yaml").write_text(MIXTURE.format(seq_len=args.seq_len))
    (args.out / "heldout.yaml").write_text(HELDOUT.format(seq_len=args.seq_len))
    for name, size in summary.items():
        unit = "documents" if name == "docs" else "tokens"
        print(f"{name:6} {size:>12,} {unit}")
    print(f"wrote {args.out / 'mixture.yaml'} and {args.out / 'heldout.yaml'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
