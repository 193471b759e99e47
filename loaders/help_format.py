"""How the command line's help shows defaults."""

from __future__ import annotations

import argparse


class DefaultsFormatter(argparse.HelpFormatter):
    """Help that ends each optional option with its default, unless it has none or its help already says it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default in (None, False, argparse.SUPPRESS)
        if unset or action.required or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)"
