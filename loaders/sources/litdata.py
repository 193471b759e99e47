"""LitData optimized datasets: what ``litdata.optimize`` wrote (chunks and an ``index.json``, in a local folder or a
bucket), read with litdata's own reader (``litdata.StreamingDataset``).

Two kinds, told apart by the ``index.json``'s item loader:

- **Token chunks** (``optimize(..., item_loader=TokensLoader())``: a stream of token ids): sample ``i`` is
  litdata's own block ``i`` of ``seq_len + 1`` tokens (``TokensLoader(block_size=seq_len + 1)``), read in place.
  As litdata reads them, blocks do not overlap and do not cross chunks: the tokens after a chunk's last whole
  block are never read; ``onlinemix inspect`` counts them. ``stride`` does not apply.
- **Anything else** (documents: a dict with a text field, a string, or an array of token ids per item): the
  items in order are documents, tokenized once with the mixture's tokenizer into the token cache and packed
  like any text domain (``field``: the text field, default ``text``).

A bucket (``s3://bucket/dataset``) is read through litdata (its own client, credentials and endpoint from the
environment, chunks fetched into ``litdata-<hash>`` of the mixture's cache folder; litdata evicts them past its
``max_cache_size``, and onlinemix's cache commands leave them alone). A failed read of litdata's is one line,
naming the dataset and the item: litdata fetches chunks with obstore, which refuses a plain-``http://`` endpoint
(a local MinIO without TLS), and says so that way. ``pip install 'onlinemix[litdata]'``.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from onlinemix.loaders.cache.folder import cache_entry, cache_root
from onlinemix.loaders.checksums import content_digest, file_stamp
from onlinemix.loaders.extras import require
from onlinemix.loaders.sources.base import DocumentSource, Source, SourceError
from onlinemix.loaders.storage import StoragePath, as_path, is_url
from onlinemix.loaders.transforms import TokenWindow, Transform

TOKENS_LOADER = "TokensLoader"


def read_index(path: StoragePath) -> dict[str, Any]:
    """A LitData dataset's ``index.json`` (its chunks and config); an error naming the folder otherwise."""
    index = path / "index.json"
    try:
        data = json.loads(index.read_text())
    except FileNotFoundError:
        raise SourceError(f"{path}: no index.json: not a dataset litdata.optimize wrote") from None
    except ValueError as error:
        raise SourceError(f"{index}: damaged ({error})") from None
    if not isinstance(data, dict) or not isinstance(data.get("chunks"), list) or not data["chunks"]:
        raise SourceError(f"{index}: no chunks (an empty or unfinished optimize?)")
    if not isinstance(data.get("config"), dict):
        raise SourceError(f"{index}: no config")
    return data


def _streaming(path: StoragePath, cache_dir: str | Path | None, **options: Any) -> Any:
    """litdata's ``StreamingDataset`` over ``path``, in index order; a bucket's chunks cached in the mixture's
    cache folder (``cache_dir``), not in the home folder."""
    litdata = require("litdata", f"a litdata domain ({path})")
    if is_url(path):
        options["cache_dir"] = str(cache_entry(cache_root(cache_dir), "litdata", str(path)))
    return litdata.StreamingDataset(str(path), shuffle=False, **options)


def read_item(folder: StoragePath, what: str, read: Callable[[], Any]) -> Any:
    """``read()`` through litdata; its failure (a chunk it could not fetch or decode) as one line naming the
    dataset and the item."""
    try:
        return read()
    except Exception as error:
        lines = str(error).strip().splitlines()
        raise SourceError(f"{folder}: litdata could not read {what} ({type(error).__name__}: "
                          f"{lines[0] if lines else 'no message'})") from None  # fmt: skip


def _identity(path: StoragePath, index: dict[str, Any]) -> dict[str, Any]:
    """What identifies a LitData dataset's content: its index (chunk names, sizes, counts) and, for a local
    folder, each chunk file's size and content digest."""
    identity: dict[str, Any] = {"index": content_digest(path / "index.json")}
    if not is_url(path):
        identity["chunks"] = [file_stamp(path / chunk["filename"]) for chunk in index["chunks"]]
    return identity


class LitDataTokens(Source):
    """Token chunks: litdata's blocks of ``seq_len + 1`` tokens (see the module docstring)."""

    kind = "litdata"

    def __init__(self, path: str | Path, seq_len: int, field: str = "text", cache_dir: str | Path | None = None):
        """``field`` is for a dataset of documents; token chunks have none (accepted, so one ``litdata`` domain
        entry opens either kind). ``cache_dir``: where a bucket's chunks are cached (the mixture's)."""
        super().__init__(str(path), TokenWindow())
        self.folder = as_path(str(path))
        self.cache_dir = cache_dir
        self.index = read_index(self.folder)
        self.block = seq_len + 1
        dims = [int(chunk.get("dim") or 0) for chunk in self.index["chunks"]]
        self.num_tokens = sum(dims)
        self.dropped_tokens = sum(dim % self.block for dim in dims)  # after each chunk's last whole block
        self._length = sum(dim // self.block for dim in dims)
        self.tokenizer = None

    @classmethod
    def is_tokens(cls, index: dict[str, Any]) -> bool:
        """Whether a dataset's index says it holds token chunks."""
        return index["config"].get("item_loader") == TOKENS_LOADER

    @property
    def dataset(self) -> Any:
        """litdata's reader of this dataset's blocks (made in each process on first use)."""
        dataset = getattr(self, "_open_dataset", None)
        if dataset is None:
            litdata = require("litdata", f"a litdata domain ({self.folder})")
            loader = litdata.TokensLoader(block_size=self.block)
            dataset = self._open_dataset = _streaming(self.folder, self.cache_dir, item_loader=loader)
            if len(dataset) != self._length:
                raise SourceError(f"{self.folder}: litdata reads {len(dataset)} blocks, its index.json {self._length}")
        return dataset

    def __len__(self) -> int:
        return self._length

    def summary(self) -> str:
        chunks = len(self.index["chunks"])
        return (f"{self.num_tokens:,} tokens in {chunks} chunks, {len(self):,} blocks of {self.block}; "
                f"{self.dropped_tokens:,} tokens after chunks' last whole blocks are not read")  # fmt: skip

    def fingerprint(self) -> Any:
        return {**_identity(self.folder, self.index), "block": self.block}

    def describe(self, index: int) -> str:
        return f"block {index}"

    def record(self, index: int) -> np.ndarray:
        if not 0 <= index < self._length:
            raise SourceError(f"{self.folder}: block {index} out of range [0, {self._length})")
        return np.asarray(read_item(self.folder, f"block {index}", lambda: self.dataset[int(index)]), dtype=np.int64)

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        window = np.stack([self.record(int(i)) for i in indices]) if len(indices) else np.zeros((0, self.block))
        window = window.astype(np.int64)
        return {"input_ids": window[:, :-1], "labels": window[:, 1:]}

    def max_token(self, cache_dir: str | Path | None = None) -> int:
        """The largest token id of every block (one pass, through litdata's reader)."""
        largest = getattr(self, "_largest", None)
        if largest is None:
            largest = self._largest = max((int(self.record(i).max()) for i in range(len(self))), default=0)
        return largest


class LitDataSource(DocumentSource):
    """A LitData dataset's items as documents (see the module docstring); token chunks open as ``LitDataTokens``."""

    kind = "litdata"
    options: ClassVar[dict[str, type]] = {"field": str}

    def __init__(self, path: str | Path, field: str = "text", transform: Transform | None = None, cache_dir=None):
        super().__init__(str(path), transform)
        self.folder = as_path(str(path))
        self.index = read_index(self.folder)
        self.field, self.cache_dir = field, cache_dir
        self._length = sum(int(chunk.get("chunk_size") or 0) for chunk in self.index["chunks"])
        self.files = [] if is_url(self.folder) else [self.folder / c["filename"] for c in self.index["chunks"]]

    @classmethod
    def for_data(cls, path: Any, options: dict[str, Any]) -> type[Source]:
        """``LitDataTokens`` for token chunks, this class for anything else."""
        return LitDataTokens if LitDataTokens.is_tokens(read_index(as_path(str(path)))) else cls

    @property
    def dataset(self) -> Any:
        """litdata's reader of this dataset's items (made in each process on first use)."""
        dataset = getattr(self, "_open_dataset", None)
        if dataset is None:
            dataset = self._open_dataset = _streaming(self.folder, self.cache_dir)
        return dataset

    def __len__(self) -> int:
        return self._length

    def record(self, index: int) -> Any:
        return read_item(self.folder, f"item {index}", lambda: self.dataset[int(index)])

    def documents(self, progress: Callable[[int], Any] | None = None) -> Iterator[str | np.ndarray]:
        chunk_items = [int(chunk.get("chunk_size") or 0) for chunk in self.index["chunks"]]
        chunk_bytes = [int(chunk.get("chunk_bytes") or 0) for chunk in self.index["chunks"]]
        boundaries = np.cumsum(chunk_items)
        chunk = 0
        for i in range(self._length):
            yield self._document(self.record(i), i)
            if progress is not None and chunk < len(boundaries) and i + 1 == boundaries[chunk]:
                progress(chunk_bytes[chunk])  # a chunk read
                chunk += 1

    def _document(self, item: Any, i: int) -> str | np.ndarray:
        if isinstance(item, dict):
            if self.field not in item:
                raise SourceError(f"{self.folder}: item {i} has no field {self.field!r} (its fields: {sorted(item)})")
            item = item[self.field]
        if isinstance(item, str):
            return item
        if isinstance(item, bytes):
            return item.decode("utf-8", errors="replace")
        array = np.asarray(item)
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise SourceError(f"{self.folder}: item {i} is neither text nor token ids ({type(item).__name__})")
        return array.astype(np.int64)

    def input_bytes(self) -> int:
        return sum(int(chunk.get("chunk_bytes") or 0) for chunk in self.index["chunks"])

    def fingerprint(self) -> Any:
        return {**_identity(self.folder, self.index), "field": self.field}
