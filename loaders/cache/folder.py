"""Where onlinemix keeps what it derives from data, and how processes share it.

- ``cache_root``: the local folder for caches: the mixture file's ``cache_dir``, else ``$ONLINEMIX_CACHE_DIR``,
  else ``$XDG_CACHE_HOME/onlinemix`` (``~/.cache/onlinemix``). Never beside the data, so read-only data needs
  nothing. ``token_cache_root``: the same, except that a URL ``cache_dir`` holds token caches (every node reads
  the caches one of them prepared).
- ``cache_entry``: the folder of one entry, named by a hash of what it is derived from.
- ``locked`` / ``remove_stale_partials``: one process builds an entry while the others wait, and a build
  killed half-way is cleaned up by the next one (never while its builder still holds the lock).
"""

from __future__ import annotations

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


@contextmanager
def locked(path: Path) -> Iterator[None]:
    """An exclusive lock held on ``path`` (created if needed), so that one process builds a cache the others
    then read: several ranks or workers opening the same data at once build it once. The operating system
    drops the lock of a process that dies, so a killed builder never blocks the next one."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path):
        yield


def remove_stale_partials(root: Path) -> list[Path]:
    """Remove what killed cache builds left in ``root``: each ``.<entry>.partial-*`` folder whose entry's lock
    (``.<entry>.lock``) is free, since a build holds that lock until it renames its partial folder into place.
    Returns the folders removed."""
    from filelock import FileLock, Timeout

    removed = []
    for partial in sorted(root.glob(".*.partial-*")):
        entry = partial.name[1:].partition(".partial-")[0]
        try:
            with FileLock(root / f".{entry}.lock", timeout=0):
                if partial.exists():
                    remove_path(partial)
                    removed.append(partial)
        except Timeout:
            continue  # being built right now
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
