"""The YAML mixture file: parsing and validation, with errors that name the key, file or domain.

Nothing here opens data: ``build.py`` turns a parsed ``MixtureConfig`` into sources, weights and a plan spec.

::

    seed: 1234                    # fixes the whole sample order
    global_batch_size: 32         # samples per optimizer step, over all ranks
    seq_len: 128                  # tokens per sample (windows hold seq_len + 1)
    vocab_size: 50304             # optional: token ids must be below it (a tokenizer gives it too)
    verify: lengths               # what opening a cache checks: lengths (default), sampled or full checksums
    weighting:
      temperature: 1.0            # only when no domain gives a weight: p ∝ size^(1/T)
      sampling: systematic        # or multinomial
    transform: pkg.mod:function   # optional, for domains without their own
    mixing: {controller: odm, lag: 16, alpha: 0.5}   # optional: OnlineMixer.from_config reads it
    importance: {sidecars: importance/, beta: 0.5, keep: 0.5}   # optional: DSIR inside the stream
    domains:                      # the order of the list fixes each domain's index
      - {name: code, source: tokenbin, path: data/code.bin, dtype: uint16, weight: 0.5}
      - {name: prose, source: jsonl, path: data/prose.jsonl, field: text, weight: 0.5, max_epochs: 2}
      - {name: web, source: webdataset, path: "shards/web-{0000..0099}.tar", order: shards}

Relative paths resolve against the config file's folder. Weights are given
for every domain or for none.

Over 400 lines on purpose: it is the file's whole grammar (every key, its type and its error message) in one
place, read top to bottom; the ``mixing:`` section is parsed in ``mixing/settings.py``.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from onlinemix.loaders.checksums import VERIFY
from onlinemix.loaders.plan import SAMPLING_METHODS
from onlinemix.loaders.sources import SOURCES
from onlinemix.loaders.storage import resolve
from onlinemix.simplex import check_weights

TOP_KEYS = (
    "seed",
    "global_batch_size",
    "seq_len",
    "weighting",
    "tokenizer",
    "vocab_size",
    "cache_dir",
    "verify",
    "transform",
    "domains",
    "mixing",
    "importance",
)
IMPORTANCE_KEYS = (
    "sidecars",
    "estimator",
    "domains",
    "beta",
    "keep",
    "accept_quantile",
    "warmup",
    "max_reads",
    "prior_temperature",
    "field",
)
WEIGHTING_KEYS = ("temperature", "sampling")
DOMAIN_KEYS = (
    "name",
    "source",
    "path",
    "weight",
    "max_epochs",
    "transform",
    "order",
    "tokenizer",
    "samples",
    "stride",
)
ORDERS = ("samples", "shards")
SAMPLES = ("packed", "documents")
# A domain's name becomes part of file names (importance sidecars): letters, digits and . _ + -, not first a dot.
DOMAIN_NAME = re.compile(r"[^\W][\w.+-]*")


class ConfigError(ValueError):
    """A mixture config that cannot be used; the message names the key, file or domain."""


class _StrictLoader(yaml.SafeLoader):
    """YAML's safe loader, except that a key given twice in one mapping is an error (YAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while reading a mapping", node.start_mark, f"found key {key!r} twice", key_node.start_mark
                )
            seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def load_yaml(path: str | Path) -> Any:
    """A YAML file's content; a missing file, bad YAML or a duplicate key is a ``ConfigError`` naming the file."""
    path = Path(path)
    try:
        return yaml.load(path.read_text(), Loader=_StrictLoader)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except IsADirectoryError:
        raise ConfigError(f"{path} is a folder, not a YAML file") from None
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not UTF-8 text ({error})") from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None


def _unknown_keys(given: dict, allowed: tuple[str, ...] | frozenset[str], where: str) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise ConfigError(f"{where}: unknown key {unknown[0]!r} (allowed: {', '.join(sorted(allowed))})")


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(choices)}, got {value!r}")
    return value


def _integer(value: Any, key: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    return value


@dataclass
class DomainConfig:
    """One entry of ``domains:``, checked; ``path`` resolved against the config's folder (a list for several)."""

    name: str
    source: str  # a built-in source's kind, or "package.module:Class"
    path: Path | str | list[str] | None
    weight: float | None = None
    max_epochs: float | None = None
    transform: str | None = None
    order: str = "samples"  # or "shards": shuffle whole shards each epoch, read each front to back
    tokenizer: Any = None  # this domain's tokenizer (None: the mixture's)
    samples: str = "packed"  # document sources: windows of the concatenated documents, or one per document
    stride: int | None = None  # packed windows: tokens between window starts (default seq_len)
    options: dict[str, Any] = field(default_factory=dict)  # source-specific keys (dtype, field, ...)


@dataclass
class ImportanceConfig:
    """The ``importance:`` section: DSIR weights inside the stream and as domain priors.

    - ``sidecars``: a folder of ``onlinemix importance score`` output. A domain
      with a sidecar there is *resampled*: each epoch draws ``keep`` of its
      samples by Gumbel-top-k on ``beta · log w`` (``loaders/plan.py``).
    - ``estimator``: an ``onlinemix importance fit`` file. A listed domain
      without a sidecar is *accepted/rejected online* in the worker
      (``loaders/importance/acceptance.py``: ``tau`` = ``accept_quantile`` of a
      ``warmup`` sample, at most ``max_reads`` candidates per slot).
      With ``prior_temperature`` (and no domain weights) the initial weights
      are ``∝ exp(−KL(target || domain) / prior_temperature)``.
    - ``domains``: which domains (default: those with a sidecar, or all when
      only an estimator is given). ``beta`` tempers: raw DSIR weights (1)
      have an effective sample size near 1; 0 ignores them.
    """

    sidecars: Path | None = None
    estimator: Path | None = None
    domains: list[str] | None = None
    beta: float = 0.5
    keep: float = 1.0
    accept_quantile: float = 0.5
    warmup: int = 512
    max_reads: int = 32
    prior_temperature: float | None = None
    field: str = "text"


@dataclass
class MixtureConfig:
    domains: list[DomainConfig]
    global_batch_size: int
    seq_len: int
    seed: int = 0
    temperature: float = 1.0
    sampling: str = "systematic"
    transform: str | None = None
    tokenizer: Any = None  # as written ("byte", a tokenizer.json path, {path, eot}); None: byte
    cache_dir: Path | str | None = None  # where token caches go: a folder or a URL (files.token_cache_root)
    vocab_size: int | None = None  # token ids must be below it (None: the tokenizer's, where one is known)
    verify: str = "lengths"  # what opening a token cache or token-bin file checks (see VERIFY)
    mixing: dict[str, Any] = field(default_factory=dict)  # read by OnlineMixer.from_config, not here
    importance: ImportanceConfig | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)  # as written, for the hash

    @property
    def names(self) -> list[str]:
        """The domains' names, in the file's order."""
        return [domain.name for domain in self.domains]

    @classmethod
    def of(cls, config: MixtureConfig | str | Path) -> MixtureConfig:
        """``config`` itself, or the mixture file it names, loaded (what every ``from_config`` accepts)."""
        return config if isinstance(config, MixtureConfig) else cls.load(config)

    @classmethod
    def load(cls, path: str | Path) -> MixtureConfig:
        """Read and validate a mixture file (nothing is opened)."""
        path = Path(path)
        return cls.from_dict(load_yaml(path), base_dir=path.parent)

    @classmethod
    def from_dict(cls, raw: Any, base_dir: str | Path = ".") -> MixtureConfig:
        """Validate a mixture given as a mapping; relative paths resolve against ``base_dir``."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a mixture config is a mapping of keys, got {type(raw).__name__}")
        _unknown_keys(raw, TOP_KEYS, "config")
        for key in ("global_batch_size", "seq_len", "domains"):
            if key not in raw:
                raise ConfigError(f"config: missing required key {key!r}")
        weighting = raw.get("weighting") or {}
        if not isinstance(weighting, dict):
            raise ConfigError(f"weighting must be a mapping, got {weighting!r}")
        _unknown_keys(weighting, WEIGHTING_KEYS, "weighting")
        temperature = weighting.get("temperature", 1.0)
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"weighting.temperature must be a number > 0, got {temperature!r}")
        sampling = weighting.get("sampling", "systematic")
        if sampling not in SAMPLING_METHODS:
            raise ConfigError(f"weighting.sampling must be one of {SAMPLING_METHODS}, got {sampling!r}")

        mixing = raw.get("mixing") or {}
        if not isinstance(mixing, dict):
            raise ConfigError(f"mixing must be a mapping, got {mixing!r}")

        domains_raw = raw["domains"]
        if not isinstance(domains_raw, list) or not domains_raw:
            raise ConfigError("domains must be a non-empty list")
        domains = [_domain(entry, i, Path(base_dir)) for i, entry in enumerate(domains_raw)]
        seen: set[str] = set()
        for domain in domains:
            if domain.name in seen:
                raise ConfigError(f"domain name {domain.name!r} appears twice")
            seen.add(domain.name)
        given = [d.name for d in domains if d.weight is not None]
        if given and len(given) != len(domains):
            missing = [d.name for d in domains if d.weight is None]
            raise ConfigError(
                f"weights must be given for every domain or for none: missing for {missing} "
                "(without any weight, weighting.temperature sets them)"
            )
        config = cls(
            domains=domains,
            global_batch_size=_integer(raw["global_batch_size"], "global_batch_size", 1),
            seq_len=_integer(raw["seq_len"], "seq_len", 1),
            seed=_integer(raw.get("seed", 0), "seed", 0),
            temperature=float(temperature),
            sampling=sampling,
            transform=_transform_spec(raw.get("transform"), "transform"),
            tokenizer=_tokenizer_spec(raw.get("tokenizer"), "tokenizer", Path(base_dir)),
            cache_dir=None
            if raw.get("cache_dir") is None
            else resolve(_string(raw["cache_dir"], "cache_dir"), base_dir),
            vocab_size=None if raw.get("vocab_size") is None else _integer(raw["vocab_size"], "vocab_size", 1),
            verify=_choice(raw.get("verify", "lengths"), "verify", VERIFY),
            mixing=dict(mixing),
            importance=_importance(raw.get("importance"), Path(base_dir), [d.name for d in domains]),
            raw=raw,
        )
        if given:
            try:
                check_weights([d.weight for d in domains], config.names, "domain weights")
            except ValueError as error:
                raise ConfigError(str(error)) from None
        return config

    def config_hash(self) -> str:
        """SHA-256 of the config as written (canonical JSON), to tie logs and checkpoints to it."""
        return hashlib.sha256(json.dumps(self.raw, sort_keys=True, default=str).encode()).hexdigest()


def _importance(raw: Any, base_dir: Path, names: list[str]) -> ImportanceConfig | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"importance must be a mapping, got {raw!r}")
    _unknown_keys(raw, IMPORTANCE_KEYS, "importance")
    if "sidecars" not in raw and "estimator" not in raw:
        raise ConfigError("importance: give sidecars (a folder of scores), an estimator (a fitted file), or both")
    section = ImportanceConfig(
        sidecars=None if raw.get("sidecars") is None else base_dir / Path(str(raw["sidecars"])).expanduser(),
        estimator=None if raw.get("estimator") is None else base_dir / Path(str(raw["estimator"])).expanduser(),
        domains=raw.get("domains"),
        field=str(raw.get("field", "text")),
    )
    if section.sidecars is not None and not section.sidecars.is_dir():
        raise ConfigError(f"importance.sidecars: not a folder: {section.sidecars}")
    if section.estimator is not None and not section.estimator.is_file():
        raise ConfigError(f"importance.estimator: file not found: {section.estimator}")
    if section.domains is not None:
        if not isinstance(section.domains, list) or not section.domains:
            raise ConfigError(f"importance.domains must be a non-empty list of domain names, got {section.domains!r}")
        unknown = [name for name in section.domains if name not in names]
        if unknown:
            raise ConfigError(f"importance.domains: {unknown[0]!r} is not a domain (domains: {names})")
    for key, low, high in (("beta", 0, math.inf), ("keep", 0, 1), ("accept_quantile", 0, 1)):
        value = raw.get(key, getattr(section, key))
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
            raise ConfigError(f"importance.{key} must be a number in [{low}, {high}], got {value!r}")
        setattr(section, key, float(value))
    if section.keep == 0:
        raise ConfigError("importance.keep must be > 0 (the fraction of a domain one epoch draws)")
    section.warmup = _integer(raw.get("warmup", section.warmup), "importance.warmup", 1)
    section.max_reads = _integer(raw.get("max_reads", section.max_reads), "importance.max_reads", 1)
    temperature = raw.get("prior_temperature")
    if temperature is not None:
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature > 0:
            raise ConfigError(f"importance.prior_temperature must be a number > 0, got {temperature!r}")
        if section.estimator is None:
            raise ConfigError("importance.prior_temperature needs importance.estimator")
        section.prior_temperature = float(temperature)
    return section


def _string(value: Any, key: str) -> str:
    if not isinstance(value, str) or not value:
        raise ConfigError(f"{key} must be a non-empty string, got {value!r}")
    return value


def _transform_spec(value: Any, key: str) -> str | None:
    if value is not None and (not isinstance(value, str) or ":" not in value):
        raise ConfigError(f"{key} must look like 'package.module:function', got {value!r}")
    return value


def _tokenizer_spec(value: Any, key: str, base_dir: Path) -> Any:
    """A ``tokenizer:`` value, checked for its form and with its path resolved (the file is opened by build)."""
    if value is None or value == "byte":
        return value
    if isinstance(value, str):
        return str(base_dir / Path(value).expanduser())
    if isinstance(value, dict) and "path" in value and set(value) <= {"path", "eot"}:
        return {**value, "path": str(base_dir / Path(_string(value["path"], f"{key}.path")).expanduser())}
    raise ConfigError(f"{key} must be 'byte', a tokenizer.json path, or {{path: ..., eot: ...}}; got {value!r}")


def _path_spec(value: Any, base_dir: Path, where: str) -> str | list[str]:
    """A domain's ``path`` (a file, folder, glob pattern, or a list of them) resolved against ``base_dir``."""
    items = value if isinstance(value, list) else [value]
    if not items or not all(isinstance(item, (str, Path)) and str(item) for item in items):
        raise ConfigError(f"{where}: path must be a file, folder or glob pattern, or a list of them; got {value!r}")
    resolved = [str(resolve(str(item), base_dir)) for item in items]
    return resolved if isinstance(value, list) else resolved[0]


def _domain(entry: Any, position: int, base_dir: Path) -> DomainConfig:
    if not isinstance(entry, dict):
        raise ConfigError(f"domains[{position}] must be a mapping, got {entry!r}")
    name = entry.get("name")
    if not isinstance(name, str) or not DOMAIN_NAME.fullmatch(name):
        raise ConfigError(
            f"domains[{position}]: name must be letters, digits and . _ + - (not starting with a dot or a symbol), "
            f"got {name!r}"
        )
    where = f"domain {name!r}"
    kind = entry.get("source")
    if kind not in SOURCES and not (isinstance(kind, str) and ":" in kind):
        raise ConfigError(
            f"{where}: source must be one of {sorted(SOURCES)} or a class as 'package.module:Class', got {kind!r}"
        )
    options_allowed = SOURCES[kind].options if kind in SOURCES else None
    if options_allowed is not None:
        _unknown_keys(entry, DOMAIN_KEYS + tuple(options_allowed), f"{where} ({kind})")
        for key, expected in options_allowed.items():
            if key in entry and (isinstance(entry[key], bool) or not isinstance(entry[key], expected)):
                names = expected.__name__ if isinstance(expected, type) else " or ".join(t.__name__ for t in expected)
                raise ConfigError(f"{where}: {key} must be a {names}, got {entry[key]!r}")
    if "path" not in entry and kind in SOURCES:
        raise ConfigError(f"{where}: missing required key 'path'")
    path = None if "path" not in entry else _path_spec(entry["path"], base_dir, where)
    if isinstance(path, list) and kind in ("tokenbin", "mds", "webdataset", "hf", "litdata"):
        raise ConfigError(f"{where}: a {kind} path is one file or folder, not a list")
    order = entry.get("order", "samples")
    if order not in ORDERS:
        raise ConfigError(f"{where}: order must be one of {ORDERS}, got {order!r}")
    samples = entry.get("samples", "packed")
    if samples not in SAMPLES:
        raise ConfigError(f"{where}: samples must be one of {SAMPLES}, got {samples!r}")
    weight = entry.get("weight")
    if weight is not None and (isinstance(weight, bool) or not isinstance(weight, (int, float))):
        raise ConfigError(f"{where}: weight must be a number, got {weight!r}")
    if weight is not None and not (math.isfinite(weight) and weight >= 0):
        raise ConfigError(f"{where}: weight must be finite and >= 0, got {weight!r}")
    max_epochs = entry.get("max_epochs")
    if max_epochs is not None and (
        isinstance(max_epochs, bool) or not isinstance(max_epochs, (int, float)) or not max_epochs > 0
    ):
        raise ConfigError(f"{where}: max_epochs must be a number > 0, got {max_epochs!r}")
    stride = None if entry.get("stride") is None else _integer(entry["stride"], f"{where}: stride", 1)
    reserved = {*DOMAIN_KEYS}
    options = {key: value for key, value in entry.items() if key not in reserved}
    return DomainConfig(
        name=name,
        source=kind,
        path=path,
        weight=None if weight is None else float(weight),
        max_epochs=max_epochs,
        transform=_transform_spec(entry.get("transform"), f"{where}: transform"),
        order=order,
        tokenizer=_tokenizer_spec(entry.get("tokenizer"), f"{where}: tokenizer", base_dir),
        samples=samples,
        stride=stride,
        options=options,
    )
