"""A document source tokenized once into the token cache (``cache/tokens.py``), read as windows or per document.

**Packed** (``samples: packed``, the default): the documents are concatenated, each followed by the
tokenizer's end-of-text token (documents that are token ids already are taken as they are), and
sample ``i`` is the window of ``seq_len + 1`` tokens starting at token ``i * stride``: exactly what a
token-bin file of the same tokens gives (what nanoGPT, Megatron and torchtitan train on). No token is
dropped but the fewer than ``stride`` after the last whole window. Reads are token-bin reads of the cached
stream: one gather from a memory map per batch (or batched range requests, for a cache in a bucket).

**Per document** (``samples: documents``): sample ``i`` is document ``i``, cut or padded to
``seq_len + 1`` tokens; the tokens cut off are counted (``dropped_tokens``, shown by ``onlinemix inspect``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from onlinemix.loaders.cache.folder import token_cache_root
from onlinemix.loaders.cache.tokens import TokenCache
from onlinemix.loaders.sources.base import DocumentSource, Source, SourceError
from onlinemix.loaders.sources.tokenbin import TokenBinSource
from onlinemix.loaders.storage import TokenArray
from onlinemix.loaders.tokenizers import Tokenizer
from onlinemix.loaders.transforms import IGNORE_INDEX

SAMPLES = ("packed", "documents")


class TokenizedSource(Source):
    """``documents`` tokenized once (see the module docstring), as packed windows or one sample per document.

    Args:
        documents: the document source (JSONL, text, Parquet, Hugging Face, MDS, WebDataset).
        tokenizer: what turns its text into ids (``ByteTokenizer()`` or ``HFTokenizer(path)``).
        seq_len: tokens per sample (a sample holds ``seq_len + 1``: the last is the last label).
        samples: ``"packed"`` or ``"documents"``.
        stride: packed only: tokens between window starts (default ``seq_len``).
        cache_dir: where the token cache goes (default: ``cache.folder.token_cache_root``).
        verify: what opening the cache checks: ``"lengths"`` (its files' lengths, always), ``"sampled"`` (and
            the checksums of three 16 MiB chunks of each file) or ``"full"`` (every chunk: a full read, and every
            local input file's full digest against the one recorded when the cache was built).
        build: build the cache if there is none (``False``: ``NothingToVerify``, for ``onlinemix verify``).
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
        build: bool = True,
    ):
        if samples not in SAMPLES:
            raise ValueError(f"samples must be one of {SAMPLES}, got {samples!r}")
        if samples == "documents" and stride is not None:
            raise ValueError("stride is for packed samples (samples: packed)")
        super().__init__(documents.path)
        self.documents, self.tokenizer, self.seq_len, self.samples = documents, tokenizer, seq_len, samples
        self.cache = TokenCache.open(documents, tokenizer, token_cache_root(cache_dir), verify, build)
        if verify == "full":
            self._check_inputs()
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

    def summary(self) -> str:
        meta = self.cache.meta
        if self.samples == "packed":
            what = f"{meta['documents']:,} documents, {meta['tokens']:,} tokens packed into {len(self):,} windows"
        else:
            what = (
                f"one sample per document: {meta['documents']:,} documents, {self.dropped_tokens:,} of "
                f"{meta['tokens']:,} tokens cut off (documents over seq_len + 1), {self.padded_samples:,} padded"
            )
        return f"{what} ({self.tokenizer.name})"

    def verify(self, how: str = "full", cache_dir: str | Path | None = None) -> str:
        """The cache's files against their CRC-32s and, with ``how="full"``, every local input file against the
        full digest recorded when the cache was built (a same-size edit the sampled key did not see)."""
        self.cache.verify(how)
        if how == "full":
            self._check_inputs()
        return f"token cache {self.cache.folder.name}: {len(self.cache.meta.get('inputs', []))} inputs"

    def _check_inputs(self) -> None:
        stale = self.cache.stale_inputs()
        if stale:
            raise SourceError(
                f"{stale[0]} is not the file its token cache {self.cache.folder} was built from (edited in place "
                "at the same size, or gone): delete that folder to tokenize it again"
            )

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

    @property
    def _tokens(self) -> TokenArray:
        tokens = getattr(self, "_open_tokens", None)
        if tokens is None:
            tokens = self._open_tokens = TokenArray(self.cache.tokens_path, self.cache.dtype)
        return tokens

    def _token_ranges(self, starts: np.ndarray, stops: np.ndarray) -> list[np.ndarray]:
        """Tokens ``[start, stop)`` of the cache for each pair (``storage.TokenArray``)."""
        return self._tokens.ranges(starts, stops)

    def _windows(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Documents ``indices`` cut or padded to ``seq_len + 1`` tokens, and how many of those are theirs."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._length):
            raise SourceError(f"{self.path}: document index out of range [0, {self._length})")
        width = self.seq_len + 1
        starts = np.asarray(self.cache.starts[indices])
        lengths = np.minimum(np.asarray(self.cache.starts[indices + 1]) - starts, width)
        window = np.full((len(indices), width), self.tokenizer.pad_id, dtype=np.int64)
        for row, tokens in enumerate(self._token_ranges(starts, starts + lengths)):
            window[row, : len(tokens)] = tokens
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
