"""The token cache: a document source tokenized once into a token stream on disk, its format and its builder.

**The entry.** The first open of a document domain tokenizes every document, with a progress bar, into
``<cache_dir>/<format>-<key>/``: ``tokens.bin`` (``uint16``, or ``uint32`` for vocabularies over
65,536 ids: 2 or 4 bytes per token), ``documents.npy`` (where each document starts) and ``meta.json``.
The key hashes the input files' sizes and content digests (``checksums.content_digest``: whole for small
files, sampled blocks for large ones; neither paths nor modification times play a part), the field read and
the tokenizer's fingerprint, so a changed file or tokenizer makes a new entry and an old one is never
read for new data. It is built in a temporary folder and renamed into place when complete, under a
file lock, so several processes opening the same data at once build it once; the partial folder of a
build that was killed is removed by the next build. ``sources/tokenized.py`` reads it as windows.

**What an entry knows of itself.** ``meta.json`` records the token and document counts, a CRC-32 of
every 16 MiB of ``tokens.bin`` and ``documents.npy``, and the full BLAKE2b digest of every local input file
(computed once, when the entry is built). Every open checks the files' lengths against the counts (a
truncated cache is an error naming the file, not half a domain); ``verify: sampled`` or ``full`` in the
mixture file also checks the checksums at open, and ``onlinemix verify`` checks all of it on demand.

**An entry in object storage.** With a URL ``cache_dir`` (``s3://bucket/caches``) the entry is built in
the local cache folder, then uploaded: ``tokens.bin`` and ``documents.npy`` first, ``meta.json`` last,
so that a reader finds a complete entry or none (``storage.staging_folder`` and ``storage.publish``).
Readers fetch ``meta.json`` and ``documents.npy`` and read windows of ``tokens.bin`` with range requests.
Processes of one machine build an entry once (a local lock); machines do not share a lock, so prepare the
caches once (``onlinemix prepare``) before many nodes open them: two that build the same entry at once
upload the same bytes.

**Parts.** ``onlinemix prepare`` tokenizes a domain of many files file by file, and a large file piece by piece
(JSONL at line starts, Parquet between row groups; each file's or piece's entry is a *part*), and assembles the
domain's entry from them: the same bytes a single build writes.

Over 400 lines on purpose: a single build and the assembly from parts must write the same bytes and the same
``meta.json``, and they share the helpers that guarantee it (``_building``, ``_finish``, the entry's locks);
kept together, one reads both paths side by side.
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NoReturn

import numpy as np
from tqdm import tqdm

from onlinemix.loaders.cache.entries import cache_limit, enforce_limit
from onlinemix.loaders.cache.folder import (
    EntryLock,
    cache_entry,
    cache_root,
    locked,
    remove_stale_partials,
    writable_cache,
)
from onlinemix.loaders.checksums import VERIFY, bad_chunk, chunk_checksums, file_stamp, full_digest
from onlinemix.loaders.sources.base import DocumentSource, NothingToVerify, SourceError
from onlinemix.loaders.storage import (
    StorageError,
    StoragePath,
    as_path,
    is_url,
    load_array,
    open_input,
    publish,
    remove_tree,
    staging_folder,
    touch,
)
from onlinemix.loaders.tokenizers import Tokenizer, token_dtype

log = logging.getLogger("onlinemix")
CACHE_VERSION = 2  # 2: checksums and input digests in meta.json, content-keyed
_BATCH_DOCUMENTS = 256  # documents tokenized per call (a Hugging Face tokenizer encodes a batch in parallel)
PART_BYTES = 32 << 20  # onlinemix prepare cuts a large JSONL or Parquet file into parts of about this size
_part_size = contextvars.ContextVar("part_size", default=PART_BYTES)  # the parts a build assembles from (parts_of)
# a domain's first documents (this many, up to this much text) are encoded by tokenizers too where another backend
# encodes, and compared: tokenizers is ~40x slower, so the sample is small
_CHECKED_DOCUMENTS, _CHECKED_CHARACTERS = 16, 16 << 10
_PROGRESS_FROM = 16 << 20  # show a progress bar for inputs at least this large


_FILES = ("tokens.bin", "documents.npy")


class CacheError(SourceError):
    """A token cache whose files are not what its ``meta.json`` says: the message names the file and the fix."""


class TokenCache:
    """The token stream of a document source: ``tokens`` (memory-mapped), document ``starts``, ``meta``.

    Opening checks that the files are as long as ``meta.json`` says (and, with ``verify``, their checksums):
    a damaged cache is a ``CacheError`` naming the file and the folder to delete.
    """

    built = False  # whether this process built it (``open()``), rather than finding it

    def __init__(self, folder: StoragePath, verify: str = "lengths", hold: EntryLock | None = None):
        """``hold``: the entry's lock, held shared while this object lives (``open`` takes it): no ``prune``,
        ``clear`` or cache limit removes an entry a live process has open."""
        self.folder = folder
        self.hold = hold
        self.meta = self._read_meta()
        self.dtype = np.dtype(self.meta["dtype"])
        tokens = self.meta["tokens"] * self.dtype.itemsize
        size = self.tokens_path.stat().st_size if self.tokens_path.is_file() else None
        held = "is missing" if size is None else f"holds {size:,}"
        self._check(size == tokens, "tokens.bin", f"should hold {tokens:,} bytes, {held}")
        try:  # documents + 1 entries
            self.starts = load_array(folder / "documents.npy")
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
        touch(folder / "meta.json")  # its last use, for onlinemix cache list / prune: least recently used first

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

    def __setstate__(self, state: dict) -> None:
        """In a process this cache was sent to (a spawned DataLoader worker, a Ray task), hold the entry again."""
        self.__dict__.update(state)
        if self.hold is not None:
            with contextlib.suppress(OSError):
                self.hold.acquire(shared=True)

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
    def tokens_path(self) -> StoragePath:
        """The cached token stream (``tokens.bin``)."""
        return self.folder / "tokens.bin"

    @classmethod
    def open(
        cls,
        documents: DocumentSource,
        tokenizer: Tokenizer,
        root: StoragePath,
        verify: str = "lengths",
        build: bool = True,
    ) -> TokenCache:
        """The cache of ``documents`` tokenized by ``tokenizer`` under ``root`` (a folder or a URL), built
        first if there is none: in a local folder (the entry itself, or one it is uploaded from), under a lock
        one process of this machine holds while the others wait. ``build=False``: ``NothingToVerify`` instead
        of a build."""
        if verify not in VERIFY:
            raise ValueError(f"verify must be one of {VERIFY}, got {verify!r}")
        limit = cache_limit()  # a bad $ONLINEMIX_CACHE_LIMIT is said before any work, not after a build
        key = cache_key(documents, tokenizer)
        folder = cache_entry(root, documents.kind, key)
        staged = staging_folder(folder, cache_root())
        built = False
        while True:
            # shared: a remover skips the entry while this process has it open (an entry in a bucket has no local
            # lock to hold: it is only ever built here, in its staging folder, under the exclusive one)
            hold = _hold(staged) if staged == folder else None
            if (folder / "meta.json").exists():
                cache = cls(folder, verify, hold)
                cache.built = built
                return cache
            if hold is not None:
                hold.release()
            if not build:
                raise NothingToVerify(
                    f"{documents.path}: no token cache yet (it is built at the first open, or by onlinemix prepare): "
                    "nothing to verify"
                )
            local_root = writable_cache(staged.parent)
            with locked(staged):
                if not (folder / "meta.json").exists():  # another process may have built it while this one waited
                    if not (staged / "meta.json").exists():
                        _build_or_assemble(documents, tokenizer, staged, key, root)
                    publish(staged, folder, (*_FILES, "meta.json"))  # meta.json last: it says an entry is complete
                    built = True
            remove_stale_partials(local_root)  # what killed builds left behind, this one's included
            if limit is not None:
                enforce_limit(local_root, limit, keep=staged)  # the least recently used entries not in use go
            # then open it as any reader does (a remover may have taken it in between: then it is built again)


def _hold(staged: Path) -> EntryLock | None:
    """The entry's lock, shared (waiting while it is being built or removed); ``None`` where the cache folder is
    read-only (nothing can remove from it then either)."""
    hold = EntryLock.of(staged)
    try:
        hold.acquire(shared=True)
    except OSError:
        return None
    return hold


class _TokenWriter:
    """Writes batches of documents' token ids to a file as they come, and records each document's length."""

    def __init__(self, file, dtype: np.dtype, tokenizer: Tokenizer, where: str):
        self.file, self.dtype, self.tokenizer, self.where = file, dtype, tokenizer, where
        self.lengths: list[np.ndarray] = []
        self.documents = 0
        self.characters = 0  # of the texts tokenized (the log's text size; input files may be compressed)

    def add(self, ids: np.ndarray, lengths: np.ndarray) -> None:
        """Documents' ids end to end (``lengths``: each document's), checked against the vocabulary."""
        if len(ids) and (ids.min() < 0 or ids.max() >= self.tokenizer.vocab_size):
            bad = np.flatnonzero((ids < 0) | (ids >= self.tokenizer.vocab_size))[0]
            document = self.documents + int(np.searchsorted(np.cumsum(lengths), bad, side="right"))
            raise SourceError(
                f"{self.where}: document {document} holds token id {int(ids[bad])}, outside the vocabulary of "
                f"{self.tokenizer.name} ({self.tokenizer.vocab_size} ids): set tokenizer: to the one its token ids "
                "come from"
            )
        self.file.write(ids.astype(self.dtype, copy=False).data)  # the file object buffers; no copy made here
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        self.documents += len(lengths)

    def all_lengths(self) -> np.ndarray:
        return np.concatenate(self.lengths) if self.lengths else np.zeros(0, dtype=np.int64)


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
    bar = tqdm(
        total=total, unit="B", unit_scale=True, desc=f"tokenizing {documents.path}", disable=total < _PROGRESS_FROM
    )
    with _building(folder) as temporary:
        with open(temporary / "tokens.bin", "wb") as out, bar:
            writer = _TokenWriter(out, dtype, tokenizer, str(documents.path))
            texts: list[str] = []

            def encode() -> None:
                if texts:
                    if writer.documents == 0 and documents.starts_file() and hasattr(tokenizer, "check_backend"):
                        tokenizer.check_backend(_sample(texts), str(documents.path))  # the domain's first texts
                    writer.add(*tokenizer.encode_flat(texts, dtype))
                    writer.characters += sum(len(text) for text in texts)
                    texts.clear()

            started = False
            for document in documents.documents(progress=bar.update):
                if not started:  # the backend is loaded by now: say which it is
                    started = True
                    log.info("tokenizing %s (%.1f MB of input files, as stored) with %s (%s) into %s", documents.path,
                             total / 1e6, tokenizer.name, backend_of(tokenizer), folder)  # fmt: skip
                if isinstance(document, str):
                    texts.append(document)
                    if len(texts) >= _BATCH_DOCUMENTS:
                        encode()
                    continue
                encode()  # texts before this one keep their order
                ids = np.asarray(document, dtype=np.int64)  # token ids already: as they are (their writer chose)
                writer.add(ids, np.array([len(ids)]))
            encode()
            out.flush()
            os.fsync(out.fileno())
        # full digests of the local inputs (what verify checks); an object would be read a second time for it, and
        # a part of a file (a byte range) leaves it to the part that starts the file
        inputs = [[str(path.resolve()), full_digest(path)] for path in documents.input_files()
                  if not is_url(path) and documents.starts_file()]  # fmt: skip
        stamps = {str(path.resolve()): file_stamp(path) for path in documents.input_files()}  # for staleness
        lengths = writer.all_lengths()
        _finish(temporary, folder, key, dtype, lengths, inputs, stamps, writer.characters, backend_of(tokenizer))
    log.info("%s: %d documents, %.1f million characters of text, %d tokens", documents.path, len(lengths),
             writer.characters / 1e6, int(lengths.sum()))  # fmt: skip


def _sample(texts: list[str]) -> list[str]:
    """The first texts, at most ``_CHECKED_DOCUMENTS`` of them and ``_CHECKED_CHARACTERS`` of text (the last one
    cut there)."""
    sample, left = [], _CHECKED_CHARACTERS
    for text in texts[:_CHECKED_DOCUMENTS]:
        sample.append(text[:left])
        left -= len(sample[-1])
        if left <= 0:
            break
    return sample


def backend_of(tokenizer: Tokenizer) -> str:
    """Which backend encodes with ``tokenizer`` (``fastokens 0.3.5``, ``tokenizers 0.22.2``, ``byte``)."""
    if getattr(tokenizer, "encoder", None) is not None:  # loads it: the backend is known once loaded
        return tokenizer.backend
    return getattr(tokenizer, "backend", "") or type(tokenizer).__name__


def _finish(
    temporary: Path, folder: Path, key: dict, dtype: np.dtype, lengths: np.ndarray, inputs: list, stamps: dict,
    characters: int, backend: str,
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
        "backend": backend,  # which tokenizer backend made it (the ids are the same whichever did)
    }
    (temporary / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
    os.replace(temporary, folder)


# ----------------------------------------------------------------------------- a domain from its files' parts


Cut = tuple[int, "tuple[int, int] | None"]  # a part: (the number of its file in ``files``, the piece of it or None)


def file_parts(documents: DocumentSource, size: int = PART_BYTES) -> list[DocumentSource]:
    """The one-file sources whose token caches (*parts*) concatenate, in order, to ``documents``' own (see
    ``part_cuts``); empty where that makes one part (the whole domain). ``onlinemix prepare`` tokenizes the parts on
    many workers (and keeps each finished one, so a killed run resumes by part), then assembles the domain's
    cache."""
    return [part_of(documents, cut) for cut in part_cuts(documents, size)]


def part_cuts(documents: DocumentSource, size: int = PART_BYTES) -> list[Cut]:
    """Where ``documents`` is cut into parts: one per input file of a source whose documents are its files'
    documents in order (JSONL, text, Parquet: ``per_file``), and one per piece of about ``size`` bytes of a file
    that can be cut (``pieces``: JSONL at line starts, Parquet between row groups); empty where that makes one
    part. A part is never cut again (its own build would wait on itself). Finding the pieces reads a little of
    every large file: ``onlinemix prepare`` does it once and hands each task its cut."""
    if not documents.per_file or documents.span is not None:
        return []
    cuts: list[Cut] = []
    for number, file in enumerate(getattr(documents, "files", [])):
        pieces = documents.pieces(file, size)
        cuts.extend((number, span) for span in (pieces if len(pieces) > 1 else [None]))
    return cuts if len(cuts) > 1 else []


def part_of(documents: DocumentSource, cut: Cut) -> DocumentSource:
    """The part of ``documents`` at ``cut`` (from ``part_cuts``): a copy reading one file, or one piece of it."""
    number, span = cut
    file = documents.files[number]
    part = copy.copy(documents)
    part.files, part.span = [file], None if span is None else tuple(span)
    part.path = str(file) if span is None else f"{file} [{span[0]:,}:{span[1]:,}]"
    return part


@contextmanager
def parts_of(size: int) -> Iterator[None]:
    """Within it, a build looks for the parts ``onlinemix prepare`` made of ``size`` bytes (``file_parts``)."""
    token = _part_size.set(size)
    try:
        yield
    finally:
        _part_size.reset(token)


def cache_key(documents: DocumentSource, tokenizer: Tokenizer) -> dict:
    """What a token cache entry is keyed by: the documents' content and options (and the piece, for a part of a
    file), and the tokenizer."""
    source = documents.fingerprint()
    if documents.span is not None:
        source = {"whole": source, "span": list(documents.span)}
    return {"version": CACHE_VERSION, "source": source, "tokenizer": tokenizer.fingerprint()}


def _build_or_assemble(
    documents: DocumentSource, tokenizer: Tokenizer, folder: Path, key: dict, root: StoragePath
) -> None:
    """Build ``folder``: from its parts when every one is in ``root`` (``onlinemix prepare`` made them), else by
    tokenizing the documents. Either way the files are the same, byte for byte."""
    parts = [
        cache_entry(root, part.kind, cache_key(part, tokenizer)) for part in file_parts(documents, _part_size.get())
    ]
    holds = [_hold(staging_folder(part, cache_root())) for part in parts]  # no remover takes a part meanwhile
    if not parts or not all((part / "meta.json").exists() for part in parts):
        for hold in holds:
            if hold is not None:
                hold.release()
        _build(documents, tokenizer, folder, key)
        return
    opened = [TokenCache(part, hold=hold) for part, hold in zip(parts, holds)]
    log.info("assembling the token cache of %s from %d parts into %s", documents.path, len(parts), folder)
    with _building(folder) as temporary:
        with open(temporary / "tokens.bin", "wb") as out:
            for part in opened:
                with open_input(part.tokens_path) as tokens:
                    shutil.copyfileobj(tokens, out, 16 << 20)
            out.flush()
            os.fsync(out.fileno())
        lengths = np.concatenate([np.diff(part.starts) for part in opened])
        inputs = [entry for part in opened for entry in part.meta.get("inputs", [])]  # the pieces' first parts
        stamps = {path: stamp for part in opened for path, stamp in part.meta.get("stamps", {}).items()}
        characters = sum(int(part.meta.get("characters", 0)) for part in opened)
        backends = sorted({part.meta.get("backend", "") for part in opened} - {""})
        _finish(temporary, folder, key, opened[0].dtype, lengths, inputs, stamps, characters, ", ".join(backends))
    for part in parts:  # the domain's cache holds them now (a part is only ever read by this assembly)
        remove_tree(part)
