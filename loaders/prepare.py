"""``onlinemix prepare``: build every cache a mixture's first open would build, before training.

A text domain is tokenized into a token cache the first time it is opened (``sources/tokenized.py``), and a
token-bin file's checksums are recorded the first time it is scanned. Done inside a training job, that costs
the job's time on every node whose cache is not shared. ``prepare`` does it beforehand, one domain per worker
process: each domain's cache is written by the same code whatever the number of workers (bit for bit the same
files), atomically (a killed run leaves no half cache; what finished is kept, so running it again resumes),
and under the cache's lock (a training job opening the same domain meanwhile waits for it, it does not
tokenize it twice). A training run on the prepared mixture then opens every cache in milliseconds.
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from onlinemix.loaders.build import open_source
from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.sources import SourceError, TokenBinSource, TokenizedSource


@dataclass
class Prepared:
    """What preparing one domain did: ``status`` is ``built`` (its token cache, now), ``kept`` (its token cache
    was already there), ``scanned`` (a token-bin file: its checksums are recorded), ``none`` (nothing to
    prepare: e.g. MDS shards, records through a transform) or ``failed`` (``detail`` says why)."""

    domain: str
    status: str
    detail: str
    seconds: float


def prepare_domain(config_path: str, name: str) -> Prepared:
    """Open domain ``name`` of the mixture file: this builds its cache if there is none (in a worker process)."""
    started = time.time()
    config = MixtureConfig.load(config_path)
    domain = next(d for d in config.domains if d.name == name)
    try:
        source = open_source(config, domain)
    except (ConfigError, SourceError, OSError, ValueError) as error:
        return Prepared(name, "failed", str(error), time.time() - started)
    seconds = time.time() - started
    if isinstance(source, TokenizedSource):
        cache = source.cache
        built = cache.built
        tokens, size = int(cache.meta["tokens"]), cache.meta.get("characters", 0)
        detail = f"{tokens:,} tokens in {cache.folder}"
        if built and seconds > 0:
            detail += f" ({size / 1e6 / seconds:.2f} MB of text per second)"
        return Prepared(name, "built" if built else "kept", detail, seconds)
    if isinstance(source, TokenBinSource):
        return Prepared(name, "scanned", f"token-bin, {source.num_tokens:,} tokens", seconds)
    return Prepared(name, "none", f"a {domain.source} source: read as it is, nothing to prepare", seconds)


def prepare(config_path: str | Path, workers: int | None = None, domains: list[str] | None = None) -> list[Prepared]:
    """Prepare ``domains`` (default: all) of a mixture file with ``workers`` processes (default: one per core,
    at most one per domain); a progress bar counts the domains. Returns one ``Prepared`` per domain, in the
    file's order."""
    config = MixtureConfig.load(config_path)
    names = [d.name for d in config.domains]
    unknown = sorted(set(domains or []) - set(names))
    if unknown:
        raise ConfigError(f"prepare: {unknown[0]!r} is not a domain of {config_path} (it has {', '.join(names)})")
    chosen = [name for name in names if domains is None or name in domains]
    workers = min(workers or os.cpu_count() or 1, len(chosen))
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    path = str(Path(config_path).resolve())
    results: dict[str, Prepared] = {}
    with tqdm(total=len(chosen), desc="preparing", unit="domain") as bar:
        if workers == 1:
            for name in chosen:
                results[name] = prepare_domain(path, name)
                bar.update()
        else:  # spawned, not forked: a worker starts clean of the parent's threads and open files
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
                futures = {name: pool.submit(prepare_domain, path, name) for name in chosen}
                for name, future in futures.items():
                    results[name] = future.result()
                    bar.update()
    return [results[name] for name in chosen]
