"""Turning raw records into model inputs.

A *transform* is any picklable callable ``record -> {field: array}``. Every
domain of a mixture must produce the same fields with the same shapes, so
that one batch can hold samples of all of them. The built-ins make the
standard causal-LM pair of next-token arrays of length ``seq_len``:

- ``input_ids``: the tokens the model reads;
- ``labels``: the token that follows each of them, ``IGNORE_INDEX`` (-100,
  the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``)
  where there is nothing to predict (padding).

A transform given in a config as ``"package.module:function"`` is imported
in each worker on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
Transform = Callable[[Any], Mapping[str, Any]]


class TokenWindow:
    """A window of ``seq_len + 1`` token ids -> ``input_ids`` and shifted ``labels``."""

    def __call__(self, window: np.ndarray) -> dict[str, np.ndarray]:
        window = np.asarray(window, dtype=np.int64)
        return {"input_ids": window[:-1], "labels": window[1:]}

    def __repr__(self) -> str:
        return "TokenWindow()"


class ByteTokenizer:
    """UTF-8 bytes as token ids, with an end-of-text token and fixed-length padding.

    Ids 0-255 are bytes, ``EOT = 256`` ends each document, ``PAD = 257`` fills
    the rest of the window (its labels are ``IGNORE_INDEX``); ``vocab_size`` is
    258. A document longer than ``seq_len + 1`` tokens is truncated. Byte ids
    need no vocabulary file, so text domains mix with token-bin domains that
    were written with the same tokenizer (see ``examples/prepare_data.py``).

    ``field`` names the text in a dict record (JSONL); ``None`` takes the
    record itself as the text. A 1-d integer array instead of text is taken
    as token ids already (shards written by ``onlinemix convert``) and only
    cut or padded to the window.
    """

    EOT = 256
    PAD = 257
    vocab_size = 258

    def __init__(self, seq_len: int, field: str | None = None):
        if seq_len < 1:
            raise ValueError(f"seq_len must be >= 1, got {seq_len}")
        self.seq_len = seq_len
        self.field = field

    def encode(self, text: str) -> np.ndarray:
        """All token ids of ``text`` followed by ``EOT`` (no truncation)."""
        ids = np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        return np.append(ids, self.EOT)

    def decode(self, ids: Sequence[int]) -> str:
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def __call__(self, record: Any) -> dict[str, np.ndarray]:
        document = record if self.field is None else record[self.field]
        if isinstance(document, str):
            ids = self.encode(document)
        elif isinstance(document, np.ndarray) and document.dtype.kind in "iu" and document.ndim == 1:
            ids = document.astype(np.int64)  # already token ids (from a shard written by `onlinemix convert`)
        else:
            raise TypeError(
                f"expected text or a 1-d array of token ids in field {self.field!r}, got {type(document).__name__}"
            )
        return self.window(ids)

    def window(self, ids: np.ndarray) -> dict[str, np.ndarray]:
        """The first ``seq_len + 1`` of ``ids`` as an input/label pair, padded with ``PAD`` (label: -100)."""
        ids = ids[: self.seq_len + 1]
        window = np.full(self.seq_len + 1, self.PAD, dtype=np.int64)
        window[: len(ids)] = ids
        labels = window[1:].copy()
        labels[max(len(ids) - 1, 0) :] = IGNORE_INDEX
        return {"input_ids": window[:-1], "labels": labels}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer) and (self.seq_len, self.field) == (other.seq_len, other.field)

    def __repr__(self) -> str:
        return f"ByteTokenizer(seq_len={self.seq_len}, field={self.field!r})"


class ImportedTransform:
    """A transform named ``"package.module:attribute"``, imported lazily (so it pickles as a name)."""

    def __init__(self, spec: str):
        module, sep, attribute = spec.partition(":")
        if not sep or not module or not attribute:
            raise ValueError(f"transform must look like 'package.module:function', got {spec!r}")
        self.spec = spec
        self._function: Transform | None = None

    def resolve(self) -> Transform:
        if self._function is None:
            module, _, attribute = self.spec.partition(":")
            try:
                target: Any = importlib.import_module(module)
                for part in attribute.split("."):
                    target = getattr(target, part)
            except (ImportError, AttributeError) as error:
                raise ValueError(f"cannot import transform {self.spec!r}: {error}") from error
            if not callable(target):
                raise ValueError(f"transform {self.spec!r} is not callable")
            self._function = target
        return self._function

    def __call__(self, record: Any) -> Mapping[str, Any]:
        return self.resolve()(record)

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "_function": None}

    def __repr__(self) -> str:
        return f"ImportedTransform({self.spec!r})"


def collate(samples: Sequence[Mapping[str, Any]], where: str) -> dict[str, np.ndarray]:
    """Stack per-sample field dicts into arrays; ``where`` names the domain in errors."""
    if not samples:
        raise ValueError(f"{where}: nothing to collate")
    fields = sorted(samples[0])
    out: dict[str, np.ndarray] = {}
    for name in fields:
        try:
            out[name] = np.stack([np.asarray(sample[name]) for sample in samples])
        except KeyError as error:
            raise ValueError(f"{where}: a sample lacks field {error.args[0]!r} (fields: {fields})") from None
        except ValueError as error:
            raise ValueError(f"{where}: field {name!r} has samples of different shapes ({error})") from None
    for sample in samples:
        if sorted(sample) != fields:
            raise ValueError(f"{where}: samples have different fields: {fields} vs {sorted(sample)}")
    return out
