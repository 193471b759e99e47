"""Plain text files: each file is one document (UTF-8; ``.gz`` and ``.zst`` read decompressed).

``path`` is a file, a folder (its ``.txt``, ``.md``, ``.rst`` and ``.text`` files, plain or compressed,
recursively, by name), a glob pattern (any files) or a list of those. A file that is not UTF-8 is an
error naming it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from onlinemix.loaders.checksums import file_stamp
from onlinemix.loaders.paths import InputError, expand_paths, open_binary
from onlinemix.loaders.sources.base import DocumentSource, SourceError
from onlinemix.loaders.sources.jsonl import describe_paths
from onlinemix.loaders.storage import StorageError
from onlinemix.loaders.transforms import Transform

_TEXT = (".txt", ".md", ".rst", ".text")


class TextSource(DocumentSource):
    """One document per text file (see the module docstring)."""

    per_file = True  # its documents are its files' documents, file after file (see cache.tokens.part_cuts)
    kind = "text"
    suffixes = tuple(f"{suffix}{compressed}" for suffix in _TEXT for compressed in ("", ".gz", ".zst"))

    def __init__(self, path: str | Path | list, transform: Transform | None = None, cache_dir: str | None = None):
        self.files = expand_paths(path, Path("."), self.suffixes)
        super().__init__(describe_paths(self.files), transform)

    def documents(self, progress=None) -> Iterator[str]:
        for number in range(len(self.files)):
            yield self._read(number, progress)

    def _read(self, number: int, progress=None) -> str:
        path = self.files[number]
        try:
            with open_binary(path, progress) as file:
                data = file.read()
        except StorageError:
            raise
        except Exception as error:  # gzip / zstandard errors
            raise InputError(f"{path}: cannot read it: {error}") from None
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as error:
            raise SourceError(f"{path}: not UTF-8 text ({error})") from None

    def input_bytes(self) -> int:
        return sum(path.stat().st_size for path in self.files)

    def fingerprint(self) -> dict:
        return {"kind": self.kind, "files": [file_stamp(path) for path in self.files]}

    def __len__(self) -> int:
        return len(self.files)

    def describe(self, index: int) -> str:
        return f"file {self.files[index]}"

    def record(self, index: int) -> str:
        if not 0 <= index < len(self.files):
            raise SourceError(f"{self.path}: document {index} out of range [0, {len(self.files)})")
        return self._read(index)

    def text(self, index: int, field: str = "text") -> str:
        return self.record(index)
