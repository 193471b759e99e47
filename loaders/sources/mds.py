"""MDS: shards written by mosaicml-streaming's ``MDSWriter``, read through its own index, reader and cache.

``path`` is the local folder holding ``index.json`` and the shards (with
``split``, the ``split`` subfolder). With ``remote`` (any URL
mosaicml-streaming can download from: ``s3://``, ``gs://``, ``oci://``,
a local or mounted folder...) ``path`` is the local *cache*: ``index.json``
is fetched at open, and each shard is downloaded (and decompressed) by
mosaicml-streaming's ``Stream`` the first time a process reads from it.

Random access: an MDS shard starts with its sample count and the byte offset
of every sample, so sample ``i`` is one slice of the memory-mapped shard,
decoded by mosaicml-streaming's ``MDSReader.decode_sample`` (every MDS
encoding works).

**Which column.** ``column`` names the document (default: the first of
``tokens``, ``input_ids``, ``text`` that the shards have). A ``str`` column
is text for the tokenizer; an ``ndarray`` column is token ids; a ``bytes``
column is token ids of dtype ``token_dtype`` (the llm-foundry convention).
By default the documents are tokenized once into a cached token stream and
packed into windows (``loaders/cache/tokens.py``). The record a custom
transform receives is the whole decoded sample (a dict of every column) plus
``"document"``.

**Compressed shards** of a local dataset are decompressed into the cache
folder, never beside the data: a read-only dataset needs no write access.

**Bad data.** A shard listed in ``index.json`` but missing (without a
remote), a shard whose header disagrees with ``index.json`` (sample count,
size: corrupt or replaced), or a missing column is an error naming the shard;
a sample that cannot be decoded names the shard and sample. With ``on_bad:
skip``, missing and corrupt shards are left out when the source opens, and
reported (``source.skipped``, and a warning): the plan never sees them.
"""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from onlinemix.loaders.cache.folder import cache_entry, cache_root, writable_cache
from onlinemix.loaders.checksums import file_stamp
from onlinemix.loaders.extras import require
from onlinemix.loaders.sources.base import ShardedSource, SourceError, document_text
from onlinemix.loaders.transforms import Transform

DOCUMENT_COLUMNS = ("tokens", "input_ids", "text")  # the default ``column``, in order of preference
ON_BAD = ("error", "skip")
_STREAM_DEFAULTS = {
    "remote": None,
    "local": None,
    "split": None,
    "download_retry": 2,
    "download_timeout": 60.0,
    "validate_hash": None,
    "keep_zip": False,
}


def _default_transform_reads(encoding: str) -> bool:
    """Whether the default transform can make a window of a column so encoded (text or token ids)."""
    return encoding in ("str", "bytes") or encoding.startswith("ndarray")


class MdsSource(ShardedSource):
    """The documents of mosaicml-streaming MDS shards (see the module docstring)."""

    kind = "mds"
    options: ClassVar[dict[str, type]] = {"remote": str, "split": str, "column": str, "token_dtype": str, "on_bad": str}

    def __init__(
        self,
        path: str | Path,
        column: str | None = None,
        remote: str | None = None,
        split: str | None = None,
        token_dtype: str | None = None,
        on_bad: str = "error",
        transform: Transform | None = None,
        cache_dir: str | Path | None = None,
    ):
        super().__init__(Path(path), transform)
        if on_bad not in ON_BAD:
            raise ValueError(f"on_bad must be one of {ON_BAD}, got {on_bad!r}")
        self.remote, self.split = remote, split
        self.folder = self.path / (split or "")
        self.token_dtype = None if token_dtype is None else np.dtype(token_dtype)
        if not remote and not (self.folder / "index.json").is_file():
            raise SourceError(f"{self.folder}: no index.json (is this an MDS dataset folder?)")
        self.cache_dir = cache_dir
        self.local = self.path  # where shards are read from: the data, or for a remote its local cache
        if remote:
            try:
                shards = self._stream().get_shards(_world(), allow_unsafe_types=False)
            except Exception as error:
                raise SourceError(f"cannot read {remote}/index.json into {self.path}: {error}") from None
        else:
            shards = self._local_shards()
        self.skipped: dict[str, str] = {}  # shard file -> why it was left out
        if not remote:  # with a remote, a shard is checked when it is downloaded
            shards = [shard for shard in shards if self._usable(shard, on_bad)]
            if any(not (self.folder / shard.raw_data.basename).exists() for shard in shards):
                # compressed shards: decompress into the cache folder, the data stays as it is
                index = file_stamp(self.folder / "index.json")
                self.local = cache_entry(writable_cache(cache_root(cache_dir)), "mds-shards", index)
                self.remote = str(self.path)
        if self.skipped:
            warnings.warn(
                f"{self.folder}: left out {len(self.skipped)} bad shard(s): "
                + "; ".join(f"{name}: {why}" for name, why in self.skipped.items()),
                stacklevel=2,
            )
        if not shards:
            raise SourceError(f"{self.folder}: no readable shards")
        self.shards = shards
        self.column = column or self._default_column()
        for shard in shards:
            if self.column not in shard.column_names:
                raise SourceError(
                    f"{self.folder}: shard {shard.raw_data.basename} has no column {self.column!r} "
                    f"(columns: {shard.column_names})"
                )
        encoding = shards[0].column_encodings[shards[0].column_names.index(self.column)]
        if transform is None and not _default_transform_reads(encoding):
            raise SourceError(
                f"{self.folder}: column {self.column!r} is {encoding}; documents are text (str) or token ids "
                "(ndarray, or bytes with token_dtype) — give a transform for anything else"
            )
        if encoding == "bytes" and self.token_dtype is None and transform is None:
            raise SourceError(f"{self.folder}: column {self.column!r} is raw bytes: set token_dtype (e.g. uint16)")
        self._set_shards([shard.samples for shard in shards])

    # -- documents -----------------------------------------------------------------

    def documents(self, progress=None):
        for number, shard in enumerate(self.shards):
            for row in range(shard.samples):
                yield self._document(number, row)
            if progress is not None:
                progress(shard.raw_data.bytes)

    def input_bytes(self) -> int:
        return sum(shard.raw_data.bytes for shard in self.shards)

    def fingerprint(self) -> dict:
        index = self.local / (self.split or "") / "index.json"
        content = hashlib.sha256(index.read_bytes()).hexdigest()[:16] if index.exists() else None
        shards = [[shard.raw_data.basename, shard.raw_data.bytes, shard.samples] for shard in self.shards]
        where = self.remote if self.remote and self.remote != str(self.path) else str(self.path.resolve())
        return {"kind": self.kind, "where": where, "index": content, "shards": shards, "column": self.column,
                "token_dtype": None if self.token_dtype is None else self.token_dtype.name}  # fmt: skip

    # -- opening -------------------------------------------------------------------

    def _stream(self):
        """mosaicml-streaming's ``Stream``: it downloads, validates and decompresses shards into ``path``."""
        stream = getattr(self, "_open_stream", None)
        if stream is None:
            stream = require("streaming", "an mds domain").Stream(
                remote=self.remote, local=str(self.local), split=self.split
            )
            stream.apply_default(_STREAM_DEFAULTS)
            self._open_stream = stream
        return stream

    def _local_shards(self) -> list:
        reader_from_json = require("streaming.base.format", "an mds domain").reader_from_json

        index_file = self.folder / "index.json"
        try:
            index = json.loads(index_file.read_text())
        except FileNotFoundError:
            raise SourceError(f"{self.folder}: no index.json (is this an MDS dataset folder?)") from None
        except json.JSONDecodeError as error:
            raise SourceError(f"{index_file}: not valid JSON: {error}") from None
        if index.get("version") != 2:
            raise SourceError(f"{index_file}: unsupported MDS index version {index.get('version')!r} (expected 2)")
        shards = []
        for info in index["shards"]:
            if info.get("format") != "mds":
                raise SourceError(f"{index_file}: shard format {info.get('format')!r} is not mds")
            shard = reader_from_json(str(self.path), self.split, info)
            shard.validate(allow_unsafe_types=False)
            shards.append(shard)
        return shards

    def _usable(self, shard, on_bad: str) -> bool:
        """Check a local shard against ``index.json``; a bad one is an error, or skipped and noted."""
        name = shard.raw_data.basename
        raw, compressed = self.folder / name, shard.zip_data and self.folder / shard.zip_data.basename
        if raw.exists():
            problem = _check_header(raw, shard.samples)
        elif compressed and compressed.exists():
            problem = None  # decompressed (by the Stream) and checked on first read
        else:
            problem = "missing"
        if problem is None:
            return True
        if on_bad == "error":
            raise SourceError(f"{self.folder}: shard {name} is {problem} (set on_bad: skip to leave it out)")
        self.skipped[name] = problem
        return False

    def _shard_data(self, number: int) -> tuple[np.ndarray, np.ndarray]:
        """The memory-mapped bytes of shard ``number`` and its sample offsets (made ready on first use)."""
        opened = self.__dict__.setdefault("_open_shards", {})
        if number not in opened:
            shard = self.shards[number]
            raw = self.local / (self.split or "") / shard.raw_data.basename
            try:
                self._stream().prepare_shard(shard)  # download / decompress when needed
            except Exception as error:
                raise SourceError(f"{self.folder}: cannot fetch shard {shard.raw_data.basename}: {error}") from error
            problem = _check_header(raw, shard.samples)
            if problem is not None:
                raise SourceError(f"{self.folder}: shard {shard.raw_data.basename} is {problem}")
            data = np.memmap(raw, dtype=np.uint8, mode="r")
            offsets = np.frombuffer(data, dtype="<u4", count=shard.samples + 1, offset=4)
            opened[number] = (data, offsets)
        return opened[number]

    # -- reading -------------------------------------------------------------------

    def _default_column(self) -> str:
        names = self.shards[0].column_names
        for column in DOCUMENT_COLUMNS:
            if column in names:
                return column
        raise SourceError(
            f"{self.folder}: no column named {' / '.join(DOCUMENT_COLUMNS)}: set column: (one of {names})"
        )

    def describe(self, index: int) -> str:
        shard, row = self.locate(index)
        return f"shard {self.shards[shard].raw_data.basename}, sample {row}"

    def record(self, index: int) -> dict[str, Any]:
        return self._sample(*self.locate(index))

    def _sample(self, number: int, row: int) -> dict[str, Any]:
        data, offsets = self._shard_data(number)
        try:
            sample = self.shards[number].decode_sample(data[offsets[row] : offsets[row + 1]].tobytes())
        except Exception as error:
            where = f"shard {self.shards[number].raw_data.basename}, sample {row}"
            raise SourceError(f"{self.folder}: {where} cannot be decoded: {error}") from None
        document = sample[self.column]
        if isinstance(document, bytes) and self.token_dtype is not None:
            document = np.frombuffer(document, dtype=self.token_dtype)
        sample["document"] = document
        return sample

    def _document(self, number: int, row: int):
        document = self._sample(number, row)["document"]
        return document if isinstance(document, str) else np.asarray(document, dtype=np.int64)

    def text(self, index: int, field: str = "text") -> str:
        return document_text(self.record(index)["document"])


def _check_header(raw: Path, samples: int) -> str | None:
    """Why an MDS shard file disagrees with its ``index.json`` entry, or ``None`` when it agrees."""
    size = raw.stat().st_size
    if size < 4 * (samples + 2):
        return f"corrupt: {size} bytes cannot hold the offsets of {samples} samples"
    with open(raw, "rb") as file:
        head = np.frombuffer(file.read(4 * (samples + 2)), dtype="<u4")
    if head[0] != samples:
        return f"corrupt or replaced: it holds {head[0]} samples, index.json says {samples}"
    offsets = head[1:]
    if offsets[-1] != size or np.any(np.diff(offsets.astype(np.int64)) < 0):
        return f"corrupt: its sample offsets end at byte {offsets[-1]}, the file has {size}"
    return None


def _world():
    return require(
        "streaming.base.world", "an mds domain"
    ).World.detect()  # only the local leader downloads index.json; the other ranks wait for it
