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

**Backends.** A ``tokenizer.json`` is encoded with ``fastokens`` where it is installed (``pip install
'onlinemix[fast]'``; 60-190x faster than ``tokenizers`` on one core in ``benchmarks/prepare_throughput.py``) and
can load the file, else with Hugging Face ``tokenizers`` (one log line says why). The ids are the same, so the
fingerprint, the token caches and every checkpoint are the same whichever made them; each token cache checks it
on a sample of its own documents when it is built (``check_backend``), and records which backend made it
(``onlinemix cache list``).
``$ONLINEMIX_TOKENIZER_BACKEND=tokenizers`` forces ``tokenizers``.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from onlinemix.loaders.extras import require

EOT_NAMES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eot_id|>", "[SEP]")
BACKEND_ENV = "ONLINEMIX_TOKENIZER_BACKEND"  # auto (default: fastokens where it loads), tokenizers, fastokens
BACKENDS = ("auto", "tokenizers", "fastokens")
log = logging.getLogger("onlinemix")


def with_ends(
    ids: np.ndarray, ends: np.ndarray, eot_id: int, dtype: np.dtype | type = np.uint32
) -> tuple[np.ndarray, np.ndarray]:
    """Texts' ids laid end to end (``ends[i]``: where text ``i``'s end), each followed by ``eot_id``: the flat ids
    (as ``dtype``, the cache's) and each text's length with its end-of-text token. One copy of each text's ids (a
    slice, no per-token Python)."""
    ends = np.asarray(ends, dtype=np.int64)
    starts = np.concatenate([[0], ends[:-1]])
    out = np.empty(len(ids) + len(ends), dtype=dtype)
    for shift, (start, end) in enumerate(zip(starts.tolist(), ends.tolist())):
        out[start + shift : end + shift] = ids[start:end]
    out[ends + np.arange(len(ends))] = eot_id
    return out, ends - starts + 1


def split_flat(flat: np.ndarray, lengths: np.ndarray) -> list[np.ndarray]:
    """``encode_flat``'s result as one int64 array per text."""
    return np.split(flat.astype(np.int64), np.cumsum(lengths)[:-1]) if len(lengths) else []


class Tokenizer(Protocol):
    """What the loader needs of a tokenizer."""

    name: str
    vocab_size: int
    eot_id: int  # ends every document
    pad_id: int  # fills a short per-document sample (its labels are IGNORE_INDEX)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids (int64), followed by ``eot_id``."""

    def encode_flat(self, texts: Sequence[str], dtype: np.dtype | type = np.uint32) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids followed by ``eot_id``, end to end in one array (``dtype``: ``uint32``, or the token
        cache's); and each text's length."""

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

    backend = "byte"

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids (int64), each followed by ``eot_id``."""
        return [self.encode(text) for text in texts]

    def encode_flat(self, texts: Sequence[str], dtype: np.dtype | type = np.uint32) -> tuple[np.ndarray, np.ndarray]:
        """Every text's bytes followed by ``EOT``, end to end (as ``dtype``); and each text's length."""
        encoded = [text.encode("utf-8") for text in texts]
        ends = np.cumsum([len(data) for data in encoded], dtype=np.int64)
        return with_ends(np.frombuffer(b"".join(encoded), dtype=np.uint8), ends, self.EOT, dtype)

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

    Loaded lazily in each process (it pickles as its path), so it travels to DataLoader workers cheaply. Encoded
    with the fastest backend that loads it (see the module docstring); decoded, and checked, with ``tokenizers``.
    """

    def __init__(self, path: str | Path, eot: str | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"tokenizer file not found: {self.path}")
        self.name = str(self.path)
        self._digest = hashlib.sha256(self.path.read_bytes()).hexdigest()[:16]
        self._tokenizer = None
        self._encoder: Any = None  # the backend's tokenizer, loaded in this process on first use
        self.backend = ""  # which backend encodes ("fastokens 0.3.5"), known once it is loaded
        self._refused = False  # whether the backend refused a batch (said once)
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

    @property
    def encoder(self) -> Any:
        """The backend that encodes: ``fastokens`` where it is installed and loads the file, else ``tokenizers``
        (``$ONLINEMIX_TOKENIZER_BACKEND`` chooses)."""
        if self._encoder is None:
            self._encoder, self.backend = self._load_backend()
        return self._encoder

    def _load_backend(self) -> tuple[Any, str]:
        choice = os.environ.get(BACKEND_ENV, "auto") or "auto"
        if choice not in BACKENDS:
            raise ValueError(f"${BACKEND_ENV} must be one of {', '.join(BACKENDS)}, got {choice!r}")
        reference = self.tokenizer, f"tokenizers {require('tokenizers', 'a tokenizer file').__version__}"
        if choice == "tokenizers":
            return reference
        try:
            import fastokens
        except ImportError:
            if choice == "fastokens":
                require("fastokens", f"${BACKEND_ENV}=fastokens")  # the extra that installs it, in the message
            return reference
        try:
            encoder = fastokens.Tokenizer.from_file(str(self.path))
        except Exception as error:  # a model or normaliser it does not implement
            if choice == "fastokens":
                raise ValueError(f"{self.path}: fastokens cannot load it ({error})") from None
            log.warning("%s: fastokens cannot load it (%s): encoding with tokenizers", self.path, error)
            return reference
        return encoder, f"fastokens {_version('fastokens')}"

    def encode_flat(self, texts: Sequence[str], dtype: np.dtype | type = np.uint32) -> tuple[np.ndarray, np.ndarray]:
        """Every text's ids followed by ``eot_id``, end to end in one array (``dtype``: ``uint32``, or the token
        cache's); and each text's length."""
        encoder, texts = self.encoder, list(texts)
        if hasattr(encoder, "encode_batch_flat"):  # fastokens: one buffer of ids, no per-token Python objects
            try:
                ids, offsets = encoder.encode_batch_flat(texts, add_special_tokens=False)
            except Exception as error:  # e.g. a byte its vocabulary lacks, which tokenizers drops: tokenizers' ids
                if not self._refused:
                    self._refused = True
                    log.warning("%s: %s refused a batch (%s): such batches are encoded with tokenizers",
                                self.path, self.backend, error)  # fmt: skip
                return self._reference_flat(texts, dtype)
            ends = np.frombuffer(offsets, dtype=np.uint64)[1:]
            return with_ends(np.frombuffer(ids, dtype=np.uint32), ends.astype(np.int64), self.eot_id, dtype)
        return self._reference_flat(texts, dtype)

    def _reference_flat(self, texts: list[str], dtype: np.dtype | type = np.uint32) -> tuple[np.ndarray, np.ndarray]:
        """``encode_flat`` with ``tokenizers`` itself."""
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=False)
        ends = np.cumsum([len(e.ids) for e in encodings], dtype=np.int64)
        ids = np.fromiter((i for e in encodings for i in e.ids), dtype=np.uint32, count=int(ends[-1]) if texts else 0)
        return with_ends(ids, ends, self.eot_id, dtype)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """Each text's ids (int64), each followed by ``eot_id``."""
        return split_flat(*self.encode_flat(texts))

    def check_backend(self, texts: Sequence[str], where: str) -> None:
        """Where another backend than ``tokenizers`` encodes: its ids of ``texts`` must be ``tokenizers``' own. A
        difference is a ``ValueError`` naming the text (by its position in ``where``) and the first differing
        token, and the setting that forces ``tokenizers``."""
        texts = list(texts)
        if not texts or self.encoder is self.tokenizer:
            return
        ours, theirs = (split_flat(*flat) for flat in (self.encode_flat(texts), self._reference_flat(texts)))
        for number, (mine, reference) in enumerate(zip(ours, theirs)):
            if np.array_equal(mine, reference):
                continue
            common = min(len(mine), len(reference))
            position = next((i for i in range(common) if mine[i] != reference[i]), common)
            got = mine[position] if position < len(mine) else "the end"
            expected = reference[position] if position < len(reference) else "the end"
            raise ValueError(
                f"{where}: document {number}: {self.backend} and tokenizers give different ids from token {position} "
                f"({got} where tokenizers gives {expected}); set {BACKEND_ENV}=tokenizers to encode with tokenizers"
            )

    def decode(self, ids: Sequence[int]) -> str:
        """The text of ``ids``."""
        return self.tokenizer.decode([int(i) for i in ids])

    def fingerprint(self) -> str:
        """What identifies this tokenizer (a hash of its file, and its end-of-text id)."""
        return f"hf-{self._digest}-{self.eot_id}"

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_tokenizer": None, "_encoder": None, "backend": "", "_refused": False}

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


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype that holds every id of a vocabulary (what token files are stored as)."""
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)
