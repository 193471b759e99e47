"""``onlinemix prepare``: build every cache a mixture's first open would build, before training.

A text domain is tokenized into a token cache the first time it is opened (``sources/tokenized.py``), and a
token-bin file's checksums are recorded the first time it is scanned. Done inside a training job, that costs
the job's time on every node whose cache is not shared. ``prepare`` does it beforehand, one domain per worker
process: each domain's cache is written by the same code whatever the number of workers (bit for bit the same
files), atomically (a killed run leaves no half cache; what finished is kept, so running it again resumes),
and under the cache's lock (a training job opening the same domain meanwhile waits for it, it does not
tokenize it twice). Where the mixture resamples by DSIR sidecars (``importance: {estimator, sidecars}``), it
scores each domain into its sidecar too. A training run on the prepared mixture then opens every cache in
milliseconds.

Engines: ``local`` (processes on this machine) and ``ray`` (a Ray task per domain, on a cluster). The unit of
work is a domain: a mixture of many domains (or clusters) spreads over many workers, one huge domain does
not (yet: splitting a domain's files over workers is the next step).
"""

from __future__ import annotations

import multiprocessing
import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from onlinemix.loaders.build import estimator, open_source
from onlinemix.loaders.cache import LIMIT_ENV
from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.extras import require
from onlinemix.loaders.files import CACHE_ENV, InputError, expand_paths
from onlinemix.loaders.importance.cli import score_domain
from onlinemix.loaders.importance.estimator import ImportanceError
from onlinemix.loaders.sources import Source, SourceError, TokenBinSource, TokenizedSource


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
    try:
        scored = _score(config, name, source)
    except (ConfigError, ImportanceError, SourceError, OSError) as error:
        return Prepared(name, "failed", f"DSIR scores: {error}", time.time() - started)
    seconds = time.time() - started
    if isinstance(source, TokenizedSource):
        cache = source.cache
        built = cache.built
        tokens, size = int(cache.meta["tokens"]), cache.meta.get("characters", 0)
        detail = f"{tokens:,} tokens in {cache.folder}"
        if built and seconds > 0:
            detail += f" ({size / 1e6 / seconds:.2f} MB of text per second)"
        return Prepared(name, "built" if built else "kept", detail + scored, seconds)
    if isinstance(source, TokenBinSource):
        return Prepared(name, "scanned", f"token-bin, {source.num_tokens:,} tokens{scored}", seconds)
    return Prepared(name, "none", f"a {domain.source} source: read as it is{scored}", seconds)


def _score(config: MixtureConfig, name: str, source: Source) -> str:
    """Where the mixture file resamples by DSIR sidecars and names the estimator that makes them (``importance:
    {estimator: ..., sidecars: ...}``), score the domain into its sidecar (resuming a partial one, keeping a
    complete one). Returns what it did, for the report ("" where the file asks for nothing)."""
    section = config.importance
    if section is None or section.sidecars is None or section.estimator is None:
        return ""
    if section.domains and name not in section.domains:
        return ""
    meta = score_domain(estimator(config), name, source, section.sidecars, section.field)
    return f"; DSIR scores of {meta['done']:,} documents in {section.sidecars}"


ENGINES = ("local", "ray")


def tokenizer_threads(workers: int) -> dict[str, str]:
    """The environment that gives each of ``workers`` processes its share of the cores for a Hugging Face
    tokenizer's thread pool (``encode_batch`` runs on all of them by default: ``workers`` processes would each
    start one thread per core and fight over them). A value the user set is kept."""
    share = str(max(1, (os.cpu_count() or 1) // workers))
    return {name: os.environ.get(name, share) for name in ("RAYON_NUM_THREADS", "RAYON_RS_NUM_CPUS")}


def _set_environment(values: dict[str, str]) -> None:
    """A worker process's initializer (module level: spawn pickles it by name)."""
    os.environ.update(values)


def prepare(
    config_path: str | Path, workers: int | None = None, domains: list[str] | None = None, engine: str = "local"
) -> list[Prepared]:
    """Prepare ``domains`` (default: all) of a mixture file, ``workers`` domains at once (default: one per core,
    at most one per domain); a progress bar counts the domains. Returns one ``Prepared`` per domain, in the
    file's order.

    ``engine``: ``local`` (worker processes on this machine) or ``ray`` (one Ray task per domain: on the cluster
    at ``$RAY_ADDRESS``, or on a local one started for the run; the caches must then be on storage every node
    sees, ``cache_dir`` or ``$ONLINEMIX_CACHE_DIR``, which the tasks are given). Either writes the same files."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    config = MixtureConfig.load(config_path)
    names = [d.name for d in config.domains]
    unknown = sorted(set(domains or []) - set(names))
    if unknown:
        raise ConfigError(f"prepare: {unknown[0]!r} is not a domain of {config_path} (it has {', '.join(names)})")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    chosen = [name for name in names if domains is None or name in domains]
    workers = min(workers or os.cpu_count() or 1, len(chosen))
    # the largest first: the last worker to finish is not the one that started the largest domain last
    sizes = {d.name: _input_bytes(d.path, Path(config_path).parent) for d in config.domains}
    largest_first = sorted(chosen, key=lambda name: -sizes[name])
    path = str(Path(config_path).resolve())
    results: dict[str, Prepared] = {}
    with tqdm(total=len(chosen), desc="preparing", unit="domain") as bar:
        if engine == "ray":
            results = _on_ray(path, largest_first, workers, bar)
        elif workers == 1:
            for name in chosen:
                results[name] = prepare_domain(path, name)
                bar.update()
        else:  # spawned, not forked: a worker starts clean of the parent's threads and open files
            context = multiprocessing.get_context("spawn")
            threads = tokenizer_threads(workers)
            with ProcessPoolExecutor(workers, context, initializer=_set_environment, initargs=(threads,)) as pool:
                futures = {pool.submit(prepare_domain, path, name): name for name in largest_first}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
    return [results[name] for name in chosen]


def _input_bytes(path: Path | str | list[str] | None, base_dir: Path) -> int:
    """The size of a domain's input files as stored (0 where they cannot be listed here: the domain's own open
    then says why)."""
    if path is None:
        return 0
    try:
        return sum(file.stat().st_size for file in expand_paths(path, base_dir, suffixes=("",)))  # every file
    except InputError:
        return 0


def _on_ray(path: str, names: list[str], workers: int, bar: tqdm) -> dict[str, Prepared]:
    """One Ray task per domain, at most ``workers`` at a time. (Ray core tasks rather than Ray Data: the unit
    of work is a whole domain whose output goes to storage, so there are no blocks to stream between them.)"""
    ray = require("ray", "--engine ray")
    started_here = not ray.is_initialized()
    if started_here:  # joins $RAY_ADDRESS when it is set, else starts a local cluster of `workers` CPUs
        ray.init(num_cpus=None if os.environ.get("RAY_ADDRESS") else workers, log_to_driver=False)
    try:
        env = {name: os.environ[name] for name in (CACHE_ENV, LIMIT_ENV) if os.environ.get(name)}
        env |= tokenizer_threads(1)  # one CPU per task: its tokenizer's thread pool too
        task = ray.remote(prepare_domain).options(num_cpus=1, runtime_env={"env_vars": env})
        results, pending, queue = {}, {}, list(names)
        while queue or pending:
            while queue and len(pending) < workers:
                name = queue.pop(0)
                pending[task.remote(path, name)] = name
            done, _ = ray.wait(list(pending), num_returns=1)
            for reference in done:
                results[pending.pop(reference)] = ray.get(reference)
                bar.update()
        return results
    finally:
        if started_here:
            ray.shutdown()
