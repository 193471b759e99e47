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

An entry is removed under its build lock, taken without waiting: one being built right now is left alone.
A process that has an entry open keeps reading it (its memory maps outlive the files); the next open of
that data tokenizes it again.
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

from onlinemix.loaders.cache.folder import remove_stale_partials
from onlinemix.loaders.checksums import file_stamp
from onlinemix.loaders.storage import as_path

log = logging.getLogger("onlinemix")
LIMIT_ENV = "ONLINEMIX_CACHE_LIMIT"
_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}  # fmt: skip


@dataclass
class CacheEntry:
    """One token cache entry, as ``onlinemix cache list`` shows it."""

    folder: Path
    size: int  # bytes on disk
    tokens: int
    documents: int
    tokenizer: str
    inputs: list[str]  # the input files it was built from
    last_used: float  # seconds since the epoch: the last open (or the build)
    stale: str | None  # why nothing will read it again (an input changed or gone), or None


def parse_size(text: str) -> int:
    """``"50GB"``, ``"1.5 TiB"``, ``"800MB"``, ``"1000"`` (bytes) as a number of bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
    unit = match[2].upper() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"a size must be a number and a unit (B, KB, MB, GB, TB, KiB ... TiB), got {text!r}")
    return int(float(match[1]) * _UNITS[unit])


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
    """Remove ``entry`` under its build lock (not waiting for it); ``False`` if it is being built or opened for
    a build right now."""
    return remove_folder(entry.folder)


def remove_folder(folder: Path) -> bool:
    """Remove the entry folder ``folder`` and its lock file, as ``remove`` does."""
    from filelock import FileLock, Timeout

    lock = folder.parent / f".{folder.name}.lock"
    try:
        with FileLock(lock, timeout=0):
            shutil.rmtree(folder, ignore_errors=True)
    except Timeout:
        return False
    lock.unlink(missing_ok=True)
    return True


def prune(
    root: Path, *, older_than_days: float | None = None, max_size: int | None = None, keep: Path | None = None,
    dry_run: bool = False,
) -> list[CacheEntry]:  # fmt: skip
    """Remove stale entries, entries last used more than ``older_than_days`` ago, then the least recently used
    until the rest fit ``max_size`` bytes (never ``keep``); and the leftovers of finished or killed builds.
    Returns the entries removed (with ``dry_run``: that would be)."""
    now = time.time()
    chosen, kept = [], []
    for entry in entries(root):
        old = older_than_days is not None and now - entry.last_used > older_than_days * 86400
        (chosen if (entry.stale or old) and entry.folder != keep else kept).append(entry)
    if max_size is not None:
        total = sum(entry.size for entry in kept)
        for entry in list(kept):  # least recently used first
            if total <= max_size:
                break
            if entry.folder != keep:
                chosen.append(entry)
                kept.remove(entry)
                total -= entry.size
    if dry_run:
        return chosen
    removed = [entry for entry in chosen if remove(entry)]
    remove_leftovers(root)
    return removed


def clear(root: Path, dry_run: bool = False) -> list[CacheEntry]:
    """Remove every entry (and the leftovers of builds); returns those removed (with ``dry_run``: that would be)."""
    everything = entries(root)
    if dry_run:
        return everything
    removed = [entry for entry in everything if remove(entry)]
    remove_leftovers(root)
    return removed


def remove_leftovers(root: Path) -> int:
    """Remove the partial folders of killed builds and the lock files no build holds; returns how many."""
    from filelock import FileLock, Timeout

    count = len(remove_stale_partials(root)) if root.is_dir() else 0
    for lock in root.glob(".*.lock") if root.is_dir() else []:
        try:
            with FileLock(lock, timeout=0):
                pass
        except Timeout:
            continue  # a build holds it
        lock.unlink(missing_ok=True)
        count += 1
    return count


def leftovers(root: Path) -> int:
    """How many lock files and partial folders of builds ``root`` holds."""
    return len(list(root.glob(".*.lock"))) + len(list(root.glob(".*.partial-*"))) if root.is_dir() else 0


def enforce_limit(root: Path, keep: Path) -> None:
    """With ``$ONLINEMIX_CACHE_LIMIT`` set, remove the least recently used entries (never ``keep``, the one just
    built) until the cache fits it; each removal is logged."""
    limit = os.environ.get(LIMIT_ENV)
    if not limit:
        return
    for entry in prune(root, max_size=parse_size(limit), keep=keep):
        log.info("removed token cache %s (%.1f MB, %s=%s)", entry.folder.name, entry.size / 1e6, LIMIT_ENV, limit)
