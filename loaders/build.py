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

import math

import numpy as np
from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.importance.acceptance import OnlineAcceptance
from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator
from onlinemix.loaders.importance.sidecars import load_sidecar, sidecar_paths
from onlinemix.loaders.plan import UNLIMITED, PlanSpec, ResampledOrder
from onlinemix.loaders.sources import SOURCES, Source
from onlinemix.loaders.transforms import ImportedTransform
from onlinemix.mixing.simplex import check_weights, temperature_weights


def build_sources(config: MixtureConfig) -> list[Source]:
    """Open every domain's source (index files are built here); errors name the domain."""
    sources = []
    for domain in config.domains:
        transform_spec = domain.transform or config.transform
        transform = ImportedTransform(transform_spec) if transform_spec else None
        try:
            source = SOURCES[domain.source](domain.path, config.seq_len, transform=transform, **domain.options)
        except FileNotFoundError:
            raise ConfigError(f"domain {domain.name!r}: file not found: {domain.path}") from None
        except ValueError as error:
            raise ConfigError(f"domain {domain.name!r}: {error}") from None
        if len(source) == 0:
            raise ConfigError(
                f"domain {domain.name!r}: {domain.path} holds no samples "
                f"(a {domain.source} sample needs seq_len + 1 = {config.seq_len + 1} tokens / one document)"
            )
        sources.append(source)
    return sources


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
    """The ``importance.estimator`` file, loaded."""
    if config.importance is None or config.importance.estimator is None:
        raise ConfigError("importance: this needs an estimator (importance.estimator: FILE)")
    try:
        return ImportanceEstimator.load(config.importance.estimator)
    except ImportanceError as error:
        raise ConfigError(f"importance.estimator: {error}") from None


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
