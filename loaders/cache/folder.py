"""Where onlinemix keeps what it derives from data, and how processes share it.

- ``cache_root``: the local folder for caches: the mixture file's ``cache_dir``, else ``$ONLINEMIX_CACHE_DIR``,
  else ``$XDG_CACHE_HOME/onlinemix`` (``~/.cache/onlinemix``). Never beside the data, so read-only data needs
  nothing. ``token_cache_root``: the same, except that a URL ``cache_dir`` holds token caches (every node reads
  the caches one of them prepared).
- ``cache_entry``: the folder of one entry, named by a hash of what it is derived from.
- ``EntryLock``: every entry has a lock file beside it, ``.<entry>.lock``. A process that builds the entry holds
  it exclusively (the others wait, then read what it built); a process that has the entry open holds it shared
  for as long as it does (its DataLoader workers too); ``prune``, ``clear`` and ``$ONLINEMIX_CACHE_LIMIT``
  remove an entry only when they can take it exclusively without waiting: an entry in use or being built is
  never removed. The operating system drops the locks of a process that dies.
- ``remove_stale_partials``: the partial folder of a build that was killed is removed by the next one (never
  while its builder still holds the lock).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from onlinemix.loaders.atomic import remove_path
from onlinemix.loaders.paths import InputError
from onlinemix.loaders.storage import StoragePath, as_path, is_url

CACHE_ENV = "ONLINEMIX_CACHE_DIR"


def cache_root(configured: str | Path | None = None) -> Path:
    """The local folder caches go in: ``configured`` (the mixture's ``cache_dir``), ``$ONLINEMIX_CACHE_DIR``,
    or the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``) / ``onlinemix``. A URL ``cache_dir``
    holds token caches only (``token_cache_root``): the small per-file records (line indexes, scans) of a
    machine stay in its local folder, so a URL is passed over here."""
    for value in (configured, os.environ.get(CACHE_ENV)):
        if value and not is_url(value):
            return as_path(str(value))
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onlinemix"


def token_cache_root(configured: str | Path | None = None) -> StoragePath:
    """Where token caches go: like ``cache_root``, but ``cache_dir`` (or ``$ONLINEMIX_CACHE_DIR``) may be a URL
    (``s3://bucket/caches``): every node then reads the caches one of them prepared."""
    for value in (configured, os.environ.get(CACHE_ENV)):
        if value:
            return as_path(str(value))
    return cache_root()


def cache_entry(root: StoragePath, kind: str, key: Any) -> StoragePath:
    """The folder of one cache entry: ``<root>/<kind>-<hash of key>`` (``key``: anything JSON can write)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return root / f"{kind}-{digest}"


class EntryLock:
    """A lock on one cache entry (its file ``.<entry>.lock``): shared by the processes that have the entry open,
    exclusive for the one that builds or removes it (``fcntl.flock``: released by the operating system when the
    process dies, and shared with its forked DataLoader workers).

    The lock file may be removed (with its entry, by a process holding it exclusively), so a process that opens
    it and then locks it checks that the path still names the file it locked, and tries again if not: two
    processes never hold "the" lock through two different files."""

    def __init__(self, path: Path):
        self.path = path
        self._fd: int | None = None

    @classmethod
    def of(cls, folder: Path) -> EntryLock:
        """The lock of the entry (or partial build, or staging folder) named ``folder``."""
        return cls(folder.parent / f".{folder.name}.lock")

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self, shared: bool = False, wait: bool = True) -> bool:
        """Take the lock (``shared`` or exclusive), waiting for it or not; ``False`` where it is taken and
        ``wait`` is off. An ``OSError`` where the lock file cannot be made (a read-only cache)."""
        if self._fd is not None:
            raise RuntimeError(f"{self.path} is locked by this object already")
        mode = (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, mode)
            except BlockingIOError:
                os.close(fd)
                return False
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self._fd = fd
                return True
            os.close(fd)  # removed (and perhaps made again) between the open and the lock: lock the current one

    def release(self, remove: bool = False) -> None:
        """Let the lock go; with ``remove`` (exclusive only), delete the lock file first (its entry is gone)."""
        if self._fd is None:
            return
        if remove:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> EntryLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __getstate__(self) -> dict:
        return {"path": self.path, "_fd": None}  # a lock is its process's own

    def __del__(self) -> None:
        self.release()


@contextmanager
def locked(folder: Path) -> Iterator[None]:
    """The entry ``folder``'s lock, exclusively, for building it: several ranks or workers opening the same data at
    once build it once, the others waiting for it. A killed builder's lock is dropped by the operating system."""
    with EntryLock.of(folder):
        yield


def remove_stale_partials(root: Path) -> list[Path]:
    """Remove what killed cache builds left in ``root``: each ``.<entry>.partial-*`` folder whose entry's lock is
    free, since a build holds that lock exclusively until it renames its partial folder into place (and a process
    reading the entry holds it shared: nothing partial is left then either). Returns the folders removed."""
    removed = []
    for partial in sorted(root.glob(".*.partial-*")):
        lock = EntryLock(root / f".{partial.name[1:].partition('.partial-')[0]}.lock")
        if not lock.acquire(wait=False):
            continue  # being built (or read) right now
        try:
            if partial.exists():
                remove_path(partial)
                removed.append(partial)
        finally:
            lock.release()
    return removed


def writable_cache(root: Path) -> Path:
    """``root``, created; an error that says how to choose another folder when it cannot be written."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".probe-")  # noqa: SIM115 - removed on close
        probe.close()
    except OSError as error:
        raise InputError(
            f"cannot write to the cache folder {root} ({error.strerror}): set cache_dir in the mixture file or "
            f"the {CACHE_ENV} environment variable to a writable folder"
        ) from None
    return root
