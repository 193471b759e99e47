"""What every command module shares: how help shows defaults, and how a mixture file is read and checked."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path

from onlinemix.loaders.config import MixtureConfig
from onlinemix.mixing.settings import check_mixing

Commands = argparse._SubParsersAction  # what each command module's add() adds its parser to


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each optional option with its default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default in (None, False, argparse.SUPPRESS)
        if unset or action.required or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)"


def command(
    commands: Commands, name: str, help: str, description: str, run: Callable[[argparse.Namespace], None] | None
) -> argparse.ArgumentParser:
    """Add the parser of command (or action) ``name``, whose handler is ``run`` (``None`` for a command whose
    actions have their own); returns it, for its arguments."""
    parser = commands.add_parser(name, help=help, description=description, formatter_class=DefaultsFormatter)
    parser.set_defaults(run=run)
    return parser


def load_mixture(path: str | Path) -> MixtureConfig:
    """A mixture file, read once and checked whole (its ``mixing:`` section too) before any data is opened."""
    config = MixtureConfig.load(path)
    check_mixing(config)
    return config
