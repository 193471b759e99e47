"""Input files as users name them, and opening them: paths, globs, folders, compressed files, per-process handles.

- ``expand_paths``: a domain's ``path`` may be a file, a folder, a glob pattern, a URL, or a list of them;
- ``open_binary`` / ``read_lines``: ``.gz`` and ``.zst`` files read decompressed (in a thread of their own, so
  that decompressing overlaps with what reads the lines), anything else as it is; ``read_lines`` reads a byte
  range of a file (``line_pieces`` cuts one at line starts), the way ``onlinemix prepare`` splits a large file;
- ``FileHandles``: open read handles by path, one set per process (a forked worker opens its own).

Local files and objects alike (``storage``).
"""

from __future__ import annotations

import gzip
import io
import os
import queue
import threading
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
_BLOCK = 4 << 20  # bytes a decompressing thread hands over at a time
_AHEAD = 4  # blocks it may decompress ahead of the reader
_SCAN = 1 << 16  # bytes read at a time looking for a line start


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
    """``path`` opened for reading, decompressed when it ends in ``.gz`` or ``.zst`` (by a thread of its own:
    ``zlib`` and ``zstandard`` release the GIL, so decompressing overlaps with parsing the lines).

    ``progress(n)`` is called with the bytes read from disk as reading goes (compressed bytes, for a
    compressed file). Errors name the file: a file that claims a compression it does not have fails on
    its first read with a message that says so.
    """
    raw: BinaryIO = open_input(path)
    if progress is not None:
        raw = io.BufferedReader(_CountingReader(raw, progress), buffer_size=1 << 20)
    if path.name.endswith(".gz"):
        return io.BufferedReader(_ThreadedReader(gzip.GzipFile(fileobj=raw, mode="rb")), 1 << 20)
    if path.name.endswith(".zst"):
        try:
            zstandard = require("zstandard", f"reading {path}")
        except ImportError:
            raw.close()
            raise
        stream = zstandard.ZstdDecompressor().stream_reader(raw, closefd=True)
        return io.BufferedReader(_ThreadedReader(stream), 1 << 20)
    return raw


class _ThreadedReader(io.RawIOBase):
    """A stream read ahead by a thread of its own, in blocks (an error there is raised by the read that meets
    it); closing it stops the thread."""

    def __init__(self, stream: BinaryIO):
        self.stream = stream
        self.blocks: queue.Queue = queue.Queue(maxsize=_AHEAD)
        self.stopped = threading.Event()
        self.left = memoryview(b"")
        self.thread = threading.Thread(target=self._read_ahead, name="onlinemix-decompress", daemon=True)
        self.thread.start()

    def _read_ahead(self) -> None:
        try:
            while not self.stopped.is_set():
                block = self.stream.read(_BLOCK)
                self._put(block)
                if not block:
                    return
        except BaseException as error:  # raised in the reader's thread
            self._put(error)

    def _put(self, item: bytes | BaseException) -> None:
        while not self.stopped.is_set():
            try:
                self.blocks.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if not self.left:
            block = self.blocks.get()
            if isinstance(block, BaseException):
                raise block
            if not block:
                self.blocks.put(b"")  # the end, for the next read too
                return 0
            self.left = memoryview(block)
        size = min(len(buffer), len(self.left))
        buffer[:size] = self.left[:size]
        self.left = self.left[size:]
        return size

    def close(self) -> None:
        if not self.closed:
            self.stopped.set()
            self.thread.join()
            self.stream.close()
        super().close()


class _RangeReader(io.RawIOBase):
    """Bytes ``[start, stop)`` of an open file, and no more."""

    def __init__(self, file: BinaryIO, start: int, stop: int):
        self.file, self.left = file, stop - start
        file.seek(start)

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.left <= 0:
            return 0
        view = memoryview(buffer)[: min(len(buffer), self.left)]
        read = self.file.readinto(view) or 0
        self.left -= read
        return read

    def close(self) -> None:
        self.file.close()
        super().close()


def read_lines(
    path: StoragePath, progress: Callable[[int], None] | None = None, span: tuple[int, int] | None = None
) -> Iterator[tuple[int, bytes]]:
    """``(line number, line)`` of a (possibly compressed) text file, or of the lines of its bytes ``span``
    (``[start, stop)`` of an uncompressed file, cut at line starts: numbered from 1 at ``start``); a corrupt
    compressed file is an ``InputError`` naming it."""
    number = 0
    try:
        if span is None:
            opened = open_binary(path, progress)
        else:
            raw: BinaryIO = _RangeReader(open_input(path), *span)
            if progress is not None:
                raw = _CountingReader(raw, progress)
            opened = io.BufferedReader(raw, 1 << 20)
        with opened as file:
            for number, line in enumerate(file, 1):
                yield number, line
    except Exception as error:  # gzip.BadGzipFile (an OSError), EOFError, zstandard.ZstdError...
        if isinstance(error, (InputError, StorageError)):
            raise  # a storage error names its object itself
        raise InputError(f"{path}: cannot read it after line {number}: {error}") from None


def line_pieces(path: StoragePath, size: int) -> list[tuple[int, int]]:
    """``path`` (uncompressed) cut into byte ranges of about ``size`` bytes, each starting at a line's start:
    ``[(start, stop), ...]`` in order, covering the file (one range for a file of ``size`` or less)."""
    total = path.stat().st_size
    cuts = [0]
    with open_input(path) as file:
        for nominal in range(size, total, size):
            if nominal <= cuts[-1]:
                continue
            file.seek(nominal - 1)  # a line starts at `nominal` if the byte before it ends one
            position = nominal - 1
            while True:
                chunk = file.read(_SCAN)
                if not chunk:
                    position = total
                    break
                newline = chunk.find(b"\n")
                if newline >= 0:
                    position += newline + 1
                    break
                position += len(chunk)
            if position >= total:
                break
            cuts.append(position)
    return list(zip(cuts, [*cuts[1:], total]))


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
