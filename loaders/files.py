"""Small file-system helpers: atomic outputs and per-process file handles."""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import numpy as np


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write a file or a folder into; rename it on success.

    Readers see either nothing (or the old version) or the complete new one,
    never a half-written output: an interrupted write leaves only the
    temporary, which the next attempt removes. An existing ``path`` is
    replaced (callers that must not overwrite check before they start).
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    _remove(temporary)
    try:
        yield temporary
    except BaseException:
        _remove(temporary)
        raise
    if path.is_dir() and not path.is_symlink():  # a folder cannot be replaced in one rename
        previous = path.with_name(f".{path.name}.previous-{os.getpid()}")
        os.replace(path, previous)
        os.replace(temporary, path)
        _remove(previous)
    else:
        os.replace(temporary, path)


def file_header(path: Path, version: int) -> np.ndarray:
    """What an index cached beside ``path`` records of it: ``[version, size, mtime_ns]``.

    A cache whose header differs belongs to another version of the file (or of
    the index format) and is rebuilt.
    """
    stat = path.stat()
    return np.array([version, stat.st_size, stat.st_mtime_ns], dtype=np.uint64)


def save_cache(cache: Path, save: Callable[[BinaryIO], None], about: Path) -> None:
    """Write an index cache atomically with ``save(file)``; warn (and go on without it) where that fails."""
    try:
        temporary = cache.with_name(f"{cache.name}.{os.getpid()}.tmp")
        with open(temporary, "wb") as file:
            save(file)
        os.replace(temporary, cache)  # readers never see a half-written index
    except OSError as error:
        warnings.warn(f"{about}: cannot cache its index ({error}); keeping it in memory", stacklevel=3)


class FileHandles:
    """Open read handles by path, one set per process.

    A handle inherited through ``fork`` shares its file offset with the parent
    and the other workers, whose seek + read would interleave; so a process
    that is not the one that opened the handles opens its own.
    """

    def __init__(self, buffering: int = -1):
        self.buffering = buffering
        self._pid = os.getpid()
        self._files: dict[Path, BinaryIO] = {}

    def get(self, path: Path) -> BinaryIO:
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        file = self._files.get(path)
        if file is None:
            file = self._files[path] = open(path, "rb", buffering=self.buffering)  # noqa: SIM115 - kept open
        return file

    def close(self) -> None:
        if self._pid == os.getpid():
            for file in self._files.values():
                file.close()
        self._files = {}

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict:
        return {"buffering": self.buffering, "_pid": -1, "_files": {}}
