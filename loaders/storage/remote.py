"""Object storage: domains and token caches at fsspec URLs (``s3://``, ``gs://``, ``az://``, ...).

The rest of onlinemix reaches this through ``loaders/storage/__init__.py``. What reads URLs:

- ``RemotePath``: the few things of ``pathlib.Path`` the sources use (``name``, ``stat().st_size``,
  ``is_file``, ``/``, ``open``, ``read_bytes``), over an fsspec filesystem. ``file://`` URLs are plain paths.
- ``RemoteFile``: a seekable binary file read with range requests, each retried (see below). Streaming
  reads (tokenizing a JSONL, text or Parquet domain) go through it with a large buffer.
- ``RemoteWindows``: windows of a token file read with one batched range request per batch (fsspec's
  ``cat_ranges``, concurrent on S3/GCS/Azure), and fetched ahead in a background thread for the batches
  the plan has already made (``prefetch``): the plan's order is known before the batch is read.

**Credentials and endpoints** come from the environment as each backend reads it (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ``GOOGLE_APPLICATION_CREDENTIALS``, ...) and from fsspec's own configuration
(``~/.config/fsspec/*.json`` or ``FSSPEC_S3='{"anon": true}'``), never from the mixture file.

**Errors.** onlinemix does the retrying (the client's own retries are off: a dead endpoint would otherwise
cost minutes of attempts inside attempts). A failed request is retried up to ``$ONLINEMIX_STORAGE_RETRIES``
times (default 5) after waiting ``$ONLINEMIX_STORAGE_BACKOFF`` seconds (default 0.5), doubled each time,
and never past ``$ONLINEMIX_STORAGE_TIMEOUT`` seconds (default 20) from the first attempt (plus the one
request under way: a connection times out after ``CONNECT_TIMEOUT`` seconds). When it still fails, the error
is one line naming the object and the byte range; the retries are logged at debug level only. A missing
object, a refused permission and missing or refused credentials are not retried. Nothing is ever skipped: a
read returns every byte asked for, or raises.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import posixpath
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace
from typing import TypeVar

import numpy as np

from onlinemix.loaders.extras import require

log = logging.getLogger("onlinemix")
RETRIES_ENV, BACKOFF_ENV, TIMEOUT_ENV = (
    "ONLINEMIX_STORAGE_RETRIES",
    "ONLINEMIX_STORAGE_BACKOFF",
    "ONLINEMIX_STORAGE_TIMEOUT",
)
CONNECT_TIMEOUT = 5  # seconds a connection to an object store may take before the attempt fails
READ_BLOCK = 8 << 20  # bytes per range request of a streaming read
MERGE_GAP = 256 << 10  # ranges of one batched read closer than this are fetched as one request...
MERGE_BLOCK = 16 << 20  # ...of at most this many bytes
PREFETCH_WINDOWS = 8192  # most windows a RemoteWindows holds fetched ahead of their read
BACKEND_EXTRAS = {"s3": "s3", "s3a": "s3", "gs": "gcs", "gcs": "gcs", "az": "azure", "abfs": "azure", "abfss": "azure"}
_PERMANENT = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
# the backends' errors that no retry mends: no credentials, or credentials the store refuses
_REFUSED = ("NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "InvalidAccessKeyId",
            "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken", "UnrecognizedClientException")  # fmt: skip
T = TypeVar("T")


class StorageError(OSError):
    """A request to object storage that failed after its retries: one line naming the object."""


def _setting(name: str, default: float) -> float:
    value = os.environ.get(name)
    try:
        return default if value is None else float(value)
    except ValueError:
        raise ValueError(f"${name}={value}: a number was expected") from None


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__


def retrying(what: str, call: Callable[[], T]) -> T:
    """``call()``, retried with exponential backoff (see the module docstring: at most ``$ONLINEMIX_STORAGE_RETRIES``
    times, within ``$ONLINEMIX_STORAGE_TIMEOUT`` seconds) on anything but a missing object, a refused permission
    or missing credentials; a one-line ``StorageError`` naming ``what`` when the retries are spent."""
    attempts = 1 + int(_setting(RETRIES_ENV, 5))
    delay, budget = _setting(BACKOFF_ENV, 0.5), _setting(TIMEOUT_ENV, 20.0)
    started = time.monotonic()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except ImportError:
            raise  # a missing backend: its message says what to install
        except _PERMANENT as error:
            raise type(error)(f"{what}: {error}") from None
        except Exception as error:  # botocore, aiohttp and OS errors alike: the backends raise many kinds
            if type(error).__name__ in _REFUSED or any(code in str(error) for code in _REFUSED):
                raise StorageError(
                    f"{what}: {_first_line(error)} (the store refused or was given no credentials: see the object "
                    "storage guide; not retried)"
                ) from None
            spent = time.monotonic() - started
            if attempt == attempts or spent + delay > budget:
                raise StorageError(
                    f"{what}: {_first_line(error)} (failed {attempt} times in {spent:.0f} s; the retries are "
                    f"{RETRIES_ENV}, the wait {BACKOFF_ENV}, the time allowed {TIMEOUT_ENV})"
                ) from None
            log.debug("%s: %s; retrying in %.1f s", what, error, delay)
            time.sleep(delay)
            delay *= 2
    raise AssertionError("unreachable")


def _options(protocol: str) -> dict:
    """What onlinemix asks of a backend: for S3, no retries of the client's own (onlinemix retries, within its
    time budget) and a connection timeout; what the user's fsspec configuration sets wins."""
    if protocol not in ("s3", "s3a"):
        return {}
    fsspec = require("fsspec", "object storage")
    configured = fsspec.config.conf.get(protocol, {}).get("config_kwargs", {})
    mine = {"retries": {"max_attempts": 1, "mode": "standard"}, "connect_timeout": CONNECT_TIMEOUT}
    return {"config_kwargs": {**mine, **configured}}


class RemotePath:
    """A file or folder at an fsspec URL, with the part of ``pathlib.Path``'s interface the sources use.

    The filesystem is made on first use in each process (fsspec's instances do not survive a fork), and
    not pickled: a ``RemotePath`` travels to DataLoader workers and Ray tasks as its URL."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.protocol = url.partition("://")[0]

    @property
    def fs(self):
        """The fsspec filesystem of this URL's protocol (this process's own)."""
        fsspec = require("fsspec", f"reading {self.url}")
        try:
            # fsspec keeps one instance per process and options. No listings cache: an object another node
            # uploads (a token cache being prepared) is seen at the next look, not after a restart.
            fs = fsspec.filesystem(self.protocol, use_listings_cache=False, **_options(self.protocol))
        except (ImportError, ValueError) as error:
            extra = BACKEND_EXTRAS.get(self.protocol)
            hint = f": pip install 'onlinemix[{extra}]'" if extra else ""
            raise ImportError(f"reading {self.url} needs fsspec's {self.protocol}:// backend ({error}){hint}") from None
        if hasattr(fs, "retries"):
            fs.retries = 1  # s3fs retries some errors itself, inside each of onlinemix's attempts: not any more
        return fs

    # -- names ---------------------------------------------------------------------

    def __str__(self) -> str:
        return self.url

    def __repr__(self) -> str:
        return f"RemotePath({self.url!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RemotePath) and other.url == self.url

    def __hash__(self) -> int:
        return hash(self.url)

    def __lt__(self, other: RemotePath) -> bool:
        return self.url < other.url

    def __truediv__(self, name: str) -> RemotePath:
        return RemotePath(f"{self.url}/{name}")

    @property
    def name(self) -> str:
        """The last part of the URL (the object's file name)."""
        return posixpath.basename(self.url)

    @property
    def parent(self) -> RemotePath:
        """The URL one level up (the "folder" of the object)."""
        return RemotePath(posixpath.dirname(self.url))

    def resolve(self) -> RemotePath:
        """Itself: a URL is absolute already."""
        return self

    # -- what is there -------------------------------------------------------------

    def info(self) -> dict:
        """The object's listing entry (``size``, ``type``, ...); ``FileNotFoundError`` when there is none."""
        fs = self.fs
        return retrying(self.url, lambda: fs.info(self.url))

    def stat(self) -> SimpleNamespace:
        """``st_size``, the object's size in bytes (as ``os.stat`` gives it for a local file)."""
        return SimpleNamespace(st_size=int(self.info()["size"]))

    def exists(self) -> bool:
        """Whether an object (or a prefix with objects under it) is at this URL."""
        fs = self.fs
        return retrying(self.url, lambda: fs.exists(self.url))

    def is_file(self) -> bool:
        """Whether an object is at this URL."""
        try:
            return self.info()["type"] == "file"
        except FileNotFoundError:
            return False

    def is_dir(self) -> bool:
        """Whether this URL is a prefix with objects under it."""
        try:
            return self.info()["type"] == "directory"
        except FileNotFoundError:
            return False

    def files(self) -> list[RemotePath]:
        """Every file under this folder, recursively, sorted."""
        fs = self.fs
        found = retrying(self.url, lambda: fs.find(self.url))
        return sorted(RemotePath(fs.unstrip_protocol(path)) for path in found)

    def glob(self, pattern: str) -> list[RemotePath]:
        """The files matching ``pattern`` (a URL with ``*``, ``?``, ``[...]`` or ``**``), sorted."""
        fs = self.fs
        found = retrying(pattern, lambda: fs.glob(pattern, detail=True))
        return sorted(RemotePath(fs.unstrip_protocol(p)) for p, info in found.items() if info["type"] == "file")

    # -- reading and writing --------------------------------------------------------

    def open(self, mode: str = "rb", buffering: int = READ_BLOCK) -> io.BufferedReader:
        """The object opened for reading (``mode`` ``"rb"`` only): seekable, read in range requests."""
        if mode != "rb":
            raise ValueError(f"{self.url}: remote files are opened for reading (rb) only, not {mode!r}")
        return io.BufferedReader(RemoteFile(self), buffer_size=buffering)

    def read_ranges(self, starts: Sequence[int], stops: Sequence[int]) -> list[bytes]:
        """Byte ranges ``[start, stop)`` of the object in one batched call (concurrent requests where the backend
        can), every byte of each (a short answer is an error)."""
        if not len(starts):
            return []
        fs, merge_offset_ranges = self.fs, require("fsspec.utils", f"reading {self.url}").merge_offset_ranges
        # Ranges less than MERGE_GAP apart are fetched as one (a request costs more than the bytes between).
        _, merged_starts, merged_stops = merge_offset_ranges(
            [self.url] * len(starts), list(starts), list(stops), max_gap=MERGE_GAP, max_block=MERGE_BLOCK
        )

        def fetch() -> list[bytes]:
            blocks = fs.cat_ranges([self.url] * len(merged_starts), merged_starts, merged_stops)
            for block in blocks:
                if isinstance(block, Exception):  # cat_ranges hands errors back per range: retry the lot
                    raise block
            return blocks

        blocks = retrying(f"{self.url} ({len(merged_starts)} ranges from byte {merged_starts[0]})", fetch)
        for block, start, stop in zip(blocks, merged_starts, merged_stops):
            if len(block) != stop - start:
                raise StorageError(f"{self.url}: asked for bytes {start}-{stop}, got {len(block)} bytes")
        where = np.searchsorted(merged_starts, starts, side="right") - 1  # the merged block holding each range
        return [
            blocks[b][start - merged_starts[b] : stop - merged_starts[b]]
            for b, start, stop in zip(where.tolist(), starts, stops)
        ]

    def read_bytes(self) -> bytes:
        """The whole object."""
        fs = self.fs
        return retrying(self.url, lambda: fs.cat_file(self.url))

    def read_text(self) -> str:
        """The whole object, as UTF-8 text."""
        return self.read_bytes().decode("utf-8")

    def upload(self, local: Path) -> None:
        """Copy the local file ``local`` to this URL (the object appears whole or not at all)."""
        fs = self.fs
        retrying(f"uploading {local} to {self.url}", lambda: fs.put_file(str(local), self.url))

    def remove_tree(self) -> None:
        """Delete every object under this prefix (a token cache entry)."""
        fs = self.fs
        retrying(f"removing {self.url}", lambda: fs.rm(self.url, recursive=True))


class RemoteFile(io.RawIOBase):
    """A seekable, read-only binary file over range requests (no read-ahead of its own: wrap it in a
    ``BufferedReader``, as ``RemotePath.open`` does, for streaming)."""

    def __init__(self, path: RemotePath):
        self.path, self.size, self.position = path, path.stat().st_size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self.position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.position, io.SEEK_END: self.size}[whence]
        self.position = max(0, base + offset)
        return self.position

    def readinto(self, buffer) -> int:
        """Fill ``buffer`` from the current position with one range request; 0 at the end of the object."""
        stop = min(self.size, self.position + len(buffer))
        if stop <= self.position:
            return 0
        data = self.path.read_ranges([self.position], [stop])[0]
        buffer[: len(data)] = data
        self.position = stop
        return len(data)


class RemoteWindows:
    """Windows of ``width`` tokens of a token file at a URL, window ``i`` starting at token ``i * stride``.

    ``read(indices)`` fetches the windows it does not hold yet in one batched range request; ``prefetch``
    starts fetching windows the plan will read soon in a background thread (at most ``PREFETCH_WINDOWS``
    held, the oldest dropped first). Either way a window's bytes are the file's: the batch is the one a
    local copy of the file gives."""

    def __init__(self, path: RemotePath, dtype: np.dtype, width: int, stride: int):
        self.path, self.dtype, self.width, self.stride = path, np.dtype(dtype), width, stride
        # (pid, the fetching thread, window index -> (its fetch, its row in that fetch)), made in each process
        self._open_state: tuple[int, ThreadPoolExecutor, OrderedDict[int, tuple[Future, int]]] | None = None

    def _state(self) -> tuple[ThreadPoolExecutor, OrderedDict[int, tuple[Future, int]]]:
        state = self._open_state
        if state is None or state[0] != os.getpid():  # a forked worker starts with no threads of its parent's
            state = self._open_state = (os.getpid(), ThreadPoolExecutor(1, "onlinemix-prefetch"), OrderedDict())
        return state[1], state[2]

    def _fetch(self, indices: np.ndarray) -> np.ndarray:
        item = self.dtype.itemsize
        starts = (indices * self.stride * item).tolist()
        stops = [start + self.width * item for start in starts]
        parts = self.path.read_ranges(starts, stops)
        return np.frombuffer(b"".join(parts), dtype=self.dtype).reshape(len(indices), self.width)

    def prefetch(self, indices: np.ndarray) -> None:
        """Start fetching the windows at ``indices`` (those not held or on their way already)."""
        pool, ahead = self._state()
        indices = np.asarray(indices, dtype=np.int64)
        _, first = np.unique(indices, return_index=True)
        wanted = indices[np.sort(first)]  # each window once, in the plan's order: the soonest kept when capped
        wanted = wanted[[int(i) not in ahead for i in wanted]][:PREFETCH_WINDOWS]
        if not len(wanted):
            return
        future = pool.submit(self._fetch, wanted)
        for row, index in enumerate(wanted.tolist()):
            ahead[index] = (future, row)
        while len(ahead) > PREFETCH_WINDOWS:
            ahead.popitem(last=False)

    def in_flight(self) -> int:
        """How many windows fetched ahead are still on their way."""
        return sum(not future.done() for future, _ in self._state()[1].values())

    def read(self, indices: np.ndarray) -> np.ndarray:
        """The windows at ``indices`` as a ``(n, width)`` array of the file's dtype."""
        _, ahead = self._state()
        indices = np.asarray(indices, dtype=np.int64)
        out = np.empty((len(indices), self.width), dtype=self.dtype)
        missing = []
        for row, index in enumerate(indices.tolist()):
            held = ahead.pop(index, None)
            if held is not None:
                future, position = held
                try:
                    out[row] = future.result()[position]
                    continue
                except StorageError:
                    raise  # it spent the retries and the time allowed already: the same again would only add to it
                except Exception:  # any other failure of a fetch ahead: fetched again below, with its own retries
                    pass
            missing.append(row)
        if missing:
            out[missing] = self._fetch(indices[missing])
        return out

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open_state": None}

    def __del__(self) -> None:
        state = getattr(self, "_open_state", None)
        if state is not None and state[0] == os.getpid():
            with contextlib.suppress(Exception):  # at interpreter exit the executor's machinery may be gone already
                state[1].shutdown(wait=False, cancel_futures=True)
