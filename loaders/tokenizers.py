"""Tokenizers: text -> token ids, each document followed by the end-of-text token.

A mixture's ``tokenizer:`` (top level, or per domain) is one of:

- ``byte`` (the default): ``ByteTokenizer``, UTF-8 bytes as ids 0-255, end-of-text 256, padding 257
  (vocabulary 258). Needs no file, so text domains and token-bin files written with it
  (``onlinemix convert``) mix out of the box;
- the path of a Hugging Face ``tokenizers`` file (``tokenizer.json``, never downloaded), or
  ``{path: tokenizer.json, eot: "<|endoftext|>"}`` to name the end-of-text token (by default the
  first of ``EOT_NAMES`` the vocabulary has).

Every tokenizer has a ``fingerprint``: a token cache, a checkpoint and a schedule log record it, so
that data tokenized one way is never read as another.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from onlinemix.loaders.extras import require

EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")


class Tokenizer(Protocol):
    """What the loader needs of a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int  # ends every document
    pad_id: int  # fills a short per-document sample (its labels are IGNORE_INDEX)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids (int64), followed by ``eot_id``."""

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens dropped)."""

    def fingerprint(self) -> str:
        """A short hash that changes whenever the ids of some text would."""


class ByteTokenizer:
    """UTF-8 bytes as token ids 0-255; 256 ends each document, 257 pads (vocabulary 258)."""

    name = "byte"
    EOT = 256
    PAD = 257
    vocab_size = 258
    eot_id, pad_id = EOT, PAD

    def encode(self, text: str) -> np.ndarray:
        """All token ids of ``text`` followed by ``EOT`` (no truncation)."""
        return np.append(np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64), self.EOT)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids (int64), each followed by ``eot_id``."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids`` (the end-of-text and padding ids dropped)."""
        data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
        return data.decode("utf-8", errors="replace")

    def fingerprint(self) -> str:
        """What identifies this tokenizer in caches and checkpoints."""
        return "byte-1"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ByteTokenizer)

    def __hash__(self) -> int:
        return hash(ByteTokenizer)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


class HFTokenizer:
    """A Hugging Face ``tokenizers`` file (``tokenizer.json``), with the end-of-text token it names.

    Loaded lazily in each process (it pickles as its path), so it travels to DataLoader workers cheaply.
    """

    def __init__(self, path: str | Path, eot: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"tokenizer file not found: {self.path}")
        self.name = str(self.path)
        self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self._tokenizer = None
        vocabulary = self.tokenizer.get_vocab(with_added_tokens=True)
        if eot is None:
            eot = next((name for name in EOT_NAMES if name in vocabulary), None)
            if eot is None:
                raise ValueError(
                    f"{self.path}: none of {', '.join(EOT_NAMES)} is in its vocabulary; name the end-of-text token "
                    "(tokenizer: {path: ..., eot: TOKEN})"
                )
        elif eot not in vocabulary:
            raise ValueError(f"{self.path}: the end-of-text token {eot!r} is not in its vocabulary")
        self.eot = eot
        self.eot_id = self.pad_id = int(vocabulary[eot])
        self.vocab_size = int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    @property
    def tokenizer(self) -> Any:
        """The ``tokenizers.Tokenizer``, loaded in this process on first use."""
        if self._tokenizer is None:
            hf = require("tokenizers", f"the tokenizer file {self.path}")
            try:
                self._tokenizer = hf.Tokenizer.from_file(str(self.path))
            except Exception as error:
                raise ValueError(f"{self.path}: not a Hugging Face tokenizer file ({error})") from None
        return self._tokenizer

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids (int64), each followed by ``eot_id``."""
        encodings = self.tokenizer.encode_batch(list(texts), add_special_tokens=False)
        return [np.append(np.asarray(e.ids, dtype=np.int64), self.eot_id) for e in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        return self.tokenizer.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        """What identifies this tokenizer (a hash of its file, and its end-of-text id)."""
        return f"hf-{self._digest}-{self.eot_id}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None}

    def __repr__(self) -> str:
        return f"HFTokenizer({self.name!r}, eot={self.eot!r})"


def load_tokenizer(spec: Any, base_dir: Path = Path(".")) -> Tokenizer:
    """The tokenizer a config's ``tokenizer:`` value names (see the module docstring); ``None`` is ``byte``."""
    if spec is None or spec == "byte":
        return ByteTokenizer()
    if isinstance(spec, (str, Path)):
        return HFTokenizer(base_dir / Path(str(spec)).expanduser())
    if isinstance(spec, dict) and set(spec) <= {"path", "eot"} and "path" in spec:
        return HFTokenizer(base_dir / Path(str(spec["path"])).expanduser(), spec.get("eot"))
    raise ValueError(f"tokenizer must be 'byte', a tokenizer.json path, or {{path: ..., eot: ...}}; got {spec!r}")


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary (what token files are stored as)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
