"""A Hugging Face dataset saved with ``save_to_disk`` (Arrow files): one document per row of ``column``.

``path`` is the folder ``save_to_disk`` wrote; for a ``DatasetDict`` (several splits), ``split``
chooses one (default ``train``). The dataset is opened with ``datasets.load_from_disk`` (memory-mapped,
nothing is copied) in each process that reads it. Parquet shards of a Hub dataset already on disk are
read by the ``parquet`` source instead.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from onlinemix.loaders.checksums import file_stamp
from onlinemix.loaders.extras import require
from onlinemix.loaders.paths import InputError
from onlinemix.loaders.sources.base import DocumentSource, SourceError
from onlinemix.loaders.sources.parquet import column_values
from onlinemix.loaders.transforms import Transform


class HFDatasetSource(DocumentSource):
    """The rows of a saved Hugging Face dataset (see the module docstring)."""

    kind = "hf"
    options: ClassVar[dict[str, type]] = {"column": str, "split": str}

    def __init__(
        self,
        path: str | Path,
        column: str = "text",
        split: str | None = None,
        transform: Transform | None = None,
        cache_dir=None,
    ):
        super().__init__(Path(path), transform)
        if not self.path.is_dir():
            raise InputError(f"{self.path} is not a folder written by Dataset.save_to_disk")
        self.column, self.split = column, split
        dataset = self.dataset
        if column not in dataset.column_names:
            raise SourceError(f"{self.path} has no column {column!r} (its columns: {dataset.column_names})")
        self._length = len(dataset)
        self.files = [Path(f["filename"]) for f in dataset.cache_files]

    @property
    def dataset(self) -> Any:
        """The dataset (or split), opened memory-mapped in this process on first use."""
        dataset = getattr(self, "_open_dataset", None)
        if dataset is None:
            datasets = require("datasets", "an hf domain")
            try:
                loaded = datasets.load_from_disk(str(self.path))
            except FileNotFoundError as error:
                raise InputError(f"{self.path}: not a dataset saved with save_to_disk ({error})") from None
            if isinstance(loaded, datasets.DatasetDict):
                split = self.split or "train"
                if split not in loaded:
                    raise SourceError(f"{self.path} has the splits {list(loaded)}, not {split!r} (set split:)")
                loaded = loaded[split]
            elif self.split is not None:
                raise SourceError(f"{self.path} is a single dataset, not a dictionary of splits: remove split:")
            dataset = self._open_dataset = loaded
        return dataset

    def documents(self, progress=None) -> Iterator[str | Any]:
        table = self.dataset.with_format("arrow")
        for start in range(0, self._length, 1024):
            values = table[start : start + 1024][self.column].to_pylist()
            yield from column_values(values, str(self.path), self.column)

    def input_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def fingerprint(self) -> dict:
        files = [file_stamp(path) for path in self.files]
        return {"kind": self.kind, "files": files, "column": self.column, "split": self.split}

    def __len__(self) -> int:
        return self._length

    def describe(self, index: int) -> str:
        return f"row {index}"

    def record(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self._length:
            raise SourceError(f"{self.path}: row {index} out of range [0, {self._length})")
        return self.dataset[int(index)]

    def text(self, index: int, field: str = "text") -> str:
        value = self.record(index)[self.column]
        return value if isinstance(value, str) else str(value)
