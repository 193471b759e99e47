"""Importance sidecars: one per domain, ``<domain>.importance.npy`` (float64 log weights, ``-inf`` for
documents too short to score) beside ``<domain>.importance.json`` (the estimator's fingerprint, the
source's length and content hash, progress). Written by ``onlinemix importance score``; read by the
CLI's ``report`` and by the loader's importance resampling (``importance:`` in the mixture file).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from onlinemix.loaders.importance.estimator import ImportanceError
from onlinemix.loaders.sources import Source


def domain_texts(source: Source, indices: np.ndarray, field: str) -> list[str]:
    """The text of samples ``indices`` (``Source.text``: decoded with the domain's tokenizer where it has one)."""
    return [source.text(int(i), field) for i in indices]


def source_fingerprint(source: Source, field: str) -> dict[str, Any]:
    """Length and a hash of 16 evenly spaced documents: a sidecar must match both."""
    size = len(source)
    probe = np.unique(np.linspace(0, size - 1, num=min(16, size)).astype(np.int64))
    digest = hashlib.sha256()
    for text in domain_texts(source, probe, field):
        digest.update(text.encode("utf-8", errors="replace") + b"\0")
    return {"documents": size, "content": digest.hexdigest()[:16]}


def sidecar_paths(folder: Path, domain: str) -> tuple[Path, Path]:
    """The ``.npy`` and ``.json`` files of ``domain``'s sidecar in ``folder``."""
    return folder / f"{domain}.importance.npy", folder / f"{domain}.importance.json"


def load_sidecar(folder: Path, domain: str, source: Source, field: str = "text") -> np.ndarray:
    """A domain's log weights, checked against the source it claims to score."""
    weights_path, meta_path = sidecar_paths(folder, domain)
    if not weights_path.exists() or not meta_path.exists():
        raise ImportanceError(f"{weights_path}: no sidecar for domain {domain!r} (run `onlinemix importance score`)")
    meta = json.loads(meta_path.read_text())
    weights = np.load(weights_path, mmap_mode="r")
    found = source_fingerprint(source, meta.get("field", field))
    if meta.get("source") != found or len(weights) != len(source):
        raise ImportanceError(
            f"{weights_path} does not match domain {domain!r}: it scored {meta.get('source')}, "
            f"the source now has {found}"
        )
    if meta.get("done") != len(source):
        raise ImportanceError(f"{weights_path}: scoring stopped at {meta.get('done')} of {len(source)} documents")
    return np.asarray(weights)
