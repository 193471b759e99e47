"""From a parsed mixture file to the parts of a ``MixedDataset``: sources, initial weights, plan spec, importance.

``config.py`` only reads and checks the file; everything that opens data or
builds an object from it is here, in the order ``MixedDataset.from_config``
calls it::

    config = MixtureConfig.load("mixture.yaml")       # parse and validate (config.py)
    sources = build_sources(config)                   # open every domain (index caches are built here)
    weights = initial_weights(config, sources)        # given, importance prior, or temperature rule
    spec = plan_spec(config, sources)                 # sizes, caps, shard orders, importance resampling
    acceptance = online_acceptance(config, sources)   # importance accept/reject in the worker
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np

from onlinemix.loaders.config import ConfigError, DomainConfig, MixtureConfig
from onlinemix.loaders.importance.acceptance import OnlineAcceptance
from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator
from onlinemix.loaders.importance.sidecars import load_sidecar, sidecar_paths
from onlinemix.loaders.paths import InputError
from onlinemix.loaders.plan import UNLIMITED, PlanSpec, ResampledOrder
from onlinemix.loaders.sources import SOURCES, DocumentSource, Source, SourceError, TokenBinSource, TokenizedSource
from onlinemix.loaders.sources.base import NothingToVerify
from onlinemix.loaders.tokenizers import Tokenizer, load_tokenizer
from onlinemix.loaders.transforms import ImportedTransform, TokenWindow
from onlinemix.simplex import check_weights, temperature_weights

log = logging.getLogger("onlinemix")


def build_sources(config: MixtureConfig) -> list[Source]:
    """Open every domain's source (token caches and indexes are built here); errors name the domain."""
    sources = [open_source(config, domain) for domain in config.domains]
    check_vocabulary(config, sources)
    for domain, source in zip(config.domains, sources):
        if len(source) == 0:
            raise ConfigError(
                f"domain {domain.name!r}: {domain.path} holds no samples "
                f"(a sample needs seq_len + 1 = {config.seq_len + 1} tokens)"
            )
    return sources


def tokenizer_of(config: MixtureConfig, domain: DomainConfig | None = None) -> Tokenizer:
    """The tokenizer of ``domain`` (its own, else the mixture's), or the mixture's; ``byte`` by default."""
    spec = domain.tokenizer if domain is not None and domain.tokenizer is not None else config.tokenizer
    where = f"domain {domain.name!r}: " if domain is not None and domain.tokenizer is not None else ""
    try:
        return load_tokenizer(spec)
    except (ValueError, ImportError) as error:
        raise ConfigError(f"{where}tokenizer: {error}") from None


def source_class(domain: DomainConfig) -> type[Source]:
    """A built-in source, or a class named ``package.module:Class`` (imported here)."""
    if domain.source in SOURCES:
        try:
            return SOURCES[domain.source].for_data(domain.path, domain.options)
        except (SourceError, OSError) as error:
            raise ConfigError(f"domain {domain.name!r}: {error}") from None
    try:
        cls = ImportedTransform(domain.source).resolve()
    except ValueError as error:
        raise ConfigError(f"domain {domain.name!r}: source: {error}") from None
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise ConfigError(f"domain {domain.name!r}: source {domain.source!r} is not a subclass of onlinemix's Source")
    return cls


def given_if_taken(cls: type, **values: Any) -> dict[str, Any]:
    """The ``values`` that ``cls``'s constructor has a parameter for (a source class of yours need not take
    ``seq_len`` or ``cache_dir``; one that does gets the mixture's)."""
    parameters = inspect.signature(cls).parameters
    return {key: value for key, value in values.items() if key in parameters}


def tokenized_documents(config: MixtureConfig, domain: DomainConfig) -> DocumentSource | None:
    """The document source a domain's token cache is made from, not tokenized (``None`` for a domain that is not
    tokenized: a token-bin file, records through a transform, a source that is not a ``DocumentSource``)."""
    cls = source_class(domain)
    if domain.transform or config.transform or not issubclass(cls, DocumentSource):
        return None
    return cls(domain.path, **{**given_if_taken(cls, cache_dir=config.cache_dir), **domain.options})


def open_source(config: MixtureConfig, domain: DomainConfig, build: bool = True) -> Source:
    """One domain's source: a token-bin file, a tokenized document source, records through a transform, or
    a class of your own (constructed with ``path`` when given, the domain's other keys, and ``seq_len`` when
    it takes one; a ``DocumentSource`` of yours is tokenized and packed like the built-in ones). ``build=False``:
    a token cache that is not there is ``NothingToVerify``, not built."""
    cls = source_class(domain)
    spec = domain.transform or config.transform
    transform = ImportedTransform(spec) if spec else None
    where = f"domain {domain.name!r}"
    try:
        if transform is not None:
            transform.resolve()  # an unimportable transform is an error now, not at the first read
        if cls is TokenBinSource:
            if domain.samples != "packed":
                raise ConfigError(f"{where}: samples: documents needs a document source; a tokenbin has no documents")
            return TokenBinSource(
                domain.path, config.seq_len, stride=domain.stride, transform=transform, **domain.options
            )
        if issubclass(cls, DocumentSource):
            options = {**given_if_taken(cls, cache_dir=config.cache_dir), **domain.options}
            documents = cls(domain.path, transform=transform, **options)
            if transform is not None:
                if domain.tokenizer is not None or domain.stride is not None or domain.samples != "packed":
                    raise ConfigError(
                        f"{where}: a transform makes the samples: tokenizer, samples, stride do not apply"
                    )
                return documents
            if domain.order == "shards":
                raise ConfigError(
                    f"{where}: order: shards reads shards front to back at random; a tokenized domain is read from "
                    "its local token cache (order: samples), so it applies only with a transform"
                )
            return TokenizedSource(
                documents,
                tokenizer_of(config, domain),
                config.seq_len,
                domain.samples,
                domain.stride,
                config.cache_dir,
                config.verify,
                build,
            )
        path = {} if domain.path is None else {"path": domain.path}
        given = given_if_taken(cls, seq_len=config.seq_len, stride=domain.stride, cache_dir=config.cache_dir)
        if domain.stride is not None and "stride" not in given:
            raise ConfigError(f"{where}: stride is for packed windows; a {domain.source} source takes none")
        if domain.samples != "packed":
            raise ConfigError(f"{where}: samples: documents needs a document source; a {domain.source} source has "
                              "windows")  # fmt: skip
        return cls(**path, **{**given, **domain.options})
    except (ConfigError, NothingToVerify):
        raise
    except FileNotFoundError as error:
        raise ConfigError(f"{where}: file not found: {error.filename or domain.path}") from None
    except (ValueError, TypeError, SourceError, ImportError, InputError) as error:
        raise ConfigError(f"{where}: {error}") from None


def check_vocabulary(config: MixtureConfig, sources: list[Source]) -> None:
    """Token-bin files must hold ids of the mixture's vocabulary: ``vocab_size`` where the file gives it,
    else the tokenizer's (one given in the config, or the byte tokenizer that tokenizes its text domains).
    A pure token-bin mixture with neither has no known vocabulary: its largest ids are logged as a warning,
    so that a file read with the wrong ``dtype`` (ids in the millions) does not pass unseen.

    With ``verify: sampled`` or ``full`` each token-bin file is also checked against the checksums recorded
    when it was first scanned."""
    tokenized = [s for s in sources if isinstance(s, TokenizedSource)]
    vocabularies = {s.tokenizer.vocab_size for s in tokenized}
    if len(vocabularies) > 1:
        first = tokenized[0]
        other = next(s for s in tokenized if s.tokenizer.vocab_size != first.tokenizer.vocab_size)
        raise ConfigError(
            f"the domains' tokenizers have different vocabularies ({first.tokenizer.name}: "
            f"{first.tokenizer.vocab_size}, {other.tokenizer.name}: {other.tokenizer.vocab_size}): one batch "
            "would mix ids that mean different things"
        )
    if config.vocab_size is not None and vocabularies and config.vocab_size < min(vocabularies):
        raise ConfigError(
            f"vocab_size {config.vocab_size} is smaller than the tokenizer's {min(vocabularies)} ids "
            f"({tokenized[0].tokenizer.name}): the model could not embed every token"
        )
    tokenizer_known = config.tokenizer is not None or bool(tokenized) or any(d.tokenizer for d in config.domains)
    unchecked = []
    for domain, source in zip(config.domains, sources):
        # files of token ids written by another's tokenizer (token-bin, Megatron): their ids are checked
        if not hasattr(source, "max_token") or not isinstance(source.transform, TokenWindow):
            continue
        largest = source.max_token(config.cache_dir)  # the first scan records the checksums verify compares with
        if config.verify != "lengths":
            try:
                source.verify(config.verify, config.cache_dir)
            except SourceError as error:
                raise ConfigError(f"domain {domain.name!r}: {error}") from None
        tokenizer = tokenizer_of(config, domain) if tokenizer_known else None
        source.tokenizer = tokenizer
        limit = config.vocab_size or (tokenizer.vocab_size if tokenizer is not None else None)
        if limit is None:
            unchecked.append(f"{domain.name} {largest:,}")
        elif largest >= limit:
            if config.vocab_size is not None:
                hint = f"vocab_size is {config.vocab_size}: check the file's dtype ({source.dtype.name}) and vocab_size"
            elif config.tokenizer is None and domain.tokenizer is None:
                hint = (
                    "the text domains are tokenized with the byte tokenizer by default: set tokenizer: to the one "
                    "this file was written with"
                )
            else:
                hint = f"it was written with another tokenizer, or is not {source.dtype.name} data (dtype:)"
            name = f"vocab_size {config.vocab_size}" if config.vocab_size is not None else tokenizer.name
            raise ConfigError(
                f"domain {domain.name!r}: {domain.path} holds token id {largest}, but {name} has {limit} ids ({hint})"
            )
    if unchecked:
        log.warning(
            "the mixture names no tokenizer and no vocab_size, so token ids are not checked; the largest are: %s. "
            "Set vocab_size: (or tokenizer:) in the mixture file to have them checked",
            ", ".join(unchecked),
        )


def initial_weights(config: MixtureConfig, sources: list[Source]) -> np.ndarray:
    """The configured weights, the importance prior, or the temperature rule over the domain sizes."""
    if config.domains[0].weight is not None:
        return check_weights([d.weight for d in config.domains], config.names)
    if config.importance is not None and config.importance.prior_temperature is not None:
        return estimator(config).domain_prior(config.names, config.importance.prior_temperature)
    return temperature_weights([len(source) for source in sources], config.temperature)


def plan_spec(config: MixtureConfig, sources: list[Source]) -> PlanSpec:
    """What the plan needs: domain sizes and caps, shard orders, importance-resampled epochs."""
    resampled = resampled_orders(config, sources)
    sizes = [len(source) if order is None else order.size for source, order in zip(sources, resampled)]
    shards = []
    for domain, source, order in zip(config.domains, sources, resampled):
        if domain.order == "shards" and source.shard_sizes is None:
            raise ConfigError(f"domain {domain.name!r}: order: shards needs a sharded source, not {domain.source}")
        if domain.order == "shards" and order is not None:
            raise ConfigError(f"domain {domain.name!r}: order: shards and importance resampling exclude each other")
        shards.append(source.shard_sizes if domain.order == "shards" else None)
    caps = []
    for domain, size in zip(config.domains, sizes):
        if domain.max_epochs is None:
            caps.append(UNLIMITED)
            continue
        cap = math.floor(domain.max_epochs * size)
        if cap < 1:
            raise ConfigError(f"domain {domain.name!r}: max_epochs {domain.max_epochs} allows no sample of {size}")
        caps.append(cap)
    return PlanSpec(
        sizes, caps, config.seed, config.global_batch_size, config.sampling, tuple(shards), tuple(resampled)
    )


# ----------------------------------------------------------------------------- importance


def estimator(config: MixtureConfig) -> ImportanceEstimator:
    """The ``importance.estimator`` file, loaded once per process while it is unchanged (a dataset's build and its
    mixer ask for it up to three times: the prior, the online acceptance, the bandit's neighbours)."""
    if config.importance is None or config.importance.estimator is None:
        raise ConfigError("importance: this needs an estimator (importance.estimator: FILE)")
    path = Path(config.importance.estimator)
    try:
        stat = path.stat()
        return _load_estimator(str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    except FileNotFoundError:
        raise ConfigError(f"importance.estimator: file not found: {path}") from None
    except ImportanceError as error:
        raise ConfigError(f"importance.estimator: {error}") from None


@functools.lru_cache(maxsize=4)
def _load_estimator(path: str, size: int, mtime_ns: int) -> ImportanceEstimator:
    """The estimator at ``path`` (its size and modification time in the key: a rewritten file is read again)."""
    return ImportanceEstimator.load(path)


def domain_features(config: MixtureConfig) -> np.ndarray:
    """Each domain's hashed n-gram profile in the importance estimator (log counts, ``(k, buckets)``): which
    domains are neighbours, for the cluster bandit's shared credit."""
    fitted = estimator(config)
    missing = [name for name in config.names if name not in fitted.raw]
    if missing:
        raise ConfigError(
            f"importance.estimator has no n-gram counts for domain {missing[0]!r} (it was fitted with "
            f"{sorted(fitted.raw)}): refit it with this mixture file's domains"
        )
    return np.log1p(np.stack([fitted.raw[name] for name in config.names]))


def importance_roles(config: MixtureConfig) -> dict[str, str]:
    """``{domain: "resampled" | "accepted"}`` for the domains the importance section applies to."""
    section = config.importance
    if section is None:
        return {}
    roles = {}
    for name in section.domains or config.names:
        if section.sidecars is not None and sidecar_paths(section.sidecars, name)[0].exists():
            roles[name] = "resampled"
        elif section.estimator is not None and (section.domains or section.sidecars is None):
            roles[name] = "accepted"
        elif section.domains:
            raise ConfigError(f"importance: domain {name!r} has no sidecar in {section.sidecars} and no estimator")
    return roles


def resampled_orders(config: MixtureConfig, sources: list[Source]) -> list[ResampledOrder | None]:
    """Per domain, how importance resampling draws its epochs (``None``: not resampled)."""
    section, roles = config.importance, importance_roles(config)
    orders: list[ResampledOrder | None] = []
    for name, source in zip(config.names, sources):
        if roles.get(name) != "resampled":
            orders.append(None)
            continue
        try:
            log_weights = load_sidecar(section.sidecars, name, source, section.field)
        except ImportanceError as error:
            raise ConfigError(f"importance: {error}") from None
        drawable = int(np.isfinite(log_weights).sum())
        if not drawable:
            raise ConfigError(f"importance: every sample of domain {name!r} is too short to have a weight")
        orders.append(ResampledOrder(log_weights, section.beta, max(1, math.ceil(section.keep * drawable))))
    return orders


def online_acceptance(config: MixtureConfig, sources: list[Source]) -> dict[int, OnlineAcceptance]:
    """The online accept/reject of each ``accepted`` domain, calibrated (its ``tau``) on a warm-up sample."""
    section, roles = config.importance, importance_roles(config)
    accepted = [d for d, name in enumerate(config.names) if roles.get(name) == "accepted"]
    if not accepted:
        return {}
    fitted = estimator(config)
    try:
        return {
            d: OnlineAcceptance(
                fitted,
                config.names[d],
                d,
                sources[d],
                config.seed,
                section.beta,
                max_reads=section.max_reads,
                field=section.field,
            ).calibrate(section.accept_quantile, section.warmup)
            for d in accepted
        }
    except ImportanceError as error:
        raise ConfigError(f"importance: {error}") from None
