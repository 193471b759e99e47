"""Input files as users name them, and opening them: paths, globs, folders, compressed files, per-process handles.

- ``expand_paths``: a domain's ``path`` may be a file, a folder, a glob pattern, a URL, or a list of them;
- ``open_binary`` / ``read_lines``: ``.gz`` and ``.zst`` files read decompressed, anything else as it is;
- ``FileHandles``: open read handles by path, one set per process (a forked worker opens its own).

Local files and objects alike (``storage``).
"""

from __future__ import annotations

import gzip
import io
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

from onlinemix.loaders.extras import require
from onlinemix.loaders.storage import (
    StorageError,
    StoragePath,
    as_path,
    glob,
    list_files,
    not_found,
    noun,
    open_input,
    resolve,
)

COMPRESSED = (".gz", ".zst")


class InputError(ValueError):
    """A path that names no usable input; the message names it and says what was expected."""


def expand_paths(spec: str | Path | Sequence[str | Path], base_dir: Path, suffixes: Sequence[str]) -> list[StoragePath]:
    """The files a domain's ``path`` names, sorted and without repeats.

    ``spec`` is a file, a folder (its files whose names end in one of ``suffixes``, recursively), a glob
    pattern (``data/*.jsonl.gz``, ``shards/**/*.parquet``), or a list of those; any of them may be a URL
    (``s3://bucket/web/*.parquet``). Relative paths are relative to ``base_dir``. Nothing found is an error
    naming what was looked for.
    """
    items = [spec] if isinstance(spec, (str, os.PathLike)) or not isinstance(spec, Sequence) else list(spec)
    if not items:
        raise InputError("path is an empty list")
    files: list[StoragePath] = []
    for item in items:
        path = resolve(item, base_dir)
        if any(char in str(item) for char in "*?["):
            found = glob(str(path))
            if not found:
                raise InputError(f"no {noun(path)} matches {path}")
        elif path.is_dir():
            found = [p for p in list_files(path) if p.name.endswith(tuple(suffixes))]
            if not found:
                raise InputError(f"{path} is a folder with no {' / '.join(suffixes)} {noun(path)}s")
        elif path.is_file():
            found = [path]
        else:
            raise InputError(not_found(path))
        files.extend(found)
    return list(dict.fromkeys(files))


class _CountingReader(io.RawIOBase):
    """A file read through, counting the bytes read from disk (so a progress bar can follow a compressed one)."""

    def __init__(self, file: BinaryIO, count: Callable[[int], None]):
        self.file, self.count = file, count

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        read = self.file.readinto(buffer)
        self.count(read or 0)
        return read

    def close(self) -> None:
        self.file.close()
        super().close()


def open_binary(path: StoragePath, progress: Callable[[int], None] | None = None) -> BinaryIO:
    """``path`` opened for reading, decompressed when it ends in ``.gz`` or ``.zst``.

    ``progress(n)`` is called with the bytes read from disk as reading goes (compressed bytes, for a
    compressed file). Errors name the file: a file that claims a compression it does not have fails on
    its first read with a message that says so.
    """
    raw: BinaryIO = open_input(path)
    if progress is not None:
        raw = io.BufferedReader(_CountingReader(raw, progress), buffer_size=1 << 20)
    if path.name.endswith(".gz"):
        return gzip.GzipFile(fileobj=raw, mode="rb")
    if path.name.endswith(".zst"):
        try:
            zstandard = require("zstandard", f"reading {path}")
        except ImportError:
            raw.close()
            raise
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True), 1 << 20)
    return raw


def read_lines(path: StoragePath, progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of a (possibly compressed) text file; a corrupt compressed file is an
    ``InputError`` naming it."""
    number = 0
    try:
        with open_binary(path, progress) as file:
            for number, line in enumerate(file, 1):
                yield number, line
    except Exception as error:  # gzip.BadGzipFile (an OSError), EOFError, zstandard.ZstdError...
        if isinstance(error, (InputError, StorageError)):
            raise  # a storage error names its object itself
        raise InputError(f"{path}: cannot read it after line {number}: {error}") from None


def stripped_name(path: StoragePath) -> str:
    """A file's name without a compression suffix: ``docs.jsonl.gz`` -> ``docs.jsonl``."""
    for suffix in COMPRESSED:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


class FileHandles:
    """Open read handles by path, one set per process.

    A handle inherited through ``fork`` shares its file offset with the parent
    and the other workers, whose seek + read would interleave; so a process
    that is not the one that opened the handles opens its own.
    """

    def __init__(self, buffering: int = -1):
        self.buffering = buffering
        self._pid = os.getpid()
        self._files: dict[StoragePath, BinaryIO] = {}

    def get(self, path: StoragePath) -> BinaryIO:
        """The open handle of ``path``, opening it on first use (an object's records are read in small requests,
        not a streaming read's large ones)."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        file = self._files.get(path)
        if file is None:
            file = self._files[path] = open_input(path, self.buffering, records=True)
        return file

    def close(self) -> None:
        """Close every handle."""
        if self._pid == os.getpid():
            for file in self._files.values():
                file.close()
        self._files = {}

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"buffering": self.buffering, "_pid": -1, "_files": {}}


__all__ = ["COMPRESSED", "FileHandles", "InputError", "as_path", "expand_paths", "open_binary", "read_lines",
           "stripped_name"]  # fmt: skip
