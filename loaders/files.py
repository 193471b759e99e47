"""File-system helpers: the cache folder, input paths as users give them, atomic writes, per-process handles.

- ``cache_root``: where onlinemix keeps what it derives from data (token caches, index files): the
  mixture file's ``cache_dir``, else ``$ONLINEMIX_CACHE_DIR``, else ``$XDG_CACHE_HOME/onlinemix``
  (``~/.cache/onlinemix``). Never beside the data, so read-only data needs nothing.
- ``file_stamp`` / ``content_digest``: what a cache is keyed by: a file's content, not its mtime
  (``touch``, ``cp -p`` and ``rsync -t`` neither invalidate nor fool it), read in sampled blocks so that
  the key of a TB corpus costs a few hundred KiB of reads per file (see ``content_digest``).
- ``chunk_checksums``: CRC-32 per 16 MiB chunk of a file a cache wrote or scanned, so that a flipped byte
  is found by ``onlinemix verify`` (or at every open, with ``verify: sampled`` / ``full``).
- ``locked`` / ``remove_stale_partials``: one process builds a cache entry while the others wait, and a
  build killed half-way is cleaned up by the next one (never while its builder still holds the lock).
- ``expand_paths``: a domain's ``path`` may be a file, a folder, a glob pattern, or a list of them.
- ``open_binary``: reads ``.gz`` and ``.zst`` files decompressed, anything else as it is.
- ``atomic_output`` / ``atomic_write`` / ``save_checkpoint``: a reader sees the old file or the new
  one, never half of one, whatever kills the writer.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import hashlib
import io
import json
import os
import shutil
import tempfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, BinaryIO

from onlinemix.loaders.extras import require
from onlinemix.loaders.storage import RemotePath, StorageError, as_path, is_url

CACHE_ENV = "ONLINEMIX_CACHE_DIR"
COMPRESSED = (".gz", ".zst")


class InputError(ValueError):
    """A path that names no usable input; the message names it and says what was expected."""


# ----------------------------------------------------------------------------- caches


def cache_root(configured: str | Path | None = None) -> Path:
    """The local folder caches go in: ``configured`` (the mixture's ``cache_dir``), ``$ONLINEMIX_CACHE_DIR``,
    or the user's cache folder (``$XDG_CACHE_HOME`` or ``~/.cache``) / ``onlinemix``. A URL ``cache_dir``
    holds token caches only (``token_cache_root``): the small per-file records (line indexes, scans) of a
    machine stay in its local folder."""
    if configured and not is_url(configured):
        return as_path(str(configured))
    if os.environ.get(CACHE_ENV) and not is_url(os.environ[CACHE_ENV]):
        return Path(os.environ[CACHE_ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "onlinemix"


def token_cache_root(configured: str | Path | None = None) -> Path | RemotePath:
    """Where token caches go: like ``cache_root``, but ``cache_dir`` (or ``$ONLINEMIX_CACHE_DIR``) may be a URL
    (``s3://bucket/caches``): every node then reads the caches one of them prepared."""
    for value in (configured, os.environ.get(CACHE_ENV)):
        if value:
            return as_path(str(value))
    return cache_root()


def cache_entry(root: Path, kind: str, key: Any) -> Path:
    """The folder of one cache entry: ``<root>/<kind>-<hash of key>`` (``key``: anything JSON can write)."""
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return root / f"{kind}-{digest}"


WHOLE_FILE_BYTES = 256 << 10  # files up to this size are hashed whole
SAMPLED_EDGE_BYTES = 64 << 10  # larger ones: their first and last 64 KiB...
SAMPLED_BLOCKS, SAMPLED_BLOCK_BYTES = 32, 4 << 10  # ...and 32 blocks of 4 KiB spread evenly between
CHECKSUM_CHUNK = 16 << 20  # bytes per CRC-32 of chunk_checksums


def open_input(path: Path | RemotePath, buffering: int = -1) -> BinaryIO:
    """A local file or an object at a URL, opened for binary reading (seekable either way). ``buffering``: as
    ``open``'s; for an object, the bytes of each range request (default 8 MiB: a streaming read)."""
    if isinstance(path, RemotePath):
        return path.open("rb", buffering) if buffering > 0 else path.open("rb")
    return open(path, "rb", buffering=buffering)


def read_ranges(path: Path | RemotePath, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
    """The byte ranges ``[start, stop)`` of a file: seeks on a local one, one batched request on a remote one."""
    if isinstance(path, RemotePath):
        return path.read_ranges([start for start, _ in ranges], [stop for _, stop in ranges])
    with open(path, "rb") as file:
        parts = []
        for start, stop in ranges:
            file.seek(start)
            parts.append(file.read(stop - start))
        return parts


def content_digest(path: Path | RemotePath) -> str:
    """A digest of ``path``'s size and content (BLAKE2b, 128 bits), at a bounded cost per file.

    Files up to 256 KiB are hashed whole. Larger ones are hashed in samples: their first and last 64 KiB and
    32 blocks of 4 KiB spread evenly between (at most 256 KiB read, whatever the file's size). The trade-off:
    every change of size, and every same-size edit of a small file, changes the digest; a same-size edit of
    a large file that touches no sampled block does not. ``onlinemix verify`` hashes inputs whole to find
    those. Modification times play no part: a touched file keeps its digest, a restored mtime hides nothing.
    """
    size = path.stat().st_size
    digest = hashlib.blake2b(str(size).encode(), digest_size=16)
    if size <= WHOLE_FILE_BYTES:
        ranges = [(0, size)]
    else:
        last = size - SAMPLED_EDGE_BYTES
        inner = [int(x) for x in _spread(SAMPLED_EDGE_BYTES, last - SAMPLED_BLOCK_BYTES)]
        ranges = [(0, SAMPLED_EDGE_BYTES), *((x, x + SAMPLED_BLOCK_BYTES) for x in inner), (last, size)]
    for part in read_ranges(path, ranges) if size else []:
        digest.update(part)
    return digest.hexdigest()


def _spread(low: int, high: int) -> list[int]:
    """``SAMPLED_BLOCKS`` offsets evenly spread over ``[low, high]`` (fewer where the range is small)."""
    if high <= low:
        return []
    step = (high - low) / max(1, SAMPLED_BLOCKS - 1)
    return sorted({low + round(i * step) for i in range(SAMPLED_BLOCKS)})


def full_digest(path: Path | RemotePath) -> str:
    """BLAKE2b (128 bits) of the whole file: what ``onlinemix verify`` compares with a cache's record."""
    digest = hashlib.blake2b(digest_size=16)
    with open_input(path) as file:
        while block := file.read(CHECKSUM_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def file_stamp(path: Path | RemotePath) -> list:
    """What a cache records of an input file to know it again: ``[size, content digest]``. Not its path: the
    same bytes under another path (a copy on another node, a moved folder, an object in a bucket) are the
    same data."""
    return [path.stat().st_size, content_digest(path)]


def chunk_checksums(path: Path | RemotePath, chunks: Sequence[int] | None = None) -> list[int]:
    """CRC-32 of each ``CHECKSUM_CHUNK``-byte chunk of ``path`` (or of the chunks numbered ``chunks`` only)."""
    size = path.stat().st_size
    numbers = range(-(-size // CHECKSUM_CHUNK)) if chunks is None else chunks
    sums = []
    with open_input(path) as file:
        for number in numbers:
            file.seek(number * CHECKSUM_CHUNK)
            sums.append(zlib.crc32(file.read(CHECKSUM_CHUNK)))
    return sums


def bad_chunk(path: Path | RemotePath, expected: Sequence[int], how: str) -> int | None:
    """The first chunk of ``path`` whose CRC-32 is not ``expected``'s (``how``: ``"full"`` checks every chunk,
    ``"sampled"`` the first, the last and one in the middle), or ``None`` when they all match."""
    if how == "full":
        chunks = list(range(len(expected)))
    else:
        chunks = sorted({0, len(expected) // 2, len(expected) - 1}) if expected else []
    for number, crc in zip(chunks, chunk_checksums(path, chunks)):
        if crc != expected[number]:
            return number
    return None


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
                    _remove(partial)
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


# ----------------------------------------------------------------------------- inputs


def expand_paths(
    spec: str | Path | Sequence[str | Path], base_dir: Path, suffixes: Sequence[str]
) -> list[Path | RemotePath]:
    """The files a domain's ``path`` names, sorted and without repeats.

    ``spec`` is a file, a folder (its files whose names end in one of ``suffixes``, recursively), a glob
    pattern (``data/*.jsonl.gz``, ``shards/**/*.parquet``), or a list of those; any of them may be a URL
    (``s3://bucket/web/*.parquet``: ``RemotePath``s). Relative paths are relative to ``base_dir``. Nothing
    found is an error naming what was looked for.
    """
    items = [spec] if isinstance(spec, (str, Path, RemotePath)) else list(spec)
    if not items:
        raise InputError("path is an empty list")
    files: list[Path | RemotePath] = []
    for item in items:
        if is_url(item):
            files.extend(_expand_remote(RemotePath(str(item)), suffixes))
            continue
        path = base_dir / as_path(str(item))
        if any(char in str(item) for char in "*?["):
            found = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
            if not found:
                raise InputError(f"no file matches {path}")
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(tuple(suffixes)))
            if not found:
                raise InputError(f"{path} is a folder with no {' / '.join(suffixes)} files")
        elif path.is_file():
            found = [path]
        else:
            raise InputError(f"file not found: {path}")
        files.extend(found)
    return list(dict.fromkeys(files))


def _expand_remote(path: RemotePath, suffixes: Sequence[str]) -> list[RemotePath]:
    """``expand_paths`` for one URL: a glob pattern, a folder (a prefix with objects under it) or one object."""
    if any(char in path.url for char in "*?["):
        found = path.glob(path.url)
        if not found:
            raise InputError(f"no object matches {path}")
        return found
    if path.is_file():
        return [path]
    if path.is_dir():
        found = [file for file in path.files() if file.name.endswith(tuple(suffixes))]
        if not found:
            raise InputError(f"{path} is a folder with no {' / '.join(suffixes)} objects")
        return found
    raise InputError(f"no object at {path}")


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


def open_binary(path: Path | RemotePath, progress: Callable[[int], None] | None = None) -> BinaryIO:
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


def read_lines(path: Path | RemotePath, progress: Callable[[int], None] | None = None) -> Iterator[tuple[int, bytes]]:
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


def stripped_name(path: Path | RemotePath) -> str:
    """A file's name without a compression suffix: ``docs.jsonl.gz`` -> ``docs.jsonl``."""
    for suffix in COMPRESSED:
        if path.name.endswith(suffix):
            return path.name[: -len(suffix)]
    return path.name


# ----------------------------------------------------------------------------- atomic writes


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


@contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` to write a file or a folder into; rename it on success.

    Readers see either nothing (or the old version) or the complete new one, never a half-written
    output: an interrupted write leaves only the temporary ``.<name>.partial-<pid>``, which any later
    attempt removes once its process is gone (even after a SIGKILL). An existing ``path`` is replaced
    (callers that must not overwrite check before they start).
    """
    path = Path(path)
    for stale in path.parent.glob(f".{glob.escape(path.name)}.partial-*"):
        pid = stale.name.rpartition("-")[2]
        if pid.isdigit() and not _alive(int(pid)):
            _remove(stale)
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


def atomic_write(path: Path, write: Callable[[BinaryIO], None]) -> None:
    """Write ``path`` through ``write(file)`` into a fresh temporary beside it (created exclusively, so no
    planted file or link is written through), flushed to disk, then renamed over ``path``. The temporary is
    removed whatever stops the write, Ctrl-C included."""
    path = Path(path)
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(descriptor, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def save_checkpoint(state: Any, path: str | Path) -> None:
    """``torch.save(state, path)``, atomically: a process killed while saving leaves the previous checkpoint
    whole (``torch.save`` alone leaves a truncated file that cannot be loaded)."""
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda file: torch.save(state, file))


# ----------------------------------------------------------------------------- handles


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

    def get(self, path: Path | RemotePath) -> BinaryIO:
        """The open handle of ``path``, opening it on first use."""
        if self._pid != os.getpid():
            self._files, self._pid = {}, os.getpid()
        file = self._files.get(path)
        if file is None:  # an object's records are read in 64 KiB requests, not a streaming read's 8 MiB
            buffering = self.buffering if self.buffering > 0 or not isinstance(path, RemotePath) else 1 << 16
            file = self._files[path] = open_input(path, buffering)
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
