"""What a domain source is: a random-access, lazily opened, picklable sequence of samples.

Two kinds of sources:

- ``Source`` is the interface the loader reads: ``len(source)`` samples, read a batch of them by
  index (``read_batch``, or ``read_into`` a preallocated batch). ``TokenBinSource`` (windows of a token
  file) and ``TokenizedSource`` (windows of a tokenized document collection) are sources; so is any
  class of yours that implements ``__len__`` and ``record`` (see the docs' "Bring your own source").
- ``DocumentSource`` is a collection of documents in a fixed order (JSONL, text files, Parquet, a
  Hugging Face dataset, MDS or WebDataset shards). By default its documents are tokenized once into a
  cached token stream and read as windows (``TokenizedSource``); with a ``transform`` it is itself the
  source, one sample per record, passed through the transform.
"""

from __future__ import annotations

import abc
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from onlinemix.loaders.storage import StoragePath
from onlinemix.loaders.transforms import Transform, collate


class SourceError(Exception):
    """Bad data in a source: the message names the file and the sample."""


class NothingToVerify(SourceError):
    """A source whose checksums were never recorded (its cache not built, its file never scanned): ``verify``
    has nothing to compare it with."""


def document_text(record: Any, field: str = "text") -> str:
    """The text of a source record: a string, a JSON/MDS/WebDataset field, or byte-tokenizer ids."""
    if isinstance(record, dict):
        if field not in record:
            textual = [key for key, value in record.items() if isinstance(value, (str, bytes))]
            if not textual:
                raise SourceError(f"record has no {field!r} field and no text field (keys: {sorted(record)})")
            field = textual[0]
        record = record[field]
    if isinstance(record, bytes):
        return record.decode("utf-8", errors="replace")
    if isinstance(record, str):
        return record
    ids = np.asarray(record)
    return bytes(ids[ids < 256].astype(np.uint8)).decode("utf-8", errors="replace")  # byte-tokenizer ids


class Source(abc.ABC):
    """One domain's samples, addressed by index in ``[0, len(source))``.

    Subclasses implement ``__len__`` and ``record(index)`` (the raw sample, before the ``transform``);
    the rest has defaults. They open their files on first read (not in ``__init__``) and drop open
    handles when pickled (attributes whose names start with ``_open``), so a source travels cheaply to
    DataLoader workers under both fork and spawn. Reads must be pure: the same index, the same sample.
    """

    kind: ClassVar[str] = "custom"  # the ``source:`` value that selects this class in a config
    # Sharded sources: the sample count of each shard, in storage order (enables ``order: shards``).
    shard_sizes: np.ndarray | None = None

    def __init__(self, path: str | Path, transform: Transform | None = None):
        self.path = Path(path) if isinstance(path, os.PathLike) else path  # how messages name the source
        self.transform = transform

    @abc.abstractmethod
    def __len__(self) -> int:
        """Number of samples."""

    @abc.abstractmethod
    def record(self, index: int) -> Any:
        """The raw record at ``index``, before the transform."""

    def describe(self, index: int) -> str:
        """How error messages name sample ``index`` (a line number, a shard member...)."""
        return f"sample {index}"

    def text(self, index: int, field: str = "text") -> str:
        """Sample ``index`` as text (what importance estimates read); ``field``: where a dict record keeps it."""
        return document_text(self.record(index), field)

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Transformed samples at ``indices``, stacked field by field."""
        if self.transform is None:
            raise SourceError(f"{self.path}: its records need a transform that makes them fields (transform:)")
        samples = []
        for index in map(int, indices):
            record = self.record(index)
            try:
                samples.append(self.transform(record))
            except KeyError as error:
                raise SourceError(f"{self.path}: {self.describe(index)} has no field {error.args[0]!r}") from None
            except Exception as error:
                raise SourceError(
                    f"{self.path}: {self.describe(index)}: transform {self.transform!r} failed: {error}"
                ) from error
        return collate(samples, str(self.path))

    def read_into(self, indices: np.ndarray, out: dict[str, np.ndarray], rows: np.ndarray | slice) -> None:
        """Write the samples at ``indices`` into ``out[field][rows]`` (sources override this to skip copies)."""
        for name, values in self.read_batch(indices).items():
            out[name][rows] = values

    @property
    def prefetches(self) -> bool:
        """Whether ``prefetch`` does anything (the loader only works out what to fetch ahead for those that do)."""
        return False

    def prefetch(self, indices: np.ndarray) -> None:
        """Start fetching the samples at ``indices``, which the plan will read soon (sources on object
        storage do; the default does nothing)."""
        return None

    def signature(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Each output field's per-sample shape and dtype, from reading sample 0."""
        return {name: (values.shape[1:], values.dtype.str) for name, values in self.read_batch(np.zeros(1)).items()}

    def fingerprint(self) -> Any:
        """What identifies this source's samples in a checkpoint (beyond its length); JSON-able."""
        return None

    @classmethod
    def for_data(cls, path: Any, options: dict[str, Any]) -> type[Source]:
        """The class that reads the data at ``path`` (a ``source:`` kind whose data comes in several forms picks
        one here, e.g. LitData's token chunks or documents); this class by default."""
        return cls

    def summary(self) -> str:
        """One line on what the source holds beyond its sample count, for ``onlinemix inspect`` ("" for none)."""
        return ""

    def verify(self, how: str = "full", cache_dir: str | Path | None = None) -> str | None:
        """Check what onlinemix derived from or recorded of this source against its checksums (``how``:
        ``"full"`` reads everything once, ``"sampled"`` three chunks a file). Returns what was checked, in words,
        or ``None`` for a source onlinemix has no record of; a mismatch is a ``SourceError`` naming the file, and
        a record never made is ``NothingToVerify``."""
        return None

    def __getstate__(self) -> dict[str, Any]:
        # Open files and memory maps are reopened lazily in the receiving process.
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_open")}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


class DocumentSource(Source):
    """A collection of documents (text, or arrays of token ids) in a fixed order.

    Subclasses implement ``documents()`` (every document, in order, streamed: what the token cache is
    built from), ``fingerprint()`` (what changes when a document would: the files' sizes and
    content digests, the field read) and ``input_bytes()`` (for the progress bar); and, for use with
    a ``transform``, the record interface (``__len__``, ``record``).

    ``options`` lists the config keys a format takes and their types (checked before construction).
    ``suffixes``: the files a folder ``path`` stands for.
    """

    options: ClassVar[dict[str, type | tuple[type, ...]]] = {}
    suffixes: ClassVar[tuple[str, ...]] = ()
    # Whether ``documents()`` is each of ``self.files``' documents, file after file (so that a copy holding one
    # of the files gives that file's share): ``onlinemix prepare`` then tokenizes the files on many workers.
    per_file: ClassVar[bool] = False
    # In a part of one file (``cache.tokens.part_of``): the piece of it this copy reads, as ``pieces`` gave it
    span: tuple[int, int] | None = None

    def pieces(self, file: StoragePath, size: int) -> list[tuple[int, int]]:
        """Where one of this source's files may be cut into pieces of about ``size`` input bytes, each read on its
        own (``span``) and their documents, piece after piece, the file's: ``[(start, stop), ...]``. Empty (the
        default): the file is one piece. JSONL cuts at line starts, Parquet between row groups."""
        return []

    def starts_file(self) -> bool:
        """Whether this source reads its files from their start (not a later piece of one)."""
        return self.span is None or self.span[0] == 0

    @abc.abstractmethod
    def documents(self, progress: Callable[[int], Any] | None = None) -> Iterator[str | np.ndarray]:
        """Every document in order: a ``str`` to tokenize, or a 1-d integer array of token ids already.

        ``progress``, when given, is called with the number of input bytes each read consumed (it drives
        the progress bar of the first open, against ``input_bytes()``).
        """

    @abc.abstractmethod
    def input_bytes(self) -> int:
        """Bytes the documents are read from (for progress)."""

    def input_files(self) -> list[StoragePath]:
        """The files the documents are read from (default: the ``files`` a source keeps; none for an MDS
        remote): a token cache records their stamps, and the full digests of the local ones, which
        ``onlinemix verify`` checks (a remote one would be read a second time for it)."""
        return list(getattr(self, "files", []))


class ShardedSource(DocumentSource):
    """A source stored in shards: sample ``i`` is a sample of the shard whose range holds ``i``.

    Subclasses call ``_set_shards`` with each shard's sample count (storage order), which also makes the
    domain eligible for ``order: shards``.
    """

    def _set_shards(self, sizes: list[int]) -> None:
        self.shard_sizes = np.asarray(sizes, dtype=np.int64)
        self.shard_starts = np.cumsum(self.shard_sizes) - self.shard_sizes
        self._length = int(self.shard_sizes.sum())

    def __len__(self) -> int:
        return self._length

    def locate(self, index: int) -> tuple[int, int]:
        """``(shard number, sample number within the shard)`` of sample ``index``."""
        if not 0 <= index < self._length:
            raise SourceError(f"{self.path}: sample {index} out of range [0, {self._length})")
        shard = int(np.searchsorted(self.shard_starts, index, side="right")) - 1
        return shard, index - int(self.shard_starts[shard])
