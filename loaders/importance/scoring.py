"""Scoring every document of a mixture's domains into sidecars (``onlinemix importance score``, ``prepare``).

``score_domain`` scores one domain in this process, saving its progress every ``CHUNK`` documents so that an
interrupted run resumes where it stopped; ``score_domains`` scores several, one at a time here or on the
engines ``prepare`` uses (each task opens only its own domain, which the driver has checked and built first).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from onlinemix.loaders.build import open_source
from onlinemix.loaders.config import MixtureConfig
from onlinemix.loaders.engines import engine_runner
from onlinemix.loaders.importance.estimator import ImportanceError
from onlinemix.loaders.importance.scorers import Scorer, load_scorer
from onlinemix.loaders.importance.sidecars import domain_texts, sidecar_paths, source_fingerprint
from onlinemix.loaders.sources import Source

CHUNK = 4096  # documents scored between two progress saves


def score_domain(scorer: Scorer, name: str, source: Source, folder: Path, field: str) -> dict:
    """Score every document of one domain into its sidecar, resuming a partial one (made by the same scorer of the
    same source; anything else is scored afresh). Returns the sidecar's meta (``done``, ``short``...)."""
    weights_path, meta_path = sidecar_paths(folder, name)
    expected = {"estimator": scorer.fingerprint(), "source": source_fingerprint(source, field), "field": field}
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and weights_path.exists() else None
    if meta is not None and {key: meta.get(key) for key in expected} == expected:
        weights = np.load(weights_path, mmap_mode="r+")
    else:
        meta = {**expected, "done": 0, "short": 0}
        weights = np.lib.format.open_memmap(weights_path, mode="w+", dtype=np.float64, shape=(len(source),))
    size = len(source)
    with tqdm(total=size, initial=meta["done"], desc=name, unit="sample") as bar:
        while meta["done"] < size:
            indices = np.arange(meta["done"], min(size, meta["done"] + CHUNK))
            scores, words = scorer.score(domain_texts(source, indices, field), name)
            weights[indices] = scores
            weights.flush()
            meta["short"] += int((words < scorer.min_words).sum())
            meta["done"] = int(indices[-1]) + 1
            meta_path.write_text(json.dumps(meta))
            bar.update(len(indices))
    return meta


def score_task(scorer_file: str, kind: str | None, config_path: str, name: str, out: str, field: str) -> dict:
    """Score one domain into its sidecar (in whichever process the engine runs it: it opens only its own domain);
    returns the sidecar's meta."""
    scorer = load_scorer(scorer_file, kind)
    config = MixtureConfig.load(config_path)
    source = open_source(config, next(domain for domain in config.domains if domain.name == name))
    return score_domain(scorer, name, source, Path(out), field)


def score_domains(
    scorer_file: Path,
    kind: str | None,
    config_path: Path,
    sources: dict[str, Source],
    out: Path,
    field: str = "text",
    workers: int = 1,
    engine: str = "local",
) -> dict[str, dict]:
    """Score every domain of ``sources`` (opened from ``config_path``) into ``out``: in this process with a bar
    per domain (one local worker), else one task per domain on ``engine``, ``workers`` at a time. Returns each
    domain's sidecar meta."""
    if workers < 1:
        raise ImportanceError(f"workers must be >= 1, got {workers}")
    out.mkdir(parents=True, exist_ok=True)
    if workers == 1 and engine == "local":
        scorer = load_scorer(scorer_file, kind)
        return {name: score_domain(scorer, name, source, out, field) for name, source in sources.items()}
    paths = [str(Path(p).resolve()) for p in (scorer_file, config_path, out)]
    tasks = [(paths[0], kind, paths[1], name, paths[2], field) for name in sources]
    with (
        tqdm(total=len(tasks), desc="scoring", unit="domain") as bar,
        engine_runner(engine, min(workers, len(tasks)), score_task) as run,
    ):
        return {task[3]: meta for task, meta in run(tasks, bar).items()}
