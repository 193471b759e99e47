"""Megatron indexed datasets (Megatron-LM, NeMo, GPT-NeoX, Pythia): a ``.bin`` of token ids and an ``.idx``, read
as they are.

The ``.idx`` (``MMIDIDX``, version 1) gives the token dtype, every sequence's length and byte offset in the
``.bin``, and the document boundaries (which sequences make each document). A domain's ``path`` is a prefix
without an extension (``data/web_text_document`` for ``web_text_document.bin`` and ``.idx``), a list of
prefixes, a folder or a glob of ``.idx`` files: several pairs are one domain, their documents one after the
other in the order given (a folder or a glob: sorted).

**Samples.** As every packed source: sample ``i`` is the window of ``seq_len + 1`` tokens starting at token
``i * stride`` of the documents concatenated in order, across documents and across files. The tokens are the
``.bin``'s as they are, in place (a memory map, or range requests to a bucket): nothing is copied into a cache.
A document's end is marked as its writer marked it, as for every source of token ids (Megatron's
``--append-eod`` puts the end-of-text id after each document; data written without it runs documents
together, which ``onlinemix inspect`` shows: it counts the documents). The tokens after the last whole window
are the only ones never trained on.

**What is checked.** At open: the ``.idx``'s header, version and dtype, its length against its counts (a
truncated or corrupt index is one line naming the file), the sequences laid end to end in the ``.bin`` and
the ``.bin``'s length against them. The content identity and ``verify`` are a token-bin file's: a digest of each
``.bin`` and ``.idx``, and the CRC-32s of every 16 MiB recorded at the first scan.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from onlinemix.loaders.checksums import file_stamp
from onlinemix.loaders.paths import InputError, expand_paths
from onlinemix.loaders.sources.base import Source, SourceError
from onlinemix.loaders.sources.gather import gather_windows
from onlinemix.loaders.sources.tokenbin import TokenBinSource
from onlinemix.loaders.storage import StoragePath, TokenArray, as_path, read_ranges
from onlinemix.loaders.transforms import TokenWindow

HEADER, VERSION = b"MMIDIDX\x00\x00", 1
# Megatron's DType codes (megatron/core/datasets/indexed_dataset.py): the ones that hold token ids
DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
PREAMBLE = len(HEADER) + 8 + 1 + 8 + 8  # header, version, dtype code, sequence count, document count


class MegatronIndex:
    """One ``.idx`` file: ``dtype``, ``lengths`` (tokens per sequence), ``pointers`` (byte offsets in the ``.bin``),
    ``documents`` (the sequence index where each document starts, and the count at the end)."""

    def __init__(self, path: StoragePath):
        self.path = path
        size = path.stat().st_size
        (preamble,) = read_ranges(path, [(0, min(PREAMBLE, size))])
        if len(preamble) < PREAMBLE or not preamble.startswith(HEADER):
            self._damaged("it is not a Megatron index (no MMIDIDX header)")
        version, code, sequences, documents = struct.unpack("<QBQQ", preamble[len(HEADER) :])
        if version != VERSION:
            self._damaged(f"version {version}, this reader knows version {VERSION}")
        if code not in DTYPES:
            self._damaged(f"dtype code {code} is no token dtype (known: {sorted(DTYPES)})")
        expected = PREAMBLE + sequences * (4 + 8) + documents * 8
        if size not in (expected, expected + sequences):  # the last: a multimodal index's sequence modes
            self._damaged(f"{size:,} bytes, where its counts ({sequences:,} sequences, {documents:,} document "
                          f"boundaries) need {expected:,} (truncated or corrupt)")  # fmt: skip
        (body,) = read_ranges(path, [(PREAMBLE, expected)])
        self.dtype = np.dtype(DTYPES[code])
        self.lengths = np.frombuffer(body, np.int32, sequences, 0).astype(np.int64)
        self.pointers = np.frombuffer(body, np.int64, sequences, 4 * sequences)
        self.documents = np.frombuffer(body, np.int64, documents, 12 * sequences)
        if (self.lengths < 0).any():
            self._damaged("a sequence of negative length")
        if len(self.documents) == 0 or self.documents[0] != 0 or self.documents[-1] != sequences:
            self._damaged("its document boundaries do not run from the first sequence to the last")
        if (np.diff(self.documents) < 0).any():
            self._damaged("its document boundaries go backwards")
        ends = np.cumsum(self.lengths) * self.dtype.itemsize
        if sequences and (self.pointers[0] != 0 or (self.pointers[1:] != ends[:-1]).any()):
            self._damaged("its sequences are not laid end to end in the .bin (gaps, or another order)")
        self.tokens = int(self.lengths.sum())

    def _damaged(self, problem: str) -> None:
        raise SourceError(f"{self.path}: {problem}")

    def document_lengths(self) -> np.ndarray:
        """Tokens per document."""
        starts = np.concatenate([[0], np.cumsum(self.lengths)])
        return np.diff(starts[self.documents])


def prefixes(spec: str | Path | Sequence[str | Path], base_dir: Path) -> list[StoragePath]:
    """The ``.bin``/``.idx`` prefixes a domain's ``path`` names: prefixes without an extension, or a folder or a
    glob of ``.idx`` files (sorted)."""
    items = [spec] if isinstance(spec, (str, Path)) or not isinstance(spec, Sequence) else list(spec)
    found: list[StoragePath] = []
    for item in items:
        text = str(item)
        if text.endswith((".bin", ".idx")):
            text = text[: -len(".idx")]
        candidate = as_path(text) if "://" in text else base_dir / as_path(text)
        index = candidate.parent / f"{candidate.name}.idx"
        if not any(char in text for char in "*?[") and index.is_file():
            found.append(candidate)
            continue
        try:
            indexes = expand_paths(item, base_dir, suffixes=(".idx",))
        except InputError:
            raise InputError(f"no Megatron index {index} (a path is a prefix without .bin or .idx)") from None
        found.extend(path.parent / path.name[: -len(".idx")] for path in indexes if path.name.endswith(".idx"))
    if not found:
        raise InputError(f"{spec}: no Megatron .idx file")
    return found


class MegatronSource(Source):
    """Windows of the documents of one or more Megatron ``.bin``/``.idx`` pairs (see the module docstring)."""

    kind = "megatron"
    options: ClassVar[dict[str, type]] = {}

    def __init__(self, path: Any, seq_len: int, stride: int | None = None):
        """``path``: prefixes (resolved against the mixture file's folder by the config), a folder or a glob."""
        super().__init__(str(path), TokenWindow())
        self.prefixes = prefixes(path, Path("."))
        self.indexes = [MegatronIndex(prefix.parent / f"{prefix.name}.idx") for prefix in self.prefixes]
        dtypes = {index.dtype for index in self.indexes}
        if len(dtypes) > 1:
            raise SourceError(f"{path}: the pairs hold different token dtypes ({sorted(d.name for d in dtypes)})")
        self.dtype = self.indexes[0].dtype
        # each .bin as a token-bin file: its size checked against the index, its scan, checksums and digest
        self.files: list[TokenBinSource] = []
        for prefix, index in zip(self.prefixes, self.indexes):
            data = TokenBinSource(prefix.parent / f"{prefix.name}.bin", max(1, index.tokens - 1), dtype=self.dtype.name)
            if data.num_tokens != index.tokens:
                raise SourceError(f"{data.path}: {data.num_tokens:,} tokens, its index says {index.tokens:,}")
            self.files.append(data)
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len, self.stride = seq_len, seq_len if stride is None else int(stride)
        if self.stride < 1:
            raise ValueError(f"{path}: stride must be >= 1, got {stride}")
        self.offsets = np.concatenate([[0], np.cumsum([index.tokens for index in self.indexes])])  # file starts
        self.num_tokens = int(self.offsets[-1])
        window = seq_len + 1
        self._length = 0 if self.num_tokens < window else (self.num_tokens - window) // self.stride + 1
        self.tokenizer = None  # set where the mixture knows it (check_vocabulary): text() decodes with it

    def __len__(self) -> int:
        return self._length

    @property
    def documents(self) -> int:
        """How many documents the pairs hold."""
        return sum(len(index.documents) - 1 for index in self.indexes)

    def summary(self) -> str:
        tokens = f"{self.num_tokens:,} {self.dtype.name} tokens"
        return f"{self.documents:,} documents, {tokens} in {len(self.files)} .bin file(s)"

    def fingerprint(self) -> Any:
        return {"bins": [data.fingerprint()["stamp"] for data in self.files],
                "idx": [file_stamp(index.path) for index in self.indexes], "dtype": self.dtype.name,
                "stride": self.stride}  # fmt: skip

    def describe(self, index: int) -> str:
        return f"window {index}"

    def record(self, index: int) -> np.ndarray:
        return self.windows(np.array([index]))[0]

    def text(self, index: int, field: str = "text") -> str:
        if self.tokenizer is None:
            return super().text(index, field)
        return self.tokenizer.decode(self.record(index))

    def windows(self, indices: np.ndarray) -> np.ndarray:
        """Windows at ``indices`` as one ``(n, seq_len + 1)`` int64 array (read across files where they cross)."""
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._length):
            raise SourceError(f"{self.path}: window index out of range [0, {self._length})")
        width = self.seq_len + 1
        out = np.empty((len(indices), width), dtype=np.int64)
        starts = indices * self.stride
        files = np.searchsorted(self.offsets, starts, side="right") - 1  # the file each window starts in
        crossing = starts + width > self.offsets[files + 1]
        for f in np.unique(files[~crossing]).tolist():  # windows inside one file: one batched read of it
            rows = np.flatnonzero((files == f) & ~crossing)
            local = starts[rows] - self.offsets[f]
            out[rows] = np.stack(self._arrays[f].ranges(local, local + width))
        for row in np.flatnonzero(crossing).tolist():  # a window across a file boundary: a piece of each file
            out[row] = self._span(int(starts[row]), width)
        return out

    def _span(self, start: int, width: int) -> np.ndarray:
        pieces, position, stop = [], start, start + width
        for f in range(len(self.files)):
            low, high = int(self.offsets[f]), int(self.offsets[f + 1])
            if position < high and stop > low and position < stop:
                end = min(stop, high)
                pieces.append(self._arrays[f].ranges([position - low], [end - low])[0])
                position = end
        return np.concatenate(pieces).astype(np.int64)

    @property
    def _arrays(self) -> list[TokenArray]:
        arrays = getattr(self, "_open_arrays", None)
        if arrays is None:
            arrays = self._open_arrays = [TokenArray(data.path, self.dtype) for data in self.files]
        return arrays

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        window = self.windows(indices)
        return {"input_ids": window[:, :-1], "labels": window[:, 1:]}

    def read_into(self, indices: np.ndarray, out: dict[str, np.ndarray], rows: np.ndarray | slice) -> None:
        if len(self.files) == 1 and self.files[0].prefetches is False:  # one local file: the compiled gather
            data = self.files[0]
            data._check_size()
            gather_windows(data.tokens, np.asarray(indices, dtype=np.int64) * self.stride, rows, out["input_ids"],
                           out["labels"])  # fmt: skip
            return
        window = self.windows(indices)
        out["input_ids"][rows], out["labels"][rows] = window[:, :-1], window[:, 1:]

    def max_token(self, cache_dir: str | Path | None = None) -> int:
        """The largest token id of every ``.bin`` (from each file's first scan)."""
        return max(data.max_token(cache_dir) for data in self.files)

    def verify(self, how: str = "full", cache_dir: str | Path | None = None) -> str:
        for data in self.files:
            data.verify(how, cache_dir)
        return f"megatron, {len(self.files)} .bin file(s), {self.num_tokens:,} tokens"
