"""``onlinemix prepare``: build every cache a mixture's first open would build, before training.

A text domain is tokenized into a token cache the first time it is opened (``cache/tokens.py``), and a
token-bin file's checksums are recorded the first time it is scanned. Done inside a training job, that costs
the job's time on every node whose cache is not shared. ``prepare`` does it beforehand, one domain per worker
process: each domain's cache is written by the same code whatever the number of workers (bit for bit the same
files), atomically (a killed run leaves no half cache; what finished is kept, so running it again resumes),
and under the cache's lock (a training job opening the same domain meanwhile waits for it, it does not
tokenize it twice). Where the mixture resamples by DSIR sidecars (``importance: {estimator, sidecars}``), it
scores each domain into its sidecar too. A training run on the prepared mixture then opens every cache in
milliseconds.

**Units of work.** A domain whose documents are its files' documents in order (JSONL, text, Parquet) is
tokenized in parts: one task per file, and per piece of about 32 MB of a large file (an uncompressed JSONL file
cut at line starts, a Parquet file between row groups; a compressed file, or a text file, which is one
document, is one part), each writing its part's token cache; then one task per domain concatenates its parts
into the domain's cache — byte for byte the cache one process tokenizing the whole domain writes — and removes
them. So one huge file spreads over every worker, and a killed run resumes by part: the finished parts are
kept. Any other domain is one task.

Engines: ``local`` (processes on this machine) and ``ray`` (Ray tasks, on a cluster). Parts go where the
domain's cache goes (``cache_dir``): on a cluster, storage every node sees (a shared filesystem or a bucket).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from onlinemix.loaders.build import estimator, open_source, tokenized_documents, tokenizer_of
from onlinemix.loaders.cache.folder import cache_entry, token_cache_root
from onlinemix.loaders.cache.tokens import PART_BYTES, Cut, TokenCache, cache_key, part_cuts, part_of, parts_of
from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.engines import ENGINES, engine_runner
from onlinemix.loaders.importance.estimator import ImportanceError
from onlinemix.loaders.importance.scoring import score_domain
from onlinemix.loaders.paths import InputError, expand_paths
from onlinemix.loaders.sources import DocumentSource, Source, SourceError, TokenBinSource, TokenizedSource


@dataclass
class Prepared:
    """What preparing one domain did: ``status`` is ``built`` (its token cache, now), ``kept`` (its token cache
    was already there), ``scanned`` (a token-bin file: its checksums are recorded), ``none`` (nothing to
    prepare: e.g. MDS shards, records through a transform) or ``failed`` (``detail`` says why)."""

    domain: str
    status: str
    detail: str
    seconds: float


def prepare_part(config_path: str, name: str, cut: Cut) -> Prepared:
    """Tokenize the part of domain ``name`` at ``cut`` (a file, or a piece of a large one: ``part_cuts``) into its
    token cache, if it is not there (in a worker process)."""
    started = time.time()
    config = MixtureConfig.load(config_path)
    domain = next(d for d in config.domains if d.name == name)
    documents = None
    try:
        documents = tokenized_documents(config, domain)
        part = part_of(documents, cut)
        cache = TokenCache.open(part, tokenizer_of(config, domain), token_cache_root(config.cache_dir))
    except (ConfigError, SourceError, OSError, ValueError, IndexError) as error:
        file = _file(documents, cut)
        detail = str(error) if file in str(error) else f"{file}: {error}"  # named once
        return Prepared(name, "failed", detail, time.time() - started)
    detail = f"{int(cache.meta['tokens']):,} tokens of {part.path}"
    return Prepared(name, "built" if cache.built else "kept", detail, time.time() - started)


def _file(documents: DocumentSource | None, cut: Cut) -> str:
    """How a message names the part at ``cut`` (its file, when the domain's files could still be listed)."""
    try:
        return str(documents.files[cut[0]])
    except Exception:
        return f"file {cut[0]}"


def prepare_domain(config_path: str, name: str, part_size: int = PART_BYTES) -> Prepared:
    """Open domain ``name`` of the mixture file: this builds its cache if there is none (in a worker process),
    from its parts (of ``part_size``) where ``prepare_part`` made them all."""
    started = time.time()
    config = MixtureConfig.load(config_path)
    domain = next(d for d in config.domains if d.name == name)
    try:
        with parts_of(part_size):
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


def prepare(
    config_path: str | Path,
    workers: int | None = None,
    domains: list[str] | None = None,
    engine: str = "local",
    part_size: int = PART_BYTES,
) -> list[Prepared]:
    """Prepare ``domains`` (default: all) of a mixture file, ``workers`` domains at once (default: one per core,
    at most one per domain); a progress bar counts the domains. Returns one ``Prepared`` per domain, in the
    file's order.

    ``engine``: ``local`` (worker processes on this machine) or ``ray`` (one Ray task per domain: on the cluster
    at ``$RAY_ADDRESS``, or on a local one started for the run; the caches must then be on storage every node
    sees, ``cache_dir`` or ``$ONLINEMIX_CACHE_DIR``, which the tasks are given). Either writes the same files.

    ``part_size``: the bytes of a large file each task tokenizes (see *Units of work*): smaller parts spread a
    domain over more workers and balance them better, at a small cost per part (a task, a folder, a copy)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    config = MixtureConfig.load(config_path)
    names = [d.name for d in config.domains]
    unknown = sorted(set(domains or []) - set(names))
    if unknown:
        raise ConfigError(f"prepare: {unknown[0]!r} is not a domain of {config_path} (it has {', '.join(names)})")
    if workers is not None and workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if part_size < 1 << 20:
        raise ValueError(f"part_size must be at least 1 MiB, got {part_size:,} bytes")
    chosen = [name for name in names if domains is None or name in domains]
    path = str(Path(config_path).resolve())
    parts = {name: _parts_to_make(config, name, part_size) for name in chosen}  # for the domains made in parts
    # the largest first: the last worker to finish is not the one that started the largest task last
    sizes = {d.name: _input_bytes(d.path, Path(config_path).parent) for d in config.domains}
    whole = sorted((name for name in chosen if not parts[name]), key=lambda name: -sizes[name])
    files = [(name, number) for name in chosen for number in range(len(parts[name]))]
    files.sort(key=lambda task: -parts[task[0]][task[1]][1])
    first_wave: list[Task] = [*files, *((name, None) for name in whole)]
    workers = min(workers or os.cpu_count() or 1, len(first_wave))
    results: dict[tuple[str, int | None], Prepared] = {}
    total = len(first_wave) + sum(bool(p) for p in parts.values())
    with tqdm(total=total, desc="preparing", unit="task") as bar, engine_runner(engine, workers, run_task) as run:

        def wave(tasks: list[Task]) -> dict[Task, Prepared]:
            # a part's task is given its cut, found here once (finding it reads a little of every large file)
            cuts = [None if number is None else parts[name][number][0] for name, number in tasks]
            done = run([(path, task, part_size, cut) for task, cut in zip(tasks, cuts)], bar)
            return {task: result for (_, task, _, _), result in done.items()}

        results = wave(first_wave)
        failed = {name: r for (name, number), r in results.items() if number is not None and r.status == "failed"}
        split = [name for name in chosen if parts[name] and name not in failed]  # then their parts are assembled
        results |= wave([(name, None) for name in sorted(split, key=lambda name: -sizes[name])])
        bar.update(len(failed))
    for name, failure in failed.items():
        seconds = sum(r.seconds for (domain, _), r in results.items() if domain == name)
        results[name, None] = Prepared(name, "failed", failure.detail, seconds)
    for name in chosen:
        if parts[name] and results[name, None].status == "built":
            results[name, None].detail += f" (from {len(parts[name])} parts)"
    return [results[name, None] for name in chosen]


def _parts_to_make(config: MixtureConfig, name: str, part_size: int) -> list[tuple[Cut, int]]:
    """The parts a domain is tokenized in, each with its size: empty when it is tokenized whole (one part, a format
    that is not a sequence of files, no tokenizing at all) or its cache is there already."""
    domain = next(d for d in config.domains if d.name == name)
    try:
        documents = tokenized_documents(config, domain)
        cuts = part_cuts(documents, part_size) if documents is not None else []
        if not cuts:
            return []
        key = cache_key(documents, tokenizer_of(config, domain))
        if (cache_entry(token_cache_root(config.cache_dir), documents.kind, key) / "meta.json").exists():
            return []
        return [(cut, part_of(documents, cut).input_bytes()) for cut in cuts]
    except (ConfigError, SourceError, OSError, ValueError):
        return []  # the domain's own task says what is wrong


def _input_bytes(path: Path | str | list[str] | None, base_dir: Path) -> int:
    """The size of a domain's input files as stored (0 where they cannot be listed here: the domain's own open
    then says why)."""
    if path is None:
        return 0
    try:
        return sum(file.stat().st_size for file in expand_paths(path, base_dir, suffixes=("",)))  # every file
    except InputError:
        return 0


Task = tuple[str, "int | None"]  # (domain, part number): a part; (domain, None): the domain


def run_task(path: str, task: Task, part_size: int = PART_BYTES, cut: Cut | None = None) -> Prepared:
    """One task, in whichever process the engine runs it: a domain's (assembled from its parts of ``part_size``,
    or built whole), or the part at ``cut``."""
    name, number = task
    return prepare_domain(path, name, part_size) if number is None else prepare_part(path, name, cut)
