"""Token-bin: a flat binary file of token ids (the nanoGPT / Megatron ``.bin`` convention).

The file is ``numpy.memmap``-ed and cut into windows of ``seq_len + 1``
tokens (the extra token is the last target). Window ``i`` starts at token
``i * stride``; the default stride ``seq_len`` makes consecutive windows
share exactly their boundary token, so an epoch sees every token once as a
target. A smaller stride gives overlapping windows (more samples, each seen
in several contexts).

The file may be an object at a URL (``s3://bucket/web.bin``): its windows are then read with range
requests, one batched request per batch, fetched ahead of the plan in the background
(``storage.RemoteWindows``), and a batch is byte for byte the one a local copy of the file gives.
Its first scan (largest token id, checksums) reads it once, per machine.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from pathlib import Path
from typing import ClassVar

import numpy as np

from onlinemix.loaders.atomic import atomic_write
from onlinemix.loaders.cache.folder import cache_entry, cache_root
from onlinemix.loaders.checksums import CHECKSUM_CHUNK, bad_chunk, file_stamp
from onlinemix.loaders.sources.base import NothingToVerify, Source, SourceError
from onlinemix.loaders.sources.gather import gather_windows
from onlinemix.loaders.storage import StoragePath, as_path, mtime_ns, open_input, read_ranges, remote_windows
from onlinemix.loaders.transforms import TokenWindow, Transform

DTYPES = ("uint16", "uint32", "int32", "int64")
NPY_MAGIC = b"\x93NUMPY"  # what numpy.save writes first
SCAN_VERSION = 1
log = logging.getLogger("onlinemix")


def _read_json(path: Path) -> dict | None:
    """A small JSON record of the cache, or ``None`` if it is missing or unreadable (then it is made again)."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


class TokenBinSource(Source):
    """Windows of ``seq_len + 1`` tokens of one flat file of token ids (see the module docstring)."""

    kind = "tokenbin"
    options: ClassVar[dict[str, type]] = {"dtype": str}

    def __init__(
        self,
        path: str | Path | StoragePath,
        seq_len: int,
        dtype: str = "uint16",
        stride: int | None = None,
        transform: Transform | None = None,
    ):
        super().__init__(path, transform or TokenWindow())
        self.path = as_path(path)
        if dtype not in DTYPES:
            raise ValueError(f"{path}: dtype must be one of {DTYPES}, got {dtype!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        self.stride = seq_len if stride is None else int(stride)
        if self.stride < 1:
            raise ValueError(f"{path}: stride must be >= 1, got {stride}")
        if self.path.is_dir():
            raise SourceError(f"{path} is a folder: a tokenbin domain is one file of token ids")
        size = self.path.stat().st_size
        if read_ranges(self.path, [(0, len(NPY_MAGIC))])[0] == NPY_MAGIC:  # its header would be read as tokens
            raise SourceError(
                f"{path}: a .npy file with a header (numpy.save); a tokenbin domain is raw token ids, as np.memmap and "
                "OLMo-core write them: rewrite it with np.load(path).tofile(new_path)"
            )
        if size % self.dtype.itemsize:
            raise SourceError(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
        self.tokenizer = None  # set where the mixture knows it: then text() decodes with it
        self.num_tokens = size // self.dtype.itemsize
        self._bytes = size
        window = seq_len + 1
        self._length = 0 if self.num_tokens < window else (self.num_tokens - window) // self.stride + 1
        # an object's windows are fetched ahead of the plan; a local file's are read from a memory map
        self._remote = remote_windows(self.path, self.dtype, window, self.stride)

    def __len__(self) -> int:
        return self._length

    @property
    def tokens(self) -> np.ndarray:
        """The whole file as a read-only array (memory-mapped on first use)."""
        tokens = getattr(self, "_open_tokens", None)
        if tokens is None:
            tokens = self._open_tokens = np.asarray(np.memmap(self.path, dtype=self.dtype, mode="r"))
        return tokens

    @property
    def _window_view(self) -> np.ndarray:
        """Zero-copy ``(len, seq_len + 1)`` view of the file whose row ``i`` starts at token ``i * stride``."""
        view = getattr(self, "_open_window_view", None)
        if view is None:
            item = self.dtype.itemsize
            shape, strides = (self._length, self.seq_len + 1), (self.stride * item, item)
            view = np.lib.stride_tricks.as_strided(self.tokens, shape=shape, strides=strides, writeable=False)
            self._open_window_view = view
        return view

    def _check(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._length):
            raise SourceError(f"{self.path}: window index out of range [0, {self._length})")
        return indices

    def windows(self, indices: np.ndarray) -> np.ndarray:
        """Windows at ``indices`` as one ``(n, seq_len + 1)`` int64 array (one gather, no Python loop)."""
        if self._remote is not None:
            return self._remote.read(self._check(indices)).astype(np.int64)
        self._check_size()
        return self._window_view[self._check(indices)].astype(np.int64)

    @property
    def prefetches(self) -> bool:
        return self._remote is not None

    def prefetch(self, indices: np.ndarray) -> None:
        if self._remote is not None:
            self._remote.prefetch(indices)

    def _check_size(self) -> None:
        """A file truncated under a running loader would end the process with SIGBUS on the next read of a page
        past its new end; checking its size first (one fstat, ~1 µs) makes that an error naming the file."""
        file = self.__dict__.get("_open_file")  # per process: dropped when the source is pickled
        if file is None:  # a file object, not a bare descriptor: it is closed with the source
            file = self._open_file = open(self.path, "rb", buffering=0)  # noqa: SIM115
        size = os.fstat(file.fileno()).st_size
        if size < self._bytes:
            raise SourceError(
                f"{self.path} shrank from {self._bytes:,} to {size:,} bytes while it was being read (truncated or "
                "rewritten in place): replace data files by renaming a complete new file over them"
            )

    def scan(self, cache_dir: str | Path | None = None) -> dict:
        """What one pass over the file found: its largest token id and a CRC-32 of every 16 MiB (``max``,
        ``checksums``), with the file's ``stamp`` (size and content digest) at that time.

        The pass runs at 1-2 GB/s, once: its result is kept in the cache folder under the file's path and
        reused while the file's size, content digest and modification time are unchanged. A file where one
        changed is scanned again, with a warning: rewritten on purpose, or damaged. ``verify`` compares the
        file with the recorded checksums (a same-size edit that kept the file's mtime and missed the digest's
        sampled blocks is found only there).
        """
        # The modification time too: a same-size edit between the sampled blocks of a touched file is scanned again.
        # (An object in a bucket has none that every backend gives: its stamp is its size and content digest.)
        mtime = [] if (modified := mtime_ns(self.path)) is None else [modified]
        cached, stamp = self._scan_record(cache_dir), [*file_stamp(self.path), *mtime]
        record = _read_json(cached)
        if record is not None and record.get("stamp") == stamp and record.get("dtype") == self.dtype.name:
            return record
        if record is not None and record.get("dtype") == self.dtype.name:
            log.warning("%s changed since it was first scanned (size, content or mtime): scanning it again", self.path)
        largest, checksums = self._scan_pass()
        record = {"stamp": stamp, "dtype": self.dtype.name, "max": largest, "checksums": checksums}
        try:
            cached.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(cached, lambda file: file.write(json.dumps(record).encode()))
        except OSError:
            pass  # an unwritable cache: scan again next time
        return record

    def _scan_pass(self) -> tuple[int, list[int]]:
        """``scan``'s largest id and the CRC-32 of every ``CHECKSUM_CHUNK`` (as ``files.chunk_checksums``), in one
        read of the file, local or remote. Every chunk is whole tokens: the file's size is (checked at open), and
        so is ``CHECKSUM_CHUNK``."""
        largest, checksums = 0, []
        with open_input(self.path) as file:
            while chunk := file.read(CHECKSUM_CHUNK):
                checksums.append(zlib.crc32(chunk))
                largest = max(largest, int(np.frombuffer(chunk, dtype=self.dtype).max()))
        return largest, checksums

    def _scan_record(self, cache_dir: str | Path | None) -> Path:
        """Where ``scan`` keeps its result for this file: keyed by the file's path, checked by its stamp."""
        entry = cache_entry(cache_root(cache_dir), "tokenbin-scan", [SCAN_VERSION, str(self.path.resolve())])
        return entry.with_suffix(".json")

    def max_token(self, cache_dir: str | Path | None = None) -> int:
        """The largest token id in the file (from ``scan``)."""
        return int(self.scan(cache_dir)["max"])

    def verify(self, how: str = "full", cache_dir: str | Path | None = None) -> str:
        """Check the file against the CRC-32s recorded when it was first scanned (``how``: ``"full"``, or
        ``"sampled"``: three 16 MiB chunks); a mismatch is a ``SourceError`` naming the file and the chunk, and a
        file never scanned is ``NothingToVerify`` (a first scan now would only compare the file with itself)."""
        if _read_json(self._scan_record(cache_dir)) is None:
            raise NothingToVerify(
                f"{self.path}: no checksums recorded yet (the file was never opened in a mixture): nothing to compare "
                "it with; onlinemix prepare (or any open) records them"
            )
        record = self.scan(cache_dir)
        chunk = bad_chunk(self.path, record["checksums"], how)
        if chunk is not None:
            raise SourceError(
                f"{self.path}: 16 MiB chunk {chunk} fails the checksum recorded when the file was first scanned "
                "(corrupted, or rewritten in place at the same size): restore the file, or delete the record "
                f"{self._scan_record(cache_dir)} if the new content is right"
            )
        return f"token-bin, {self.num_tokens:,} tokens"

    def fingerprint(self) -> dict:
        stamp = getattr(self, "_open_stamp", None)
        if stamp is None:  # read once per process: a checkpoint records it, a resume compares it
            stamp = self._open_stamp = file_stamp(self.path)
        return {"stamp": stamp, "dtype": self.dtype.name, "stride": self.stride}

    def record(self, index: int) -> np.ndarray:
        return self.windows(np.array([index]))[0]

    def text(self, index: int, field: str = "text") -> str:
        if self.tokenizer is None:
            return super().text(index, field)  # byte-tokenizer ids, the default
        return self.tokenizer.decode(self.record(index))

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(self.transform, TokenWindow):
            window = self.windows(indices)
            return {"input_ids": window[:, :-1], "labels": window[:, 1:]}
        return super().read_batch(indices)

    def read_into(self, indices: np.ndarray, out: dict[str, np.ndarray], rows: np.ndarray | slice) -> None:
        if not isinstance(self.transform, TokenWindow):
            return super().read_into(indices, out, rows)
        if self._remote is not None:
            window = self._remote.read(indices)
            out["input_ids"][rows], out["labels"][rows] = window[:, :-1], window[:, 1:]
            return None
        # Copy straight from the memory map into the batch, one compiled pass (the cast to int64 included).
        # No range check here: the plan only ever asks for indices below len(self).
        self._check_size()
        gather_windows(self.tokens, indices * self.stride, rows, out["input_ids"], out["labels"])
