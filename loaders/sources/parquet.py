"""Parquet files (pyarrow): one document per row, its text in ``column`` (default ``text``).

``path`` is a file, a folder (its ``.parquet`` files, recursively, by name: e.g. the ``data/`` folder of
a Hugging Face Hub dataset already on disk), a glob pattern or a list of those. Rows are read in
file order, row group by row group. A missing column, or one that holds neither text nor token ids,
is an error naming the file and the columns it has.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from onlinemix.loaders.checksums import file_stamp
from onlinemix.loaders.extras import require
from onlinemix.loaders.paths import expand_paths
from onlinemix.loaders.sources.base import DocumentSource, SourceError
from onlinemix.loaders.sources.jsonl import describe_paths
from onlinemix.loaders.storage import StorageError, StoragePath, for_library
from onlinemix.loaders.transforms import Transform


def _pyarrow_parquet():
    return require("pyarrow.parquet", "a parquet domain")


def parquet_file(path: StoragePath):
    """``pyarrow.parquet.ParquetFile`` of a local file or an object at a URL (read in range requests)."""
    return _pyarrow_parquet().ParquetFile(for_library(path))


def column_values(values: list, where: str, column: str) -> Iterator[str | np.ndarray]:
    """A column's cells as documents: text as it is, lists of integers as token-id arrays."""
    for value in values:
        if isinstance(value, str):
            yield value
        elif isinstance(value, (list, np.ndarray)) and (len(value) == 0 or isinstance(value[0], (int, np.integer))):
            yield np.asarray(value, dtype=np.int64)
        else:
            raise SourceError(f"{where}: column {column!r} holds a {type(value).__name__}, not text or token ids")


class ParquetSource(DocumentSource):
    """One document per Parquet row (see the module docstring)."""

    per_file = True  # its documents are its files' documents, file after file (see cache.tokens.part_cuts)
    kind = "parquet"
    options: ClassVar[dict[str, type]] = {"column": str}
    suffixes = (".parquet",)

    def __init__(
        self, path: str | Path | list, column: str = "text", transform: Transform | None = None, cache_dir=None
    ):
        self.files = expand_paths(path, Path("."), self.suffixes)
        super().__init__(describe_paths(self.files), transform)
        self.column = column
        rows = []
        for file in self.files:
            try:
                metadata = parquet_file(file).metadata
            except (StorageError, FileNotFoundError):
                raise
            except Exception as error:
                raise SourceError(f"{file}: not a Parquet file ({error})") from None
            names = metadata.schema.names
            if column not in names:
                raise SourceError(f"{file} has no column {column!r} (its columns: {names})")
            rows.append(metadata.num_rows)
        self.rows = np.asarray(rows, dtype=np.int64)
        self.starts = np.cumsum(self.rows) - self.rows

    def documents(self, progress=None) -> Iterator[str | np.ndarray]:
        for file in self.files:
            parquet = parquet_file(file)
            for group in self._groups(parquet):
                table = parquet.read_row_group(group, columns=[self.column])
                yield from column_values(table.column(0).to_pylist(), str(file), self.column)
                if progress is not None:
                    progress(parquet.metadata.row_group(group).total_byte_size)

    def _groups(self, parquet) -> range:
        """The row groups this source reads of a file: all, or those of its piece (``span``)."""
        return range(*self.span) if self.span is not None else range(parquet.num_row_groups)

    def pieces(self, file: StoragePath, size: int) -> list[tuple[int, int]]:
        """Runs of whole row groups of about ``size`` bytes (uncompressed) each."""
        metadata = parquet_file(file).metadata
        cuts, gathered = [0], 0
        for group in range(metadata.num_row_groups):
            if gathered >= size:
                cuts.append(group)
                gathered = 0
            gathered += metadata.row_group(group).total_byte_size
        return list(zip(cuts, [*cuts[1:], metadata.num_row_groups]))

    def input_bytes(self) -> int:
        total = 0
        for file in self.files:
            parquet = parquet_file(file)
            total += sum(parquet.metadata.row_group(g).total_byte_size for g in self._groups(parquet))
        return total

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "files": [file_stamp(path) for path in self.files], "column": self.column}

    def __len__(self) -> int:
        return int(self.rows.sum())

    def describe(self, index: int) -> str:
        number = int(np.searchsorted(self.starts, index, side="right")) - 1
        return f"{self.files[number].name} row {index - self.starts[number]}"

    def record(self, index: int) -> dict[str, Any]:
        if not 0 <= index < len(self):
            raise SourceError(f"{self.path}: row {index} out of range [0, {len(self)})")
        number = int(np.searchsorted(self.starts, index, side="right")) - 1
        row = int(index - self.starts[number])
        table = self._file(number).read_row_groups(*self._group_of(number, row))
        return table.slice(row - self._group_of(number, row)[1], 1).to_pylist()[0]

    def _file(self, number: int):
        opened = self.__dict__.setdefault("_open_files", {})
        if number not in opened:
            opened[number] = parquet_file(self.files[number])
        return opened[number]

    def _group_of(self, number: int, row: int) -> tuple[list[int], int]:
        """The row group of a file that holds ``row``, and the first row of that group."""
        metadata = self._file(number).metadata
        first = 0
        for group in range(metadata.num_row_groups):
            size = metadata.row_group(group).num_rows
            if row < first + size:
                return [group], first
            first += size
        raise SourceError(f"{self.files[number]}: row {row} out of range")

    def text(self, index: int, field: str = "text") -> str:
        value = self.record(index)[self.column]
        return value if isinstance(value, str) else str(value)
