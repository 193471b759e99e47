"""DSIR importance weights (Xie et al., 2023) over hashed n-gram features.

**Features.** A document is lower-cased and split into words and runs of
punctuation (``\\w+|[^\\w\\s]+``, NLTK's ``wordpunct`` rule); every unigram
and bigram is hashed into one of ``num_buckets`` buckets. Two hashes:

- ``"fast"`` (default): a whole batch of documents is tokenized and hashed in
  numpy with no Python loop per word: words are runs of word bytes (ASCII
  ``\\w`` and, unlike the regex, every non-ASCII byte, so Unicode punctuation
  such as "—" sticks to its word) or of other non-space bytes; a word's hash
  is a polynomial hash of its bytes mixed with ``seed`` by SplitMix64, and a
  bigram's is a mix of its two words' hashes. Stable across processes and
  platforms (never Python's salted ``hash()``); another ``seed`` gives an
  independent bucketing.
- ``"sha256"``: the ``data-selection`` package's own bucketing
  (``sha256(ngram) mod num_buckets``, bigrams as ``"w1 w2"``), for results
  comparable with it; several times slower.

**Estimator.** Bag-of-n-gram distributions over the buckets are fitted for the
target and for each raw domain with Laplace smoothing ``alpha`` (added to every
bucket's count). A document's log importance weight is
``Σ_b count_b · (log p_target(b) − log p_raw(b))``. Documents with fewer than
``min_words`` words are *short*: they get weight ``-inf`` (never selected) and
are counted, never dropped silently.

**File.** ``ImportanceEstimator.save`` writes one ``.npz``: ``meta`` (JSON:
format version, hasher settings, ``alpha``, ``min_words``, domain names,
documents fitted per distribution), ``target`` (bucket counts) and ``raw``
(one row of counts per domain).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from onlinemix.loaders.rng import key, mix64

FORMAT = "onlinemix-importance"
VERSION = 1
WORDS = re.compile(r"\w+|[^\w\s]+")  # NLTK's WordPunctTokenizer pattern
HASHES = ("fast", "sha256")
_BIGRAM = np.uint64(0x6A09E667F3BCC909)  # keeps bigram buckets independent of unigram ones
_LENGTH = _BIGRAM  # the same odd constant multiplies a word's length into its hash
_CACHE_LIMIT = 4_000_000  # distinct n-grams kept bucketed before the cache is cleared


class ImportanceError(ValueError):
    """Bad input to the estimator: an empty target, a document without words, a mismatched sidecar."""


class _Cache(dict):
    """n-gram -> bucket, computed on first use (``map(cache.__getitem__, ngrams)`` stays in C on hits)."""

    def __init__(self, compute):
        super().__init__()
        self.compute = compute

    def __missing__(self, word: str) -> int:
        if len(self) >= _CACHE_LIMIT:
            self.clear()
        value = self[word] = self.compute(word)
        return value


@dataclass
class NgramHasher:
    """Unigram (+ bigram with ``ngrams=2``) buckets of documents, vectorised over a batch."""

    num_buckets: int = 10_000
    ngrams: int = 2
    seed: int = 0
    hash: str = "fast"
    _key: np.uint64 = field(init=False, repr=False, compare=False)  # "fast": the seed's hash key
    _buckets: _Cache = field(init=False, repr=False, compare=False)  # "sha256": n-gram string -> bucket

    def __post_init__(self) -> None:
        if self.num_buckets < 1 or self.ngrams not in (1, 2) or self.hash not in HASHES:
            raise ValueError(
                f"need num_buckets >= 1, ngrams 1 or 2, hash in {HASHES}; "
                f"got {self.num_buckets}, {self.ngrams}, {self.hash!r}"
            )
        if self.hash == "fast":
            self._key = np.uint64(key(self.seed, 0x44534952))  # "DSIR"
        else:  # data-selection's buckets; words hold no space, so "w1 w2" bigram keys never meet a word's
            self._buckets = _Cache(lambda ngram: int(hashlib.sha256(ngram.encode()).hexdigest(), 16) % self.num_buckets)

    def settings(self) -> dict[str, Any]:
        """What identifies the hashing (saved with an estimator)."""
        return {"num_buckets": self.num_buckets, "ngrams": self.ngrams, "seed": self.seed, "hash": self.hash}

    @staticmethod
    def words(text: str) -> list[str]:
        """The lower-cased words and punctuation runs of ``text``."""
        return WORDS.findall(text.lower())

    def buckets(self, texts: Sequence[str]) -> Features:
        """The unigram and bigram buckets of ``texts``, in document order."""
        if self.hash == "sha256":
            tokenized = [self.words(text) for text in texts]
            words = np.fromiter(map(len, tokenized), dtype=np.int64, count=len(tokenized))
            flat = [w for doc in tokenized for w in doc]
            unigrams = np.fromiter(map(self._buckets.__getitem__, flat), dtype=np.int64, count=len(flat))
            pairs = [f"{a} {b}" for doc in tokenized for a, b in itertools.pairwise(doc)] if self.ngrams == 2 else []
            bigrams = np.fromiter(map(self._buckets.__getitem__, pairs), dtype=np.int64, count=len(pairs))
            return Features(unigrams, bigrams, words)
        hashes, words = _hash_words(texts, self._key)
        unigrams = (hashes % np.uint64(self.num_buckets)).astype(np.int64)
        if self.ngrams == 1:
            return Features(unigrams, np.zeros(0, dtype=np.int64), words)
        # Bigram j pairs word j with word j + 1, except across a document boundary.
        bigrams = mix64(mix64(hashes[:-1] ^ _BIGRAM) ^ hashes[1:]) % np.uint64(self.num_buckets)
        inside = np.ones(len(bigrams), dtype=bool)
        last = np.cumsum(words)[words > 0] - 1  # each document's last word starts no bigram
        inside[last[last < len(inside)]] = False
        return Features(unigrams, bigrams[inside].astype(np.int64), words)

    def counts(self, texts: Sequence[str]) -> np.ndarray:
        """Bucket counts summed over ``texts``."""
        features = self.buckets(texts)
        both = np.concatenate([features.unigrams, features.bigrams])
        return np.bincount(both, minlength=self.num_buckets).astype(np.float64)


@dataclass
class Features:
    """Hashed n-grams of a batch: document ``i``'s unigrams, then its bigrams, are consecutive runs."""

    unigrams: np.ndarray
    bigrams: np.ndarray
    words: np.ndarray  # words per document

    def sums(self, per_bucket: np.ndarray) -> np.ndarray:
        """``Σ per_bucket[b]`` over each document's n-grams."""
        total = _segment_sums(per_bucket[self.unigrams], self.words)
        if len(self.bigrams):
            total += _segment_sums(per_bucket[self.bigrams], np.maximum(self.words - 1, 0))
        return total


# Byte classes of the fast tokenizer: 0 space, 1 word (ASCII \w and every non-ASCII byte), 2 punctuation.
_CLASS = np.array(
    [0 if chr(b).isspace() else 1 if b >= 128 or chr(b).isalnum() or b == ord("_") else 2 for b in range(256)],
    dtype=np.int8,
)
_BASE = np.uint64(0x100000001B3)  # odd, so its powers are invertible mod 2**64
_BASE_INVERSE = np.uint64(pow(0x100000001B3, -1, 1 << 64))


def _hash_words(texts: Sequence[str], seed_key: np.uint64) -> tuple[np.ndarray, np.ndarray]:
    """64-bit hashes of every word of ``texts`` (in order) and the word count of each text, with no Python loop.

    The batch is lower-cased and UTF-8 encoded as one buffer; words are runs of
    bytes of one class; a word's hash is a polynomial hash of its bytes taken
    from prefix sums (``(P[end] - P[start]) · BASE^-start`` mod 2**64), mixed
    with the seed by SplitMix64.
    """
    encoded = [text.lower().encode("utf-8", "surrogatepass") for text in texts]
    data = np.frombuffer(b" ".join(encoded), dtype=np.uint8)
    classes = _CLASS[data]
    before = np.concatenate([[0], classes[:-1]])
    after = np.concatenate([classes[1:], [0]])
    starts = np.flatnonzero((classes != 0) & (before != classes))
    ends = np.flatnonzero((classes != 0) & (after != classes)) + 1
    with np.errstate(over="ignore"):
        powers = np.cumprod(np.full(len(data) + 1, _BASE, dtype=np.uint64))  # BASE^(i+1), wrapping
        inverses = np.cumprod(np.full(len(data) + 1, _BASE_INVERSE, dtype=np.uint64))
        prefix = np.zeros(len(data) + 1, dtype=np.uint64)
        np.cumsum((data.astype(np.uint64) + np.uint64(1)) * powers[:-1], out=prefix[1:])
        spans = (prefix[ends] - prefix[starts]) * inverses[starts]
        hashes = mix64(spans ^ (ends - starts).astype(np.uint64) * _LENGTH ^ seed_key)
    text_ends = np.cumsum([len(e) + 1 for e in encoded])  # a text's bytes end before its separator
    words = np.diff(np.searchsorted(starts, text_ends), prepend=0)
    return hashes, words.astype(np.int64)


def _segment_sums(values: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Sums of consecutive runs of ``values`` with the given lengths (empty runs sum to 0).

    Each run is summed on its own (``reduceat``), so a document's score does not
    depend on which other documents share its batch: a resumed scoring is bit for bit.
    """
    sums = np.zeros(len(lengths))
    nonempty = lengths > 0
    if nonempty.any():
        sums[nonempty] = np.add.reduceat(values, (np.cumsum(lengths) - lengths)[nonempty])
    return sums


def log_distribution(counts: np.ndarray, alpha: float) -> np.ndarray:
    """``log p`` of Laplace-smoothed bucket counts: ``(count + alpha) / (total + alpha * buckets)``."""
    return np.log(counts + alpha) - np.log(counts.sum() + alpha * len(counts))


def kl_divergence(log_p: np.ndarray, log_q: np.ndarray) -> float:
    """``KL(p || q)`` of two distributions given as logs."""
    return float(np.sum(np.exp(log_p) * (log_p - log_q)))


@dataclass
class ImportanceEstimator:
    """Target and raw-domain n-gram distributions; scores documents by their log importance weight."""

    hasher: NgramHasher
    target: np.ndarray  # (buckets,) counts
    raw: dict[str, np.ndarray]  # domain -> (buckets,) counts
    alpha: float = 1.0
    min_words: int = 1
    documents: dict[str, int] = field(default_factory=dict)  # documents fitted: "target" and each domain

    def __post_init__(self) -> None:
        if self.alpha <= 0:
            raise ValueError(f"alpha (Laplace smoothing) must be > 0, got {self.alpha}")
        if self.target.sum() == 0:
            raise ImportanceError("the target has no words: nothing to estimate a distribution from")
        self._log_target = log_distribution(self.target, self.alpha)
        self._log_ratio = {name: self._log_target - log_distribution(c, self.alpha) for name, c in self.raw.items()}

    @classmethod
    def fit(
        cls,
        target_texts: Iterable[str],
        raw_texts: dict[str, Iterable[str]],
        hasher: NgramHasher | None = None,
        alpha: float = 1.0,
        min_words: int = 1,
    ) -> ImportanceEstimator:
        """Count n-grams of the target documents and of each domain's (already sampled) documents."""
        hasher = hasher or NgramHasher()
        target_texts = list(target_texts)
        if not target_texts:
            raise ImportanceError("the target is empty: give at least one document")
        documents = {"target": len(target_texts)}
        raw = {}
        for name, texts in raw_texts.items():
            texts = list(texts)
            raw[name], documents[name] = hasher.counts(texts), len(texts)
        return cls(hasher, hasher.counts(target_texts), raw, alpha, min_words, documents)

    def _check_domain(self, domain: str) -> None:
        if domain not in self.raw:
            raise ImportanceError(f"no raw distribution for domain {domain!r} (fitted: {sorted(self.raw)})")

    def log_ratio(self, domain: str) -> np.ndarray:
        """``log p_target − log p_raw`` per bucket for ``domain``."""
        self._check_domain(domain)
        return self._log_ratio[domain]

    def score(self, texts: Sequence[str], domain: str) -> tuple[np.ndarray, np.ndarray]:
        """``(log_weights, words)`` of ``texts``; short documents (``< min_words`` words) get ``-inf``."""
        features = self.hasher.buckets(texts)
        scores, words = features.sums(self.log_ratio(domain)), features.words
        if self.min_words <= 0 and (words == 0).any():
            first = int(np.flatnonzero(words == 0)[0])
            raise ImportanceError(f"document {first} of this batch has no words (set min_words >= 1 to skip such)")
        scores[words < self.min_words] = -np.inf
        return scores, words

    def kl_reduction(self, selected_counts: np.ndarray, domain: str) -> float:
        """``KL(target || raw) − KL(target || selected)``: how much closer a selection is to the target."""
        log_selected = log_distribution(selected_counts, self.alpha)
        return self.divergence(domain) - kl_divergence(self._log_target, log_selected)

    def divergence(self, domain: str) -> float:
        """``KL(target || raw domain)`` over the hashed n-gram features: how far the domain is from the target."""
        self._check_domain(domain)
        return kl_divergence(self._log_target, log_distribution(self.raw[domain], self.alpha))

    def domain_prior(self, domains: Sequence[str], temperature: float = 1.0) -> np.ndarray:
        """Mixture weights from importance: ``w_d ∝ exp(−KL(target || raw_d) / temperature)``.

        The domains closest to the target in n-gram space get the most weight;
        a large temperature tends to uniform. A starting point for any
        controller (``importance.prior_temperature`` in the mixture file).
        """
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        logits = -np.array([self.divergence(name) for name in domains]) / temperature
        weights = np.exp(logits - logits.max())
        return weights / weights.sum()

    # -- file ----------------------------------------------------------------------------------

    def meta(self) -> dict[str, Any]:
        """The estimator's settings and provenance, as saved."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "hasher": self.hasher.settings(),
            "alpha": self.alpha,
            "min_words": self.min_words,
            "domains": list(self.raw),
            "documents": self.documents,
        }

    def fingerprint(self) -> str:
        """A short hash of the estimator (settings and counts): sidecars record which one scored them."""
        digest = hashlib.sha256(json.dumps(self.meta(), sort_keys=True).encode())
        digest.update(self.target.tobytes())
        for counts in self.raw.values():
            digest.update(counts.tobytes())
        return digest.hexdigest()[:16]

    def save(self, path: str | Path) -> None:
        """Write the estimator to one ``.npz`` file."""
        raw = np.stack(list(self.raw.values())) if self.raw else np.zeros((0, len(self.target)))
        with open(path, "wb") as file:  # np.savez would append ".npz" to a path without it
            np.savez_compressed(file, meta=np.array(json.dumps(self.meta())), target=self.target, raw=raw)

    @classmethod
    def load(cls, path: str | Path) -> ImportanceEstimator:
        """Read an estimator written by ``save`` (its format version checked)."""
        meta, (target, raw) = read_versioned(path, FORMAT, VERSION, ("target", "raw"), "an importance estimator")
        return cls(
            NgramHasher(**meta["hasher"]),
            target,
            dict(zip(meta["domains"], raw)),
            meta["alpha"],
            meta["min_words"],
            meta["documents"],
        )


def read_versioned(
    path: str | Path, format: str, version: int, arrays: Sequence[str], what: str
) -> tuple[dict[str, Any], list[np.ndarray]]:
    """The JSON ``meta`` and the named ``arrays`` of an ``.npz`` file of onlinemix's, its ``format`` and ``version``
    checked (``what`` names the kind of file in the error)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            meta = json.loads(str(data["meta"]))
            values = [data[name] for name in arrays]
    except (OSError, KeyError, ValueError) as error:
        raise ImportanceError(f"{path}: not {what} file ({error})") from None
    if meta.get("format") != format or meta.get("version") != version:
        raise ImportanceError(
            f"{path}: format {meta.get('format')!r} version {meta.get('version')!r}, expected {format!r} {version}"
        )
    return meta, values
