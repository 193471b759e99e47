"""JSONL: one JSON document per line, in one or many files, plain or compressed (``.gz``, ``.zst``).

``path`` is a file, a folder (its ``.jsonl``, ``.jsonl.gz``, ``.jsonl.zst`` and ``.ndjson`` files,
recursively, by name), a glob pattern or a list of those; ``field`` names each line's text (default
``text``). Empty lines are not documents. A line that is not JSON, or lacks the field, is an error
naming the file and the line.

For records (a ``transform`` reads each line's object), the lines are addressed through a line-offset
index built once per file with a vectorised newline scan (a progress bar on files over 64 MB) and
cached in the cache folder, rebuilt when the file's size or content digest changes; such records
need uncompressed files (a compressed file has no random access).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
from tqdm import tqdm

from onlinemix.loaders.atomic import atomic_write
from onlinemix.loaders.cache.folder import cache_entry, cache_root
from onlinemix.loaders.checksums import file_stamp
from onlinemix.loaders.paths import COMPRESSED, FileHandles, InputError, expand_paths, line_pieces, read_lines
from onlinemix.loaders.sources.base import DocumentSource, SourceError
from onlinemix.loaders.storage import StoragePath, open_input
from onlinemix.loaders.transforms import Transform

try:  # orjson parses a line several times faster than json (the `fast` extra), into the same objects
    from orjson import loads as _fast_loads
except ImportError:  # pragma: no cover - orjson is installed with the tests
    _fast_loads = None


def _loads(line: bytes) -> Any:
    """A line's JSON: by orjson where it is installed, and by json where orjson refuses what json accepts (NaN,
    integers beyond 64 bits), so that no file reads differently with it."""
    if _fast_loads is not None:
        try:
            return _fast_loads(line)
        except ValueError:
            pass
    return json.loads(line)


INDEX_VERSION = 2
_CHUNK = 16 << 20
_PROGRESS_FROM = 64 << 20  # show a progress bar when indexing files at least this large


def describe_paths(files: list[Path]) -> str:
    """How messages name a source of several files."""
    return str(files[0]) if len(files) == 1 else f"{files[0].parent} ({len(files)} files)"


def scan_line_starts(path: StoragePath) -> np.ndarray:
    """Byte offsets of the non-empty lines of ``path``."""
    size = path.stat().st_size
    starts = []
    position = 0
    line_start = 0  # offset where the current (unfinished) line began
    with (
        open_input(path) as file,
        tqdm(total=size, unit="B", unit_scale=True, desc=f"indexing {path.name}", disable=size < _PROGRESS_FROM) as bar,
    ):
        while chunk := file.read(_CHUNK):
            newlines = np.flatnonzero(np.frombuffer(chunk, dtype=np.uint8) == 10) + position
            line_starts = np.concatenate(([line_start], newlines[:-1] + 1)) if len(newlines) else np.empty(0)
            nonempty = newlines > line_starts  # the line has at least one byte before its newline
            starts.append(line_starts[nonempty].astype(np.uint64))
            if len(newlines):
                line_start = int(newlines[-1]) + 1
            position += len(chunk)
            bar.update(len(chunk))
    if line_start < size:  # last line without a trailing newline
        starts.append(np.array([line_start], dtype=np.uint64))
    return np.concatenate(starts) if starts else np.empty(0, dtype=np.uint64)


def line_index(path: StoragePath, cache_dir: str | Path | None) -> np.ndarray:
    """Line offsets of ``path``, from the cache when it matches the file, else scanned (and cached)."""
    cache = cache_entry(cache_root(cache_dir), "jsonl-lines", [INDEX_VERSION, file_stamp(path)]).with_suffix(".npy")
    if cache.exists():
        try:
            return np.load(cache, mmap_mode="r")
        except (ValueError, OSError):
            pass  # unreadable: scan again
    offsets = scan_line_starts(path)
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, lambda file: np.save(file, offsets))
    except OSError:
        pass  # an unwritable cache folder: the index stays in memory for this process
    return offsets


def text_of(record: Any, field: str, where: str) -> str:
    """The text under ``field`` of a decoded record; an error naming ``where`` otherwise."""
    if not isinstance(record, dict):
        raise SourceError(f"{where} is a JSON {type(record).__name__}, not an object with a {field!r} field")
    if field not in record:
        raise SourceError(f"{where} has no field {field!r} (its fields: {sorted(record)[:8]})")
    text = record[field]
    if not isinstance(text, str):
        raise SourceError(f"{where}: field {field!r} is a {type(text).__name__}, not text")
    return text


class JsonlSource(DocumentSource):
    """Documents of JSONL files (see the module docstring)."""

    per_file = True  # its documents are its files' documents, file after file (see cache.tokens.part_cuts)
    kind = "jsonl"
    options: ClassVar[dict[str, type]] = {"field": str}
    suffixes = (".jsonl", ".jsonl.gz", ".jsonl.zst", ".ndjson")

    def __init__(
        self,
        path: str | Path | list,
        field: str = "text",
        transform: Transform | None = None,
        cache_dir: str | Path | None = None,
    ):
        self.files = expand_paths(path, Path("."), self.suffixes)
        super().__init__(describe_paths(self.files), transform)
        self.field, self.cache_dir = field, cache_dir
        self._files = FileHandles()

    # -- documents ----------------------------------------------------------------

    def documents(self, progress=None) -> Iterator[str]:
        field = self.field
        for path in self.files:
            for number, line in read_lines(path, progress, self.span):
                if line.strip():
                    record = self._decode(line, path, number)
                    # the common case at full speed; anything else says what is wrong with the line
                    text = record.get(field) if type(record) is dict else None
                    yield text if type(text) is str else text_of(record, field, self._where(path, number))

    def _where(self, path: StoragePath, number: int) -> str:
        if self.span is None or self.span[0] == 0:
            return f"{path}: line {number}"
        return f"{path}: line {number} after byte {self.span[0]:,}"

    def pieces(self, file: StoragePath, size: int) -> list[tuple[int, int]]:
        """An uncompressed file cut at line starts (a compressed one cannot be entered midway: one piece)."""
        return [] if file.name.endswith(COMPRESSED) else line_pieces(file, size)

    def input_bytes(self) -> int:
        if self.span is not None:
            return self.span[1] - self.span[0]
        return sum(path.stat().st_size for path in self.files)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "files": [file_stamp(path) for path in self.files], "field": self.field}

    def _decode(self, line: bytes, path: Path, number: int) -> Any:
        try:
            return _loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SourceError(f"{self._where(path, number)} is not valid JSON: {error}") from None

    # -- records (with a transform) ------------------------------------------------

    @property
    def _index(self) -> tuple[list[np.ndarray], np.ndarray]:
        """Each file's line offsets, and where each file's records start in the whole."""
        index = getattr(self, "_open_index", None)
        if index is None:
            compressed = [path for path in self.files if path.name.endswith((".gz", ".zst"))]
            if compressed:
                raise InputError(
                    f"{compressed[0]}: a transform reads records by index, which a compressed file cannot give; "
                    "decompress it, or leave out the transform (the default tokenizes every document once)"
                )
            offsets = [line_index(path, self.cache_dir) for path in self.files]
            starts = np.cumsum([0] + [len(o) for o in offsets])
            index = self._open_index = (offsets, starts)
        return index

    def __len__(self) -> int:
        return int(self._index[1][-1])

    def _locate(self, index: int) -> tuple[int, int]:
        offsets, starts = self._index
        if not 0 <= index < starts[-1]:
            raise SourceError(f"{self.path}: document {index} out of range [0, {starts[-1]})")
        number = int(np.searchsorted(starts, index, side="right")) - 1
        return number, int(offsets[number][index - starts[number]])

    def describe(self, index: int) -> str:
        number, offset = self._locate(index)
        with open_input(self.files[number]) as file:  # slow, but only ever on the way to an error
            line = file.read(offset).count(b"\n") + 1
        of = f" of {self.files[number].name}" if len(self.files) > 1 else ""
        return f"line {line}{of} (document {index})"

    def record(self, index: int) -> Any:
        number, offset = self._locate(index)
        file = self._files.get(self.files[number])
        file.seek(offset)
        line = file.readline()
        try:
            return json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise SourceError(f"{self.path}: {self.describe(index)} is not valid JSON: {error}") from None

    def text(self, index: int, field: str = "text") -> str:
        return text_of(self.record(index), self.field, f"{self.path}: {self.describe(index)}")
