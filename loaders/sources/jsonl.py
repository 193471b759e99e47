"""JSONL: one JSON document per line, addressed through a cached line-offset index.

The index (the byte offset of every non-empty line) is built once with a
vectorised newline scan and saved beside the file as
``<file>.onlinemix-idx.npy``, together with the file's size and
modification time; a changed file rebuilds it. Where the folder is read-only
the index is kept in memory for the process. Empty lines are not documents.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from onlinemix.loaders.files import FileHandles, file_header, save_cache
from onlinemix.loaders.sources.base import Source, SourceError
from onlinemix.loaders.transforms import ByteTokenizer, Transform
from tqdm import tqdm

INDEX_SUFFIX = ".onlinemix-idx.npy"
INDEX_VERSION = 1
_HEADER = 3  # version, file size, mtime_ns: stored ahead of the offsets
_CHUNK = 16 << 20
_PROGRESS_FROM = 64 << 20  # show a progress bar when indexing files at least this large


def index_path(path: Path) -> Path:
    return path.with_name(path.name + INDEX_SUFFIX)


def _scan_line_starts(path: Path) -> np.ndarray:
    """Byte offsets of the non-empty lines of ``path``."""
    size = path.stat().st_size
    starts = []
    position = 0
    line_start = 0  # offset where the current (unfinished) line began
    with (
        open(path, "rb") as file,
        tqdm(
            total=size, unit="B", unit_scale=True, desc=f"indexing {path.name}", disable=size < _PROGRESS_FROM
        ) as progress,
    ):
        while chunk := file.read(_CHUNK):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + position
            line_starts = np.concatenate(([line_start], newlines[:-1] + 1)) if len(newlines) else np.empty(0)
            nonempty = newlines > line_starts  # the line has at least one byte before its newline
            starts.append(line_starts[nonempty].astype(np.uint64))
            if len(newlines):
                line_start = int(newlines[-1]) + 1
            position += len(chunk)
            progress.update(len(chunk))
    if line_start < size:  # last line without a trailing newline
        starts.append(np.array([line_start], dtype=np.uint64))
    return np.concatenate(starts) if starts else np.empty(0, dtype=np.uint64)


def load_index(path: Path) -> np.ndarray:
    """Line offsets of ``path``, from the cache when it matches the file, else rebuilt (and cached)."""
    header = file_header(path, INDEX_VERSION)
    cache = index_path(path)
    if cache.exists():
        try:
            cached = np.load(cache, mmap_mode="r")
            if cached.shape[0] >= _HEADER and np.array_equal(cached[:_HEADER], header):
                return cached[_HEADER:]
        except (ValueError, OSError):
            pass  # unreadable cache: rebuild it
    offsets = _scan_line_starts(path)
    save_cache(cache, lambda file: np.save(file, np.concatenate([header, offsets])), path)
    return offsets


class JsonlSource(Source):
    kind = "jsonl"
    options = frozenset({"field"})

    def __init__(
        self,
        path: str | Path,
        seq_len: int,
        field: str = "text",
        transform: Transform | None = None,
    ):
        super().__init__(path, transform or ByteTokenizer(seq_len, field=field))
        self.field = field
        self._length = len(self.offsets)
        self._files = FileHandles()

    def __len__(self) -> int:
        return self._length

    @property
    def offsets(self) -> np.ndarray:
        offsets = getattr(self, "_open_offsets", None)
        if offsets is None:
            offsets = self._open_offsets = load_index(self.path)
        return offsets

    def describe(self, index: int) -> str:
        offset = int(self.offsets[index])
        with open(self.path, "rb") as file:  # slow, but only ever on the way to an error
            line = file.read(offset).count(b"\n") + 1
        return f"line {line} (document {index})"

    def record(self, index: int) -> Any:
        if not 0 <= index < self._length:
            raise SourceError(f"{self.path}: document {index} out of range [0, {self._length})")
        file = self._files.get(self.path)
        file.seek(int(self.offsets[index]))
        line = file.readline()
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SourceError(f"{self.path}: {self.describe(index)} is not valid JSON: {error}") from None
