"""The mixture file's ``mixing:`` section, parsed and checked: which controller, its knobs, the mixer's options.

``loaders/config.py`` reads the rest of the file and keeps this section as written (the loaders know no
controller). Here it becomes a ``MixingSettings``; building the controller from it lives with the controller
(``Controller.from_settings``), building the mixer with the mixer (``OnlineMixer.from_config``). Every command
that reads a mixture file checks the whole section with ``check_mixing``, so a misspelt controller or knob is an
error before any work, not after it::

    mixing:
      controller: odm       # static (default), scheduled, doremi, odm, ado, dga, bandit
      lag: 16               # the mixer's keys: MIXER_KEYS
      coreset: {pool: 4}    # the loader draws pools of 4 batches (OnlineMixing)
      reward_scale: 0.1     # every other key is the controller's (its knobs, and the limits' knobs)
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.mixing.controllers import CONTROLLERS
from onlinemix.mixing.controllers.base import Controller, ControllerContext
from onlinemix.mixing.limits import LIMIT_KNOBS

# The mixing: keys the mixer takes; every other key of the section is the controller's.
MIXER_KEYS = ("lag", "accumulation", "log", "nonfinite", "timeout", "sync", "check_every", "repeat_warning", "steps")
NONFINITE = ("skip", "error")
SYNC = ("auto", "all_reduce", "broadcast", "none")


@dataclass(frozen=True)
class MixingSettings:
    """A checked ``mixing:`` section: the controller class and its knobs, the mixer's options, the coreset pool."""

    controller: type[Controller]
    knobs: dict[str, Any]  # the controller's keyword arguments (and the keys its from_settings reads)
    mixer: dict[str, Any]  # OnlineMixer's keyword arguments
    pool: int = 1  # coreset: {pool: k} (1: no coreset)

    def build_controller(self, initial: torch.Tensor, context: ControllerContext) -> Controller:
        """The controller, from the mixture's starting weights; an error names the section and the controller."""
        try:
            return self.controller.from_settings(initial, dict(self.knobs), context)
        except (TypeError, ValueError) as error:
            raise ConfigError(f"mixing ({self.controller.name} controller): {error}") from None


def controller_knobs(controller: type[Controller]) -> set[str]:
    """The keys a controller class takes from a mixture file: its keyword arguments (its own and ``Controller``'s),
    the limits' knobs and what its ``from_settings`` reads, for the config's errors."""
    knobs: set[str] = set(LIMIT_KNOBS) | set(controller.config_knobs)
    for cls in controller.__mro__:
        if cls is object or "__init__" not in vars(cls):
            continue
        parameters = inspect.signature(cls.__init__).parameters.values()
        knobs |= {p.name for p in parameters if p.kind is p.KEYWORD_ONLY or p.kind is p.POSITIONAL_OR_KEYWORD}
    return knobs - {"self", "initial", "device", "limits"}


def parse_mixing(section: Mapping[str, Any]) -> MixingSettings:
    """Check a ``mixing:`` section's keys (and the mixer's values): a ``ConfigError`` names what is wrong."""
    section = dict(section)
    pool = _pool_factor(section.pop("coreset", None))
    name = section.pop("controller", "static")
    if name not in CONTROLLERS:
        raise ConfigError(f"mixing.controller must be one of {sorted(CONTROLLERS)}, got {name!r}")
    cls = CONTROLLERS[name]
    mixer = {key: section.pop(key) for key in MIXER_KEYS if key in section}
    allowed = controller_knobs(cls)
    unknown = sorted(set(section) - allowed)
    if unknown:
        raise ConfigError(
            f"mixing ({name} controller): unknown key {unknown[0]!r}; the {name} controller takes "
            f"{', '.join(sorted(allowed))}, and the mixer {', '.join(MIXER_KEYS)}"
        )
    try:
        check_mixer_options(**mixer)
    except ValueError as error:  # the messages start with the key's name
        raise ConfigError(f"mixing.{error}") from None
    return MixingSettings(cls, section, mixer, pool)


def check_mixing(config: MixtureConfig) -> MixingSettings:
    """The whole ``mixing:`` section checked without opening any data: its keys, the mixer's values, and the
    controller's and its limits' values (a controller is built from uniform weights over the file's domains and
    dropped). For commands that read a mixture file but train nothing (``inspect``, ``verify``, ``prepare``)."""
    settings = parse_mixing(config.mixing)
    k = len(config.domains)
    uniform = torch.full((k,), 1 / k)
    # the bandit's neighbours come from the importance estimator; a stand-in of the right shape checks the rest
    settings.build_controller(uniform, ControllerContext(device=None, features=lambda: torch.eye(k).numpy()))
    return settings


def _integer(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def check_mixer_options(
    *,
    lag: Any = 1,
    accumulation: Any = 1,
    log: Any = None,
    nonfinite: Any = "skip",
    timeout: Any = 1.0,
    sync: Any = "auto",
    check_every: Any = 0,
    repeat_warning: Any = 0.0,
    steps: Any = None,
) -> None:
    """A ``ValueError`` starting with the key's name for the first of the mixer's options that is wrong."""
    _integer("lag", lag, 1)
    _integer("accumulation", accumulation, 1)
    _integer("check_every", check_every, 0)
    if steps is not None:
        _integer("steps", steps, 1)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a number of seconds > 0, got {timeout!r}")
    if isinstance(repeat_warning, bool) or not isinstance(repeat_warning, (int, float)) or repeat_warning < 0:
        raise ValueError(f"repeat_warning must be a number of epochs >= 0 (0: never), got {repeat_warning!r}")
    if nonfinite not in NONFINITE:
        raise ValueError(f"nonfinite must be one of {NONFINITE}, got {nonfinite!r}")
    if sync not in SYNC:
        raise ValueError(f"sync must be one of {SYNC}, got {sync!r}")
    if log is not None and not isinstance(log, (str, os.PathLike)):
        raise ValueError(f"log must be a file path, got {log!r}")


def _pool_factor(options: Any) -> int:
    """``k`` of a ``coreset: {pool: k}`` setting (1: no coreset)."""
    if options is None:
        return 1
    if not isinstance(options, Mapping) or set(options) != {"pool"}:
        raise ConfigError(f"mixing.coreset must look like {{pool: k}} (k >= 2), got {options!r}")
    pool = options["pool"]
    if not isinstance(pool, int) or isinstance(pool, bool) or pool < 2:
        raise ConfigError(f"mixing.coreset.pool must be an integer >= 2 (pools of k batches), got {pool!r}")
    return pool
