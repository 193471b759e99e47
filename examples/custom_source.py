"""Bring your own source: two domains of your own mixed with a built-in one, resumed and replayed exactly.

- ``SQLiteDocuments`` keeps documents in an SQLite table. It is a ``DocumentSource``: it says how to
  stream its documents, and onlinemix tokenizes them once into its cache and packs them into
  ``seq_len + 1`` windows, as it does for JSONL or Parquet.
- ``Arithmetic`` computes each sample from its index (synthetic ``a+b=c`` lines, byte tokens). It is a
  plain ``Source``: a length and a pure ``read_batch``; no file at all.

A mixture file names such a class as ``source: module:Class`` (the module importable, e.g. beside the
script); ``MixedDataset.from_sources`` takes instances directly. Run::

    python examples/custom_source.py --out runs/custom
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import sysconfig
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from onlinemix import MixedDataset, MixedLoader, Source
from onlinemix.loaders.sources.base import DocumentSource
from onlinemix.loaders.transforms import Transform


# --8<-- [start:SQLiteDocuments]
class SQLiteDocuments(DocumentSource):
    """The ``column`` of every row of ``table`` in an SQLite file, in ``rowid`` order, one document each."""

    def __init__(
        self, path: str | Path, transform: Transform | None = None, table: str = "documents", column: str = "text"
    ):
        super().__init__(Path(path), transform)
        if not self.path.is_file():
            raise FileNotFoundError(2, "no such SQLite file", str(self.path))
        self.table, self.column = table, column

    def _db(self) -> sqlite3.Connection:
        # Opened on first use and dropped when pickled (an ``_open`` attribute), so workers open their own.
        if getattr(self, "_open_db", None) is None:
            self._open_db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True)
        return self._open_db

    def documents(self, progress: Callable[[int], Any] | None = None) -> Iterator[str]:
        for (text,) in self._db().execute(f'SELECT "{self.column}" FROM "{self.table}" ORDER BY rowid'):
            if progress is not None:
                progress(len(text))
            yield text

    def input_bytes(self) -> int:
        return self.path.stat().st_size

    def fingerprint(self) -> dict:
        # What changes when a document would: the cache is rebuilt, and a checkpoint refuses to resume.
        stat = self.path.stat()
        return {
            "file": str(self.path.resolve()),
            "size": stat.st_size,
            "mtime_ns": stat.st_mtime_ns,
            "table": self.table,
            "column": self.column,
        }

    # The record interface: only used with a ``transform`` (one sample per row instead of packed windows).
    def __len__(self) -> int:
        return self._db().execute(f'SELECT COUNT(*) FROM "{self.table}"').fetchone()[0]

    def record(self, index: int) -> str:
        query = f'SELECT "{self.column}" FROM "{self.table}" ORDER BY rowid LIMIT 1 OFFSET ?'
        return self._db().execute(query, (index,)).fetchone()[0]


# --8<-- [end:SQLiteDocuments]


# --8<-- [start:Arithmetic]
class Arithmetic(Source):
    """``size`` windows of ``a+b=c`` lines as UTF-8 bytes; window ``i`` depends on ``(seed, i)`` alone."""

    def __init__(self, size: int, seq_len: int, seed: int = 0):
        super().__init__(f"arithmetic(seed={seed})")
        self.size, self.seq_len, self.seed = size, seq_len, seed

    def __len__(self) -> int:
        return self.size

    def record(self, index: int) -> np.ndarray:
        pairs = np.random.default_rng((self.seed, index)).integers(0, 1000, (self.seq_len, 2))
        text = "".join(f"{a}+{b}={a + b}\n" for a, b in pairs)
        return np.frombuffer(text.encode(), np.uint8)[: self.seq_len + 1].astype(np.int64)

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        windows = np.stack([self.record(int(index)) for index in indices])
        return {"input_ids": windows[:, :-1], "labels": windows[:, 1:]}

    def fingerprint(self) -> dict:
        return {"seed": self.seed, "seq_len": self.seq_len}


# --8<-- [end:Arithmetic]


def write_data(out: Path) -> Path:
    """An SQLite table of the stdlib's module docstrings, the json package's source files, and a mixture file of both
    plus an ``Arithmetic`` domain."""
    out.mkdir(parents=True, exist_ok=True)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    database = out / "docstrings.sqlite"
    database.unlink(missing_ok=True)
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE documents (text TEXT)")
        for file in sorted(stdlib.glob("*.py"))[:80]:
            text = file.read_text(errors="replace")
            db.execute("INSERT INTO documents VALUES (?)", (text[: text.find("import")].strip() or file.name,))
    mixture = {
        "seed": 7,
        "global_batch_size": 8,
        "seq_len": 64,
        "domains": [
            {"name": "docstrings", "source": "custom_source:SQLiteDocuments", "path": str(database), "weight": 0.4},
            {"name": "arithmetic", "source": "custom_source:Arithmetic", "size": 100_000, "weight": 0.2},
            {"name": "json_code", "source": "text", "path": str(stdlib / "json" / "*.py"), "weight": 0.4},
        ],
    }
    path = out / "mixture.yaml"
    path.write_text(yaml.safe_dump(mixture, sort_keys=False))
    return path


def pairs(loader: MixedLoader) -> list[list[tuple[int, int]]]:
    """Each batch as its (domain, index) pairs."""
    return [list(zip(batch["domain"].tolist(), batch["index"].tolist())) for batch in loader]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/custom"), help="where the data and mixture go")
    args = parser.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))  # so that ``custom_source:...`` imports in the workers too
    mixture = write_data(args.out)

    dataset = MixedDataset.from_config(mixture, num_batches=12)
    for name, source in zip(dataset.names, dataset.sources):
        print(f"{name:>10}: {len(source):6d} samples ({type(source).__name__})")
    batch = next(iter(MixedLoader(dataset, num_workers=0)))
    for domain, ids in zip(batch["domain"][:3].tolist(), batch["input_ids"][:3]):
        print(f"{dataset.names[domain]:>10}: {bytes(ids[:48].tolist()).decode(errors='replace')!r}")

    whole = pairs(MixedLoader(dataset, num_workers=2))
    loader = MixedLoader(MixedDataset.from_config(mixture, num_batches=12), num_workers=2)
    first = [pair for _, pair in zip(range(5), pairs(loader))]
    resumed = MixedLoader(MixedDataset.from_config(mixture, num_batches=12), num_workers=0)
    resumed.load_state_dict(loader.state_dict(5))
    assert first + pairs(resumed) == whole, "a resumed stream differs"
    print(f"12 batches with 2 workers = 5 batches + resumed 7 with none: {len(whole)} batches, equal")


if __name__ == "__main__":
    main()
