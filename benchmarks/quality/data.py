"""The quality suite's data: training domains, held-out sets and mixture files for each scenario.

Everything is byte-level (``ByteTokenizer``: UTF-8 bytes, 256 ends a document) and packed into
token-bin files, so a sample is a window of the concatenated documents. Documents are split
between training and held-out text by a hash of their name (never by position), so held-out sets
are other documents of the same kind, spread over the whole corpus.

Layout under ``DIR`` (written once; ``build`` skips what exists)::

    train/<domain>.bin            the general and targeted scenarios' training domains
    heldout/<domain>.bin          one held-out set per training domain
    target/heldout.bin            the target: held-out German manual pages
    target/specific.bin .jsonl    a small specific set of the target's kind (SPECIFIC_BYTES)
    target/align.bin              another such set, never trained on: what DGA aligns with, and
                                  where a target reference model is validated
    target/small-specific.bin     a smaller specific set (SMALL_SPECIFIC_BYTES, part of specific.bin) and a
    target/small-align.bin        few KB held out beside it (SMALL_ALIGN_BYTES, part of align.bin): the
                                  small-specific scenario, where the fastest-falling loss is memorisation
    target/tiny-specific.bin      a tiny specific set (TINY_SPECIFIC_BYTES): the tiny-specific scenario, where a
                                  short proxy run's share of it is four times too much for the full run
    clusters/c000.bin ...         the many-domains scenario: CLUSTERS clusters of documents
    clusters.json                 each cluster's size and what its documents are
    <scenario>.yaml               each scenario's mixture file
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import corpora
import numpy as np
import yaml

from onlinemix.loaders import ByteTokenizer
from onlinemix.loaders.importance import NgramHasher

SEQ_LEN = 64
GLOBAL_BATCH = 32
GENERAL = {  # training domain -> its corpus and the most training text it gets (bytes): sizes differ on purpose
    "code": ("code", 4_000_000),
    "docs": ("docs", 1_500_000),
    "man-en": ("man-en", 4_000_000),
    "man-fr": ("man-fr", 1_000_000),
    "po-de": ("po-de", 1_000_000),
    "po-ru": ("po-ru", 2_000_000),
}
HELDOUT_SHARE = 0.15  # of each corpus's documents, by name hash
HELDOUT_BYTES = 300_000
SPECIFIC_BYTES = 40_000
SMALL_SPECIFIC_BYTES, SMALL_ALIGN_BYTES = 16_000, 5_000
TINY_SPECIFIC_BYTES = 6_000
CLUSTERS = 256
CLUSTER_POOL = {  # corpus -> bytes of its training documents that go into the pool of the many-domains scenario
    "code": 800_000,
    "docs": 400_000,
    "man-en": 800_000,
    "man-fr": 400_000,
    "man-de": 600_000,
    "po-de": 400_000,
    "po-fr": 400_000,
    "po-ru": 400_000,
    "po-es": 400_000,
    "po-ja": 400_000,
}
CHUNK_BYTES = 2048  # the pool's documents are cut into pieces of about this size before clustering
MAX_EPOCHS = 8  # the many-domains scenario's repeat cap per cluster
TOKENIZER = ByteTokenizer()


def _hash(name: str) -> float:
    """A stable number in [0, 1) for a document name."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little") / 2**64


def split(documents: list[corpora.Document]) -> tuple[list[corpora.Document], list[corpora.Document]]:
    """``(training, held-out)`` documents, by the hash of each document's name."""
    training = [doc for doc in documents if _hash(doc[0]) >= HELDOUT_SHARE]
    heldout = [doc for doc in documents if _hash(doc[0]) < HELDOUT_SHARE]
    return training, heldout


def take(documents: list[corpora.Document], limit: int) -> list[corpora.Document]:
    """Whole documents, in the order of their name hashes, until ``limit`` bytes (a spread over the corpus)."""
    chosen, size = [], 0
    for doc in sorted(documents, key=lambda d: _hash("take:" + d[0])):
        if size >= limit:
            break
        chosen.append(doc)
        size += len(doc[1].encode())
    return chosen


def write_bin(path: Path, documents: list[corpora.Document]) -> int:
    """Byte tokens of ``documents``, each followed by the end-of-text token, as a uint16 token-bin file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tokens = np.concatenate([TOKENIZER.encode(text) for _, text in documents])
    tokens.astype(np.uint16).tofile(path)
    return len(tokens)


def _domain(name: str, path: str, **extra) -> dict:
    return {"name": name, "source": "tokenbin", "path": path, "dtype": "uint16", **extra}


def _mixture(path: Path, domains: list[dict], seed: int = 0) -> None:
    config = {
        "seed": seed,
        "global_batch_size": GLOBAL_BATCH,
        "seq_len": SEQ_LEN,
        "vocab_size": TOKENIZER.vocab_size,
        "domains": domains,
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))


VERSION = "3"  # bumped when the data changes: an older folder is built again


def build(root: Path, log=print) -> Path:
    """Write every scenario's data under ``root`` (once); returns ``root``."""
    if (root / "done").exists() and (root / "done").read_text().split()[-1] == VERSION:
        return root
    root.mkdir(parents=True, exist_ok=True)
    loaded = {name: corpora.load(name) for name in {*(c for c, _ in GENERAL.values()), *CLUSTER_POOL}}
    splits = {name: split(documents) for name, documents in loaded.items()}

    for domain, (corpus, limit) in GENERAL.items():
        training, heldout = splits[corpus]
        tokens = write_bin(root / "train" / f"{domain}.bin", take(training, limit))
        held = write_bin(root / "heldout" / f"{domain}.bin", take(heldout, HELDOUT_BYTES))
        log(f"  {domain:8} {tokens:>10,} training tokens, {held:>8,} held out")

    # The target: German manual pages. Held out, a small specific set, an alignment set, and the rest (pool).
    german_training, german_heldout = splits["man-de"]
    ordered = sorted(german_training, key=lambda d: _hash("target:" + d[0]))
    specific = take(ordered[: len(ordered) // 4], SPECIFIC_BYTES)
    align = take([d for d in ordered[: len(ordered) // 4] if d not in specific], SPECIFIC_BYTES)
    rest = [d for d in ordered if d not in specific and d not in align]
    write_bin(root / "target" / "heldout.bin", german_heldout)
    write_bin(root / "target" / "specific.bin", specific)
    write_bin(root / "target" / "align.bin", align)
    write_bin(root / "target" / "small-specific.bin", take(specific, SMALL_SPECIFIC_BYTES))
    write_bin(root / "target" / "small-align.bin", take(align, SMALL_ALIGN_BYTES))
    write_bin(root / "target" / "tiny-specific.bin", take(specific, TINY_SPECIFIC_BYTES))
    with open(root / "target" / "specific.jsonl", "w") as file:
        for _, text in specific:
            file.write(json.dumps({"text": text}) + "\n")
    log(f"  target: {sum(len(t.encode()) for _, t in german_heldout):,} bytes held out, specific set "
        f"{sum(len(t.encode()) for _, t in specific):,} bytes ({len(specific)} pages), alignment set "
        f"{sum(len(t.encode()) for _, t in align):,} bytes")  # fmt: skip

    pool = []
    for corpus, limit in CLUSTER_POOL.items():
        documents = rest if corpus == "man-de" else splits[corpus][0]
        pool.extend((corpus, piece) for _, text in take(documents, limit) for piece in chunks(text))
    clusters = cluster(pool, CLUSTERS)
    composition = []
    for c, members in enumerate(clusters):
        write_bin(root / "clusters" / f"c{c:03d}.bin", [(str(i), pool[i][1]) for i in members])
        sources = {}
        for i in members:
            sources[pool[i][0]] = sources.get(pool[i][0], 0) + len(pool[i][1].encode())
        composition.append({"name": f"c{c:03d}", "documents": len(members), "bytes_by_corpus": sources})
    (root / "clusters.json").write_text(json.dumps(composition, indent=1))
    german = sum(1 for c in composition if max(c["bytes_by_corpus"], key=c["bytes_by_corpus"].get) == "man-de")
    log(f"  {len(pool):,} pool documents in {CLUSTERS} clusters; {german} clusters are mostly German manual pages")

    general = [_domain(name, f"train/{name}.bin") for name in GENERAL]
    _mixture(root / "general.yaml", general)
    _mixture(root / "targeted.yaml", general)
    _mixture(root / "targeted+specific.yaml", [*general, _domain("specific", "target/specific.bin")])
    _mixture(root / "small-specific.yaml", [*general, _domain("specific", "target/small-specific.bin")])
    _mixture(root / "tiny-specific.yaml", [*general, _domain("specific", "target/tiny-specific.bin")])
    # Every cluster capped at MAX_EPOCHS: a method that pours weight onto one small cluster would otherwise
    # repeat it dozens of times and memorise it (the same cap for every method; uniform never reaches it).
    clusters = [_domain(c["name"], f"clusters/{c['name']}.bin", max_epochs=MAX_EPOCHS) for c in composition]
    _mixture(root / "many.yaml", clusters)
    (root / "done").write_text(f"complete, version {VERSION}\n")
    return root


def chunks(text: str) -> list[str]:
    """``text`` cut at line breaks into pieces of about ``CHUNK_BYTES`` (documents of the cluster pool)."""
    pieces, current, size = [], [], 0
    for line in text.splitlines(keepends=True):
        current.append(line)
        size += len(line)
        if size >= CHUNK_BYTES:
            pieces.append("".join(current))
            current, size = [], 0
    if size > CHUNK_BYTES // 4:
        pieces.append("".join(current))
    return pieces


def cluster(pool: list[tuple[str, str]], k: int, iterations: int = 25, seed: int = 0) -> list[list[int]]:
    """Spherical k-means of the documents' DSIR features (hashed unigrams and bigrams, log-scaled, unit length).

    Returns the members of each of ``k`` non-empty clusters (an empty cluster is re-seeded with the
    document farthest from its centroid).
    """
    hasher = NgramHasher(num_buckets=4096, seed=seed)
    features = np.zeros((len(pool), hasher.num_buckets), dtype=np.float32)
    for start in range(0, len(pool), 512):
        batch = [text for _, text in pool[start : start + 512]]
        buckets = hasher.buckets(batch)
        rows = np.repeat(np.arange(len(batch)), buckets.words)
        np.add.at(features, (start + rows, buckets.unigrams), 1.0)
        bigram_rows = np.repeat(np.arange(len(batch)), np.maximum(buckets.words - 1, 0))
        np.add.at(features, (start + bigram_rows, buckets.bigrams), 1.0)
    features = np.log1p(features)
    features /= np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    centroids = features[rng.choice(len(pool), k, replace=False)]
    for _ in range(iterations):
        similarity = features @ centroids.T
        assignment = similarity.argmax(axis=1)
        for c in range(k):
            members = assignment == c
            if not members.any():  # re-seed with the worst-placed document
                worst = int(similarity.max(axis=1).argmin())
                assignment[worst] = c
                members = assignment == c
            centroid = features[members].sum(axis=0)
            centroids[c] = centroid / max(np.linalg.norm(centroid), 1e-12)
    return [np.flatnonzero(assignment == c).tolist() for c in range(k)]
