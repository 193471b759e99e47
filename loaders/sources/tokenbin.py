"""Token-bin: a flat binary file of token ids (the nanoGPT / Megatron ``.bin`` convention).

The file is ``numpy.memmap``-ed and cut into windows of ``seq_len + 1``
tokens (the extra token is the last target). Window ``i`` starts at token
``i * stride``; the default stride ``seq_len`` makes consecutive windows
share exactly their boundary token, so an epoch sees every token once as a
target. A smaller stride gives overlapping windows (more samples, each seen
in several contexts).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from onlinemix.loaders.sources.base import Source, SourceError
from onlinemix.loaders.transforms import TokenWindow, Transform

DTYPES = ("uint16", "uint32", "int32", "int64")


class TokenBinSource(Source):
    kind = "tokenbin"
    options = frozenset({"dtype", "stride"})

    def __init__(
        self,
        path: str | Path,
        seq_len: int,
        dtype: str = "uint16",
        stride: int | None = None,
        transform: Transform | None = None,
    ):
        super().__init__(path, transform or TokenWindow())
        if dtype not in DTYPES:
            raise ValueError(f"{path}: dtype must be one of {DTYPES}, got {dtype!r}")
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.dtype = np.dtype(dtype)
        self.seq_len = seq_len
        self.stride = seq_len if stride is None else int(stride)
        if self.stride < 1:
            raise ValueError(f"{path}: stride must be >= 1, got {stride}")
        size = self.path.stat().st_size
        if size % self.dtype.itemsize:
            raise SourceError(f"{path}: {size} bytes is not a whole number of {dtype} tokens")
        self.num_tokens = size // self.dtype.itemsize
        window = seq_len + 1
        self._length = 0 if self.num_tokens < window else (self.num_tokens - window) // self.stride + 1

    def __len__(self) -> int:
        return self._length

    @property
    def tokens(self) -> np.ndarray:
        """The whole file as a read-only array (memory-mapped on first use)."""
        tokens = getattr(self, "_open_tokens", None)
        if tokens is None:
            tokens = self._open_tokens = np.asarray(np.memmap(self.path, dtype=self.dtype, mode="r"))
        return tokens

    def _strided(self, offset: int, width: int) -> np.ndarray:
        """Zero-copy ``(len, width)`` view whose row ``i`` starts at token ``i * stride + offset``."""
        item = self.dtype.itemsize
        return np.lib.stride_tricks.as_strided(
            self.tokens[offset:], shape=(self._length, width), strides=(self.stride * item, item), writeable=False
        )

    @property
    def _views(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Strided views of the windows, of their inputs and of their labels (made once per process)."""
        views = getattr(self, "_open_views", None)
        if views is None:
            width = self.seq_len
            views = self._open_views = (self._strided(0, width + 1), self._strided(0, width), self._strided(1, width))
        return views

    def _check(self, indices: np.ndarray) -> np.ndarray:
        indices = np.asarray(indices, dtype=np.int64)
        if indices.size and (indices.min() < 0 or indices.max() >= self._length):
            raise SourceError(f"{self.path}: window index out of range [0, {self._length})")
        return indices

    def windows(self, indices: np.ndarray) -> np.ndarray:
        """Windows at ``indices`` as one ``(n, seq_len + 1)`` int64 array (one gather, no Python loop)."""
        return self._views[0][self._check(indices)].astype(np.int64)

    def record(self, index: int) -> np.ndarray:
        return self.windows(np.array([index]))[0]

    def read_batch(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        if isinstance(self.transform, TokenWindow):
            window = self.windows(indices)
            return {"input_ids": window[:, :-1], "labels": window[:, 1:]}
        return super().read_batch(indices)

    def read_into(self, indices: np.ndarray, out: dict[str, np.ndarray], rows: np.ndarray | slice) -> None:
        if not isinstance(self.transform, TokenWindow):
            return super().read_into(indices, out, rows)
        # Gather straight from the memory map into the batch (the cast to int64 happens in the same pass).
        # No range check here: the plan only ever asks for indices below len(self).
        _, inputs, labels = self._views
        out["input_ids"][rows] = inputs[indices]
        out["labels"][rows] = labels[indices]
