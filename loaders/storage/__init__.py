"""Where bytes live: a local folder or an object store, behind one interface.

A domain's ``path`` and the mixture's ``cache_dir`` may be local paths or fsspec URLs (``s3://``, ``gs://``,
``az://``...). The few operations that differ between the two live here, and no other module asks which
kind a path is: it calls one of these.

- naming: ``as_path`` (a string as a ``Path`` or a ``RemotePath``), ``resolve`` (relative to a folder),
  ``is_url``;
- listing: ``glob``, ``list_files``; ``mtime_ns`` (objects have none every backend gives); ``noun`` and
  ``not_found``, for messages;
- reading: ``open_input`` (a seekable binary file), ``read_ranges`` (byte ranges in one call),
  ``load_array`` (a ``.npy`` file: memory-mapped, or fetched), ``token_ranges`` (slices of a token file),
  ``remote_windows`` (a token file's windows fetched ahead of the plan, for an object), ``for_library`` (what to
  hand a library that opens files itself);
- writing: ``staging_folder`` and ``publish`` (build an entry locally, then rename it into place or upload it
  with its metadata last), ``remove_tree``, ``touch``.

The fsspec side (retries, range requests, read-ahead) is ``remote.py``.
"""

from __future__ import annotations

import contextlib
import glob as globbing
import os
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO, Union

import numpy as np

from onlinemix.loaders.storage.remote import (
    BACKOFF_ENV,
    RETRIES_ENV,
    TIMEOUT_ENV,
    RemoteFile,
    RemotePath,
    RemoteWindows,
    StorageError,
    retrying,
)

StoragePath = Union[Path, RemotePath]  # noqa: UP007 - a runtime alias, for annotations elsewhere
RECORD_BUFFER = 1 << 16  # bytes of each range request when an object's records are read one by one


def is_url(path: Any) -> bool:
    """Whether ``path`` is a URL of a filesystem other than the local one (``file://`` is local)."""
    return isinstance(path, (str, RemotePath)) and "://" in str(path) and not str(path).startswith("file://")


def as_path(path: str | Path | RemotePath) -> StoragePath:
    """``path`` as a ``RemotePath`` when it is a URL, else as a local ``Path`` (``file://`` stripped, ``~``
    expanded)."""
    if isinstance(path, (Path, RemotePath)):
        return path
    if is_url(path):
        return RemotePath(path)
    return Path(path[len("file://") :] if path.startswith("file://") else path).expanduser()


def resolve(path: str | Path, base_dir: str | Path) -> StoragePath:
    """``path`` relative to the local folder ``base_dir`` (a URL is absolute already)."""
    found = as_path(str(path))
    return found if isinstance(found, RemotePath) else Path(base_dir) / found


# ----------------------------------------------------------------------------- listing


def glob(pattern: str) -> list[StoragePath]:
    """The files matching ``pattern`` (``*``, ``?``, ``[...]``, ``**``), sorted: a local pattern or a URL."""
    if is_url(pattern):
        return RemotePath(pattern).glob(pattern)
    return sorted(Path(p) for p in globbing.glob(pattern, recursive=True) if Path(p).is_file())


def list_files(folder: StoragePath) -> list[StoragePath]:
    """Every file under ``folder``, recursively, sorted."""
    if isinstance(folder, RemotePath):
        return folder.files()
    return sorted(p for p in folder.rglob("*") if p.is_file())


def noun(path: StoragePath | str) -> str:
    """What messages call the thing at ``path``: a ``file``, or an ``object`` in a bucket."""
    return "object" if is_url(path) else "file"


def not_found(path: StoragePath) -> str:
    """The message for nothing at ``path``."""
    return f"no object at {path}" if is_url(path) else f"file not found: {path}"


def mtime_ns(path: StoragePath) -> int | None:
    """A local file's modification time; ``None`` for an object (not every backend gives one)."""
    return None if isinstance(path, RemotePath) else path.stat().st_mtime_ns


# ----------------------------------------------------------------------------- reading


def open_input(path: StoragePath, buffering: int = -1, records: bool = False) -> BinaryIO:
    """``path`` opened for binary reading, seekable. ``buffering``: as ``open``'s; an object is read in range
    requests of that many bytes (default: 8 MiB, a streaming read; ``records``: 64 KiB, for reads of one record
    at a time)."""
    if isinstance(path, RemotePath):
        if buffering <= 0 and records:
            buffering = RECORD_BUFFER
        return path.open("rb", buffering) if buffering > 0 else path.open("rb")
    return open(path, "rb", buffering=buffering)


def read_ranges(path: StoragePath, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The byte ranges ``[start, stop)`` of a file: seeks in a local one, one batched request to an object."""
    if isinstance(path, RemotePath):
        return path.read_ranges([start for start, _ in ranges], [stop for _, stop in ranges])
    with open(path, "rb") as file:
        parts = []
        for start, stop in ranges:
            file.seek(start)
            parts.append(file.read(stop - start))
        return parts


def load_array(path: StoragePath) -> np.ndarray:
    """A ``.npy`` file: memory-mapped where it is local, fetched whole where it is an object."""
    if isinstance(path, RemotePath):
        import io

        return np.load(io.BytesIO(path.read_bytes()))
    return np.load(path, mmap_mode="r")


class TokenArray:
    """A flat file of token ids read by ranges (``ranges``): slices of a memory map where it is local, one batched
    range request where it is an object. Opened lazily, per process (the memory map is not pickled)."""

    def __init__(self, path: StoragePath, dtype: np.dtype):
        self.path, self.dtype = path, np.dtype(dtype)
        self._open_map: np.ndarray | None = None

    def ranges(self, starts: Sequence[int], stops: Sequence[int]) -> list[np.ndarray]:
        """Tokens ``[start, stop)`` for each pair (an empty array where ``stop <= start``)."""
        if isinstance(self.path, RemotePath):
            wanted = [(int(a), int(b)) for a, b in zip(starts, stops) if b > a]
            item = self.dtype.itemsize
            parts = iter(read_ranges(self.path, [(a * item, b * item) for a, b in wanted]))
            empty = np.empty(0, self.dtype)
            return [np.frombuffer(next(parts), self.dtype) if b > a else empty for a, b in zip(starts, stops)]
        if self._open_map is None:
            self._open_map = np.memmap(self.path, dtype=self.dtype, mode="r")
        return [self._open_map[int(a) : int(b)] for a, b in zip(starts, stops)]

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open_map": None}


def remote_windows(path: StoragePath, dtype: np.dtype, width: int, stride: int) -> RemoteWindows | None:
    """For an object: a reader of its windows of ``width`` tokens every ``stride`` that fetches ahead of the plan
    (``RemoteWindows``). ``None`` for a local file, which is memory-mapped by its reader."""
    return RemoteWindows(path, dtype, width, stride) if isinstance(path, RemotePath) else None


def for_library(path: StoragePath) -> str | BinaryIO:
    """What to hand a library that opens files itself (pyarrow, say): a local path as a string (its own reader is
    fastest), an object as a seekable file read in range requests."""
    return open_input(path) if isinstance(path, RemotePath) else str(path)


# ----------------------------------------------------------------------------- writing


def staging_folder(destination: StoragePath, local_root: Path) -> Path:
    """The local folder to build an entry destined for ``destination`` in: ``destination`` itself where it is
    local (``publish`` then has nothing to do: the builder renames its work into place), else a folder under
    ``local_root`` named after it (``publish`` uploads it)."""
    if isinstance(destination, RemotePath):
        return local_root / f"upload-{destination.name}"
    return destination


def publish(staged: Path, destination: StoragePath, names: Sequence[str]) -> None:
    """Make the complete entry ``staged`` (built in ``staging_folder(destination)``) appear at ``destination``:
    nothing to do for a local folder (it was built there); for an object prefix, upload the files ``names`` in
    that order (the last, its metadata, is what says an entry is complete to a reader) and remove ``staged``."""
    if staged == destination:
        return
    for name in names:
        (destination / name).upload(staged / name)
    shutil.rmtree(staged, ignore_errors=True)


def remove_tree(folder: StoragePath) -> None:
    """Delete ``folder`` and everything under it (an object prefix: every object under it)."""
    if isinstance(folder, RemotePath):
        folder.remove_tree()
    else:
        shutil.rmtree(folder, ignore_errors=True)


def touch(path: StoragePath) -> None:
    """Set a local file's modification time to now (a cache entry's last use); an object keeps its own."""
    if not isinstance(path, RemotePath):
        with contextlib.suppress(OSError):  # a read-only cache keeps its old time
            os.utime(path)


__all__ = [
    "BACKOFF_ENV",
    "RETRIES_ENV",
    "TIMEOUT_ENV",
    "RemoteFile",
    "RemotePath",
    "RemoteWindows",
    "StorageError",
    "StoragePath",
    "TokenArray",
    "as_path",
    "for_library",
    "glob",
    "is_url",
    "list_files",
    "load_array",
    "mtime_ns",
    "not_found",
    "noun",
    "open_input",
    "publish",
    "read_ranges",
    "remote_windows",
    "remove_tree",
    "resolve",
    "retrying",
    "staging_folder",
    "touch",
]
