"""A document source, tokenized once into a cached token stream, read as windows (packed) or per document.

**Packed** (``samples: packed``, the default): the documents are concatenated, each followed by the
tokenizer's end-of-text token (documents that are token ids already are taken as they are), and
sample ``i`` is the window of ``seq_len + 1`` tokens starting at token ``i * stride``: exactly what a
token-bin file of the same tokens gives (what nanoGPT, Megatron and torchtitan train on). No token is
dropped but the fewer than ``stride`` after the last whole window.

**Per document** (``samples: documents``): sample ``i`` is document ``i``, cut or padded to
``seq_len + 1`` tokens; the tokens cut off are counted (``dropped_tokens``, shown by ``onlinemix inspect``).

**The cache.** The first open tokenizes every document, with a progress bar, into
``<cache_dir>/<format>-<key>/``: ``tokens.bin`` (``uint16``, or ``uint32`` for vocabularies over
65,536 ids: 2 or 4 bytes per token), ``documents.npy`` (where each document starts) and ``meta.json``.
The key hashes the input files' sizes and content digests (``files.content_digest``: whole for small
files, sampled blocks for large ones; neither paths nor modification times play a part), the field read and the
tokenizer's fingerprint, so a changed file or tokenizer makes a new cache and an old one is never
read for new data. It is built in a temporary folder and renamed into place when complete, under a
file lock, so several processes opening the same data at once build it once; the partial folder of a
build that was killed is removed by the next build. Reads are then token-bin reads: one gather from
a memory map per batch.

**What a cache knows of itself.** ``meta.json`` records the token and document counts, a CRC-32 of
every 16 MiB of ``tokens.bin`` and ``documents.npy``, and the full BLAKE2b digest of every input file
(computed once, when the cache is built). Every open checks the files' lengths against the counts (a
truncated cache is an error naming the file, not half a domain); ``verify: sampled`` or ``full`` in the
mixture file also checks the checksums at open, and ``onlinemix verify`` checks all of it on demand.

**A cache in object storage.** With a URL ``cache_dir`` (``s3://bucket/caches``) the entry is built in
the local cache folder, then uploaded: ``tokens.bin`` and ``documents.npy`` first, ``meta.json`` last,
so that a reader finds a complete entry or none. Readers fetch ``meta.json`` and ``documents.npy`` and
read windows of ``tokens.bin`` with range requests (see ``TokenBinSource``). Processes of one machine
build an entry once (a local lock); machines do not share a lock, so prepare the caches once
(``onlinemix prepare``) before many nodes open them: two that build the same entry at once upload the
same bytes.
"""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from tqdm import tqdm

from onlinemix.loaders.cache import enforce_limit, mark_used, remove_folder
from onlinemix.loaders.files import (
    bad_chunk,
    cache_entry,
    cache_root,
    chunk_checksums,
    file_stamp,
    full_digest,
    locked,
    open_input,
    remove_stale_partials,
    token_cache_root,
    writable_cache,
)
from onlinemix.loaders.sources.base import DocumentSource, Source, SourceError
from onlinemix.loaders.sources.tokenbin import TokenBinSource
from onlinemix.loaders.storage import RemotePath, StorageError, as_path, is_url
from onlinemix.loaders.tokenizers import Tokenizer, token_dtype
from onlinemix.loaders.transforms import IGNORE_INDEX

log = logging.getLogger("onlinemix")
CACHE_VERSION = 2  # 2: checksums and input digests in meta.json, content-keyed
SAMPLES = ("packed", "documents")
_BATCH_DOCUMENTS = 256  # documents tokenized per call (a Hugging Face tokenizer encodes a batch in parallel)
_BATCH_TOKENS = 1 << 22  # tokens buffered before they are written
_PROGRESS_FROM = 16 << 20  # show a progress bar for inputs at least this large


VERIFY = ("lengths", "sampled", "full")  # what an open checks (the mixture file's ``verify``)
_FILES = ("tokens.bin", "documents.npy")


class CacheError(SourceError):
    """A token cache whose files are not what its ``meta.json`` says: the message names the file and the fix."""


class TokenCache:
    """The token stream of a document source: ``tokens`` (memory-mapped), document ``starts``, ``meta``.

    Opening checks that the files are as long as ``meta.json`` says (and, with ``verify``, their checksums):
    a damaged cache is a ``CacheError`` naming the file and the folder to delete.
    """

    built = False  # whether this process built it (``open()``), rather than finding it

    def __init__(self, folder: Path | RemotePath, verify: str = "lengths"):
        self.folder = folder
        self.meta = self._read_meta()
        self.dtype = np.dtype(self.meta["dtype"])
        tokens = self.meta["tokens"] * self.dtype.itemsize
        size = self.tokens_path.stat().st_size if self.tokens_path.is_file() else None
        held = "is missing" if size is None else f"holds {size:,}"
        self._check(size == tokens, "tokens.bin", f"should hold {tokens:,} bytes, {held}")
        try:  # documents + 1 entries
            if isinstance(folder, RemotePath):
                self.starts = np.load(io.BytesIO((folder / "documents.npy").read_bytes()))
            else:
                self.starts = np.load(folder / "documents.npy", mmap_mode="r")
        except StorageError:
            raise
        except (OSError, ValueError) as error:
            self._fail("documents.npy", f"cannot be read ({error})")
        documents = self.meta["documents"]
        self._check(
            self.starts.shape == (documents + 1,) and int(self.starts[-1]) == self.meta["tokens"],
            "documents.npy",
            f"should hold {documents + 1:,} document starts ending at token {self.meta['tokens']:,}",
        )
        if verify != "lengths":
            self.verify(verify)
        if not isinstance(folder, RemotePath):
            mark_used(folder)  # for onlinemix cache list / prune: least recently used first

    def _read_meta(self) -> dict:
        try:
            meta = json.loads((self.folder / "meta.json").read_text())
            if isinstance(meta, dict) and all(key in meta for key in ("dtype", "documents", "tokens", "checksums")):
                return meta
            problem = "lacks dtype, documents, tokens or checksums"
        except StorageError:
            raise
        except (OSError, ValueError) as error:
            problem = f"cannot be read ({error})"
        self._fail("meta.json", problem)

    def _check(self, good: bool, name: str, problem: str) -> None:
        if not good:
            self._fail(name, problem)

    def _fail(self, name: str, problem: str) -> NoReturn:
        raise CacheError(
            f"token cache {self.folder} is damaged: {name} {problem}: delete the folder "
            "(onlinemix tokenizes the domain again at the next open, or run onlinemix verify to check the rest)"
        )

    def verify(self, how: str = "full") -> None:
        """Check ``tokens.bin`` and ``documents.npy`` against their recorded CRC-32s (``how``: ``"full"``, or
        ``"sampled"``: three chunks of each); a mismatch is a ``CacheError`` naming the file and the chunk."""
        for name in _FILES:
            chunk = bad_chunk(self.folder / name, self.meta["checksums"][name], how)
            self._check(chunk is None, name, f"fails its checksum in 16 MiB chunk {chunk} (corrupted)")

    def stale_inputs(self) -> list[str]:
        """The input files whose full digest is no longer the one recorded when the cache was built (a same-size
        edit that the sampled key did not see, or a file that is gone)."""
        stale = []
        for path, digest in self.meta.get("inputs", []):
            if not as_path(path).is_file() or full_digest(as_path(path)) != digest:
                stale.append(path)
        return stale

    @property
    def tokens_path(self) -> Path | RemotePath:
        """The cached token stream (``tokens.bin``)."""
        return self.folder / "tokens.bin"

    @classmethod
    def open(
        cls, documents: DocumentSource, tokenizer: Tokenizer, root: Path | RemotePath, verify: str = "lengths"
    ) -> TokenCache:
        """The cache of ``documents`` tokenized by ``tokenizer`` under ``root`` (a folder or a URL), built
        first if there is none."""
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        key = cache_key(documents, tokenizer)
        folder = cache_entry(root, documents.kind, key)
        if (folder / "meta.json").exists():
            return cls(folder, verify)
        if isinstance(folder, RemotePath):
            return cls._build_remote(documents, tokenizer, folder, key, verify)
        writable_cache(root)
        built = False
        with locked(root / f".{folder.name}.lock"):
            if not (folder / "meta.json").exists():  # another process may have built it while this one waited
                _build_or_assemble(documents, tokenizer, folder, key, root)
                built = True
        remove_stale_partials(root)  # what builds killed before they finished left behind, this one's included
        enforce_limit(root, keep=folder)  # $ONLINEMIX_CACHE_LIMIT: least recently used entries go
        cache = cls(folder, verify)
        cache.built = built
        return cache

    @classmethod
    def _build_remote(
        cls, documents: DocumentSource, tokenizer: Tokenizer, folder: RemotePath, key: dict, verify: str
    ) -> TokenCache:
        """Build the entry in the local cache folder, upload it to ``folder`` (``meta.json`` last), open it there."""
        local_root = writable_cache(cache_root())
        local = local_root / f"upload-{folder.name}"
        built = False
        with locked(local_root / f".upload-{folder.name}.lock"):  # one build per machine
            if not (folder / "meta.json").exists():
                if not (local / "meta.json").exists():
                    _build_or_assemble(documents, tokenizer, local, key, folder.parent)
                log.info("uploading token cache %s to %s", local, folder)
                for name in (*_FILES, "meta.json"):  # meta.json last: it is what says an entry is complete
                    (folder / name).upload(local / name)
                shutil.rmtree(local, ignore_errors=True)
                built = True
        remove_stale_partials(local_root)
        cache = cls(folder, verify)
        cache.built = built
        return cache


class _TokenWriter:
    """Appends documents' token ids to a file in large writes, and records each document's length."""

    def __init__(self, file, dtype: np.dtype, tokenizer: Tokenizer, where: str):
        self.file, self.dtype, self.tokenizer, self.where = file, dtype, tokenizer, where
        self.lengths: list[int] = []
        self.characters = 0  # of the texts tokenized (the log's text size; input files may be compressed)
        self.pending: list[np.ndarray] = []
        self.buffered = 0

    def add(self, ids: np.ndarray) -> None:
        if len(ids) and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
            raise SourceError(
                f"{self.where}: document {len(self.lengths) + len(self.pending)} holds token id {int(ids.max())}, "
                f"outside the vocabulary of {self.tokenizer.name} ({self.tokenizer.vocab_size} ids): set tokenizer: "
                "to the one its token ids come from"
            )
        self.pending.append(ids)
        self.buffered += len(ids)
        if self.buffered >= _BATCH_TOKENS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.file.write(np.concatenate(self.pending).astype(self.dtype).tobytes())
            self.lengths.extend(len(ids) for ids in self.pending)
        self.pending, self.buffered = [], 0


@contextmanager
def _building(folder: Path) -> Iterator[Path]:
    """A fresh temporary folder beside ``folder`` to build an entry in (``_finish`` renames it into place),
    removed whatever stops the build; a damaged earlier entry (``meta.json`` missing) is removed first."""
    shutil.rmtree(folder, ignore_errors=True)
    temporary = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}.partial-"))
    try:
        yield temporary
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise


def _build(documents: DocumentSource, tokenizer: Tokenizer, folder: Path, key: dict) -> None:
    """Tokenize every document into a temporary folder beside ``folder``, then rename it into place."""
    dtype = token_dtype(tokenizer.vocab_size)
    total = documents.input_bytes()
    log.info("tokenizing %s (%.1f MB of input files, as stored: compressed files count compressed) with %s into %s",
             documents.path, total / 1e6, tokenizer.name, folder)  # fmt: skip
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc=f"tokenizing {documents.path}", disable=total < _PROGRESS_FROM
    )
    with _building(folder) as temporary:
        with open(temporary / "tokens.bin", "wb") as out, bar:
            writer = _TokenWriter(out, dtype, tokenizer, str(documents.path))
            texts: list[str] = []
            for document in documents.documents(progress=bar.update):
                if isinstance(document, str):
                    texts.append(document)
                    writer.characters += len(document)
                    if len(texts) < _BATCH_DOCUMENTS:
                        continue
                for ids in tokenizer.encode_batch(texts):  # texts before this one keep their order
                    writer.add(ids)
                texts.clear()
                if not isinstance(document, str):  # token ids already: as they are (their writer chose separators)
                    writer.add(np.asarray(document, dtype=np.int64))
            for ids in tokenizer.encode_batch(texts):
                writer.add(ids)
            writer.flush()
            out.flush()
            os.fsync(out.fileno())
        inputs = [[str(path.resolve()), full_digest(path)] for path in documents.input_files() if not is_url(path)]
        stamps = {str(path.resolve()): file_stamp(path) for path in documents.input_files()}  # for staleness
        _finish(temporary, folder, key, dtype, writer.lengths, inputs, stamps, writer.characters)
    log.info("%s: %d documents, %.1f million characters of text, %d tokens", documents.path, len(writer.lengths),
             writer.characters / 1e6, sum(writer.lengths))  # fmt: skip


def _finish(
    temporary: Path, folder: Path, key: dict, dtype: np.dtype, lengths: list[int], inputs: list, stamps: dict,
    characters: int,
) -> None:  # fmt: skip
    """Write ``documents.npy`` and ``meta.json`` beside a complete ``tokens.bin`` in ``temporary``, then rename it
    into place as ``folder`` (the one way an entry is finished, whether tokenized or assembled from parts)."""
    starts = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)])
    np.save(temporary / "documents.npy", starts)
    meta = {
        **key,
        "dtype": dtype.name,
        "documents": len(lengths),
        "tokens": int(starts[-1]),
        "checksums": {name: chunk_checksums(temporary / name) for name in _FILES},
        "inputs": inputs,
        "stamps": stamps,
        "characters": characters,
    }
    (temporary / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    os.replace(temporary, folder)


# ----------------------------------------------------------------------------- a domain from its files' parts


def file_parts(documents: DocumentSource) -> list[DocumentSource]:
    """The one-file sources whose token caches (*parts*) concatenate, in order, to ``documents``' own: one per
    input file of a source of several files whose documents are its files' documents in order (JSONL, text,
    Parquet: ``per_file``); empty for any other source. ``onlinemix prepare`` tokenizes the parts on many
    workers (and keeps each finished one, so a killed run resumes by file), then assembles the domain's cache."""
    files = getattr(documents, "files", [])
    if not documents.per_file or len(files) < 2:
        return []
    parts = []
    for file in files:
        part = copy.copy(documents)
        part.files, part.path = [file], str(file)
        parts.append(part)
    return parts


def cache_key(documents: DocumentSource, tokenizer: Tokenizer) -> dict:
    """What a token cache entry is keyed by: the documents' content and options, and the tokenizer."""
    return {"version": CACHE_VERSION, "source": documents.fingerprint(), "tokenizer": tokenizer.fingerprint()}


def _build_or_assemble(
    documents: DocumentSource, tokenizer: Tokenizer, folder: Path, key: dict, root: Path | RemotePath
) -> None:
    """Build ``folder``: from its parts when every one is in ``root`` (``onlinemix prepare`` made them), else by
    tokenizing the documents. Either way the files are the same, byte for byte."""
    parts = [cache_entry(root, part.kind, cache_key(part, tokenizer)) for part in file_parts(documents)]
    if not parts or not all((part / "meta.json").exists() for part in parts):
        _build(documents, tokenizer, folder, key)
        return
    opened = [TokenCache(part) for part in parts]
    log.info("assembling the token cache of %s from %d parts into %s", documents.path, len(parts), folder)
    with _building(folder) as temporary:
        with open(temporary / "tokens.bin", "wb") as out:
            for part in opened:
                with open_input(part.tokens_path) as tokens:
                    shutil.copyfileobj(tokens, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        lengths = np.concatenate([np.diff(part.starts) for part in opened]).tolist()
        inputs = [entry for part in opened for entry in part.meta.get("inputs", [])]
        stamps = {path: stamp for part in opened for path, stamp in part.meta.get("stamps", {}).items()}
        characters = sum(int(part.meta.get("characters", 0)) for part in opened)
        _finish(temporary, folder, key, opened[0].dtype, lengths, inputs, stamps, characters)
    for part in parts:  # the domain's cache holds them now
        if isinstance(part, RemotePath):
            part.remove_tree()
        else:
            remove_folder(part)


class TokenizedSource(Source):
    """``documents`` tokenized once (see the module docstring), as packed windows or one sample per document.

    Args:
        documents: the document source (JSONL, text, Parquet, Hugging Face, MDS, WebDataset).
        tokenizer: what turns its text into ids (``ByteTokenizer()`` or ``HFTokenizer(path)``).
        seq_len: tokens per sample (a sample holds ``seq_len + 1``: the last is the last label).
        samples: ``"packed"`` or ``"documents"``.
        stride: packed only: tokens between window starts (default ``seq_len``).
        cache_dir: where the token cache goes (default: ``files.cache_root``).
        verify: what opening the cache checks: ``"lengths"`` (its files' lengths, always), ``"sampled"`` (and
            the checksums of three 16 MiB chunks of each file) or ``"full"`` (every chunk: a full read).
    """

    def __init__(
        self,
        documents: DocumentSource,
        tokenizer: Tokenizer,
        seq_len: int,
        samples: str = "packed",
        stride: int | None = None,
        cache_dir: str | Path | None = None,
        verify: str = "lengths",
    ):
        if samples not in SAMPLES:
            raise ValueError(f"samples must be one of {SAMPLES}, got {samples!r}")
        if samples == "documents" and stride is not None:
            raise ValueError("stride is for packed samples (samples: packed)")
        super().__init__(documents.path)
        self.documents, self.tokenizer, self.seq_len, self.samples = documents, tokenizer, seq_len, samples
        self.cache = TokenCache.open(documents, tokenizer, token_cache_root(cache_dir), verify)
        lengths = np.diff(self.cache.starts)
        self.dropped_tokens = 0 if samples == "packed" else int(np.maximum(lengths - seq_len - 1, 0).sum())
        self.padded_samples = 0 if samples == "packed" else int((lengths < seq_len + 1).sum())
        if samples == "packed":
            self.windows = TokenBinSource(self.cache.tokens_path, seq_len, dtype=self.cache.dtype.name, stride=stride)
            self._length = len(self.windows)
        else:
            self._length = len(lengths)

    def __len__(self) -> int:
        return self._length

    @property
    def skipped(self) -> dict[str, str]:
        """What the document source left out when it opened (``on_bad: skip``), by file: why."""
        return getattr(self.documents, "skipped", {})

    def fingerprint(self) -> Any:
        # The cache folder's name is a hash of the documents' content key and the tokenizer.
        stride = self.windows.stride if self.samples == "packed" else None
        return {"tokenizer": self.tokenizer.fingerprint(), "samples": self.samples, "stride": stride,
                "cache": self.cache.folder.name}  # fmt: skip

    def describe(self, index: int) -> str:
        return f"window {index}" if self.samples == "packed" else f"document {index}"

    def record(self, index: int) -> np.ndarray:
        """The sample's ``seq_len + 1`` token ids (a short document padded with the tokenizer's pad id)."""
        if self.samples == "packed":
            return self.windows.record(index)
        return self._windows(np.array([index]))[0][0]

    def text(self, index: int, field: str = "text") -> str:
        """A packed window's text, or a whole document's (not cut to the sample: importance scores documents)."""
        if self.samples == "packed":
            return self.tokenizer.decode(self.windows.record(index))
        if not 0 <= index < self._length:
            raise SourceError(f"{self.path}: document {index} out of range [0, {self._length})")
        starts = self.cache.starts
        return self.tokenizer.decode(self._token_ranges(starts[index : index + 1], starts[index + 1 : index + 2])[0])

    def _token_ranges(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        """Tokens ``[start, stop)`` of the cache for each pair: slices of a memory map, or (a cache at a URL)
        one batched range request."""
        path, dtype = self.cache.tokens_path, self.cache.dtype
        if isinstance(path, RemotePath):
            wanted = [(int(a), int(b)) for a, b in zip(starts, stops) if b > a]
            item = dtype.itemsize
            parts = iter(path.read_ranges([a * item for a, _ in wanted], [b * item for _, b in wanted]))
            return [np.frombuffer(next(parts), dtype) if b > a else np.empty(0, dtype) for a, b in zip(starts, stops)]
        return [self._tokens[int(a) : int(b)] for a, b in zip(starts, stops)]

    @property
    def _tokens(self) -> np.ndarray:
        tokens = getattr(self, "_open_tokens", None)
        if tokens is None:
            tokens = self._open_tokens = np.memmap(self.cache.tokens_path, dtype=self.cache.dtype, mode="r")
        return tokens

    def _windows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Documents ``indices`` cut or padded to ``seq_len + 1`` tokens, and how many of those are theirs."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._length):
            raise SourceError(f"{self.path}: document index out of range [0, {self._length})")
        width = self.seq_len + 1
        starts = np.asarray(self.cache.starts[indices])
        lengths = np.minimum(np.asarray(self.cache.starts[indices + 1]) - starts, width)
        if isinstance(self.cache.tokens_path, RemotePath):
            window = np.full((len(indices), width), self.tokenizer.pad_id, dtype=np.int64)
            for row, tokens in enumerate(self._token_ranges(starts, starts + lengths)):
                window[row, : len(tokens)] = tokens
            return window, lengths
        positions = np.arange(width)
        tokens = self._tokens
        gather = np.minimum(starts[:, None] + positions, max(len(tokens) - 1, 0))
        values = tokens[gather] if len(tokens) else np.zeros(gather.shape, dtype=np.int64)
        window = np.where(positions < lengths[:, None], values, self.tokenizer.pad_id).astype(np.int64)
        return window, lengths

    def _documents(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per-document samples: ``input_ids`` and ``labels`` (nothing to predict past a document's end)."""
        window, lengths = self._windows(indices)
        labels = window[:, 1:].copy()
        labels[np.arange(1, self.seq_len + 1) >= lengths[:, None]] = IGNORE_INDEX
        return window[:, :-1], labels

    @property
    def prefetches(self) -> bool:
        return self.samples == "packed" and self.windows.prefetches

    def prefetch(self, indices: np.ndarray) -> None:
        if self.samples == "packed":
            self.windows.prefetch(indices)

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if self.samples == "packed":
            return self.windows.read_batch(indices)
        inputs, labels = self._documents(indices)
        return {"input_ids": inputs, "labels": labels}

    def read_into(self, indices: np.ndarray, out: dict[str, np.ndarray], rows: np.ndarray | slice) -> None:
        if self.samples == "packed":
            self.windows.read_into(indices, out, rows)
        else:
            super().read_into(indices, out, rows)
