"""The token cache as a whole: what it holds, what is stale, and removing entries (``onlinemix cache``).

Every tokenized domain has an entry ``<cache root>/<kind>-<key>/`` (see ``cache/tokens.py``). A changed
input file or tokenizer makes a new entry and the old one is never read again, so a cache only grows unless
something removes entries:

- ``onlinemix cache list`` shows each entry's size, inputs, last use and whether it is **stale** (an input
  file changed or gone: nothing will read it again);
- ``onlinemix cache prune`` removes stale entries, entries unused for ``--older-than`` days, and the least
  recently used ones until the cache fits ``--max-size``; with them, the lock files and partial folders
  that finished or killed builds left behind;
- ``onlinemix cache clear`` removes every entry;
- ``$ONLINEMIX_CACHE_LIMIT`` (e.g. ``50GB``) prunes the least recently used entries after every build.

An entry is removed only under its lock, taken exclusively without waiting (``folder.EntryLock``): one that a
live process has open (it holds the lock shared, its DataLoader workers with it) or that is being built is
left alone, and said to be in use. Lock files stay beside their entries; those of entries that are gone are
removed with the partial folders of killed builds.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from onlinemix.loaders.cache.folder import EntryLock, remove_stale_partials
from onlinemix.loaders.checksums import file_stamp
from onlinemix.loaders.storage import as_path

log = logging.getLogger("onlinemix")
LIMIT_ENV = "ONLINEMIX_CACHE_LIMIT"
_UNITS = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30,
          "TIB": 2**40}  # fmt: skip


@dataclass
class CacheEntry:
    """One token cache entry, as ``onlinemix cache list`` shows it."""

    folder: Path
    size: int  # bytes on disk
    tokens: int
    documents: int
    tokenizer: str
    backend: str  # the tokenizer backend that encoded it ("fastokens 0.3.5"; the ids are the same whichever did)
    inputs: list[str]  # the input files it was built from
    last_used: float  # seconds since the epoch: the last open (or the build)
    stale: str | None  # why nothing will read it again (an input changed or gone), or None


def parse_size(text: str) -> int:
    """``"50GB"``, ``"1.5 TiB"``, ``"800MB"``, ``"1000B"`` as a number of bytes. A bare number is an error: is
    ``50`` fifty bytes (everything goes) or fifty gigabytes?"""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match[2].upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"a size must be a number and a unit (B, KB, MB, GB, TB, KiB ... TiB), got {text!r}")
    return int(float(match[1]) * _UNITS[unit])


def cache_limit() -> int | None:
    """``$ONLINEMIX_CACHE_LIMIT`` in bytes (``None`` where it is not set); a bad value is a ``ValueError`` naming the
    variable."""
    limit = os.environ.get(LIMIT_ENV)
    if not limit:
        return None
    try:
        return parse_size(limit)
    except ValueError as error:
        raise ValueError(f"${LIMIT_ENV}={limit}: {error}") from None


def entries(root: Path) -> list[CacheEntry]:
    """Every complete entry under ``root``, least recently used first."""
    found = []
    for meta_path in root.glob("*/meta.json") if root.is_dir() else []:
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError):
            meta = {}
        folder = meta_path.parent
        found.append(
            CacheEntry(
                folder=folder,
                size=sum(f.stat().st_size for f in folder.iterdir() if f.is_file()),
                tokens=int(meta.get("tokens", 0)),
                documents=int(meta.get("documents", 0)),
                tokenizer=str(meta.get("tokenizer", "?")),
                backend=str(meta.get("backend") or "?"),  # entries from before it was recorded: unknown
                inputs=[path for path, _ in meta.get("inputs", [])],
                last_used=meta_path.stat().st_mtime,
                stale=_stale(meta) if meta else "meta.json cannot be read",
            )
        )
    return sorted(found, key=lambda entry: entry.last_used)


def _stale(meta: dict) -> str | None:
    """Why an entry will never be read again, from what it recorded of its inputs (``stamps``: size and
    sampled digest, as the cache key has them); ``None`` when every input is as it was."""
    for path, stamp in meta.get("stamps", {}).items():
        if not as_path(path).is_file():
            return f"input gone: {path}"
        if file_stamp(as_path(path)) != stamp:
            return f"input changed: {path}"
    for path, _ in meta.get("inputs", []):  # entries from before stamps were recorded: existence only
        if not Path(path).is_file():
            return f"input gone: {path}"
    return None


def remove(entry: CacheEntry) -> bool:
    """Remove ``entry`` and its lock file, under its lock taken exclusively without waiting; ``False`` (and nothing
    removed) where a live process has it open or is building it."""
    return remove_folder(entry.folder)


def remove_folder(folder: Path) -> bool:
    """Remove the entry folder ``folder`` as ``remove`` does."""
    lock = EntryLock.of(folder)
    if not lock.acquire(wait=False):
        return False
    try:
        shutil.rmtree(folder, ignore_errors=True)
    finally:
        lock.release(remove=True)
    return True


def prune(
    root: Path, *, older_than_days: float | None = None, max_size: int | None = None, keep: Path | None = None,
    dry_run: bool = False, busy: list[CacheEntry] | None = None,
) -> list[CacheEntry]:  # fmt: skip
    """Remove stale entries, entries last used more than ``older_than_days`` ago, then the least recently used
    until the rest fit ``max_size`` bytes (never ``keep``); and the leftovers of killed builds. An entry in use
    (open in a live process, or being built) is never removed: it is added to ``busy``, and the next least
    recently used goes instead. Returns the entries removed (with ``dry_run``: that would be)."""
    now = time.time()
    found = entries(root)
    removed: list[CacheEntry] = []

    def take(entry: CacheEntry) -> bool:
        if entry.folder == keep:
            return False
        if dry_run or remove(entry):
            removed.append(entry)
            return True
        if busy is not None:
            busy.append(entry)
        return False

    rest = []
    for entry in found:
        old = older_than_days is not None and now - entry.last_used > older_than_days * 86400
        if not ((entry.stale or old) and take(entry)):
            rest.append(entry)
    if max_size is not None:
        total = sum(entry.size for entry in rest)
        for entry in rest:  # least recently used first
            if total <= max_size:
                break
            if entry not in (busy or []) and take(entry):
                total -= entry.size
    if not dry_run:
        remove_leftovers(root)
    return removed


def clear(root: Path, dry_run: bool = False, busy: list[CacheEntry] | None = None) -> list[CacheEntry]:
    """Remove every entry not in use (and the leftovers of builds); those in use go to ``busy``. Returns those
    removed (with ``dry_run``: that would be)."""
    removed = []
    for entry in entries(root):
        if dry_run or remove(entry):
            removed.append(entry)
        elif busy is not None:
            busy.append(entry)
    if not dry_run:
        remove_leftovers(root)
    return removed


def _orphan_locks(root: Path) -> list[Path]:
    """The lock files of entries that are not there (a build that failed, an entry removed by hand)."""
    return [lock for lock in root.glob(".*.lock") if not (root / lock.name[1 : -len(".lock")]).exists()]


def remove_leftovers(root: Path) -> int:
    """Remove the partial folders of killed builds and the lock files of entries that are gone (each only while
    no process holds it); returns how many."""
    if not root.is_dir():
        return 0
    count = len(remove_stale_partials(root))
    for path in _orphan_locks(root):
        lock = EntryLock(path)
        if lock.acquire(wait=False):
            lock.release(remove=True)
            count += 1
    return count


def leftovers(root: Path) -> int:
    """How many partial folders of builds and lock files of entries that are gone ``root`` holds (a finished
    entry's own lock file is part of it, not a leftover)."""
    return len(_orphan_locks(root)) + len(list(root.glob(".*.partial-*"))) if root.is_dir() else 0


def enforce_limit(root: Path, limit: int, keep: Path) -> None:
    """Remove the least recently used entries not in use (never ``keep``, the one just built) until the cache fits
    ``limit`` bytes (``$ONLINEMIX_CACHE_LIMIT``, see ``cache_limit``); each removal is logged, and so is a cache
    that stays over the limit because the rest is in use."""
    busy: list[CacheEntry] = []
    for entry in prune(root, max_size=limit, keep=keep, busy=busy):
        log.info("removed token cache %s (%.1f MB, %s)", entry.folder.name, entry.size / 1e6, LIMIT_ENV)
    total = sum(entry.size for entry in entries(root))
    if total > limit:
        log.info("the token cache %s holds %.1f MB, over %s (%.1f MB): the rest is in use (%d entries open or being "
                 "built) or was just built", root, total / 1e6, LIMIT_ENV, limit / 1e6, len(busy))  # fmt: skip
