"""The ``onlinemix`` command line: one module per command, the parser assembled from them.

::

    onlinemix inspect CONFIG [--steps N]        sizes, weights and epochs after N steps
    onlinemix prepare CONFIG [--workers N]      build every token cache (and DSIR sidecar) before training
    onlinemix verify CONFIG [--sampled]         check token caches and token-bin files against their checksums
    onlinemix sample CONFIG --batches N [...]   the exact batches training would see, as JSON lines
    onlinemix schedule show|export|plot LOG     a recorded weight schedule
    onlinemix convert INPUT... -o OUT --to F    text / JSONL to token-bin, MDS or WebDataset shards
    onlinemix importance fit|score|report ...   per-sample scores (DSIR, classifier, CoLoR-Filter) of the domains
    onlinemix cache list|prune|clear            the token cache: sizes, stale entries, removing them

A command module has an ``add(commands)`` that adds its parser and sets ``run`` to its handler; handlers parse,
call the library and print. A new command is a module here and one line in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from onlinemix.cli import cache, convert, importance, inspect, prepare, sample, schedule, verify
from onlinemix.loaders.channel import WeightsTimeout
from onlinemix.loaders.config import ConfigError
from onlinemix.loaders.sources import SourceError
from onlinemix.mixing.schedule_log import ScheduleLogError

COMMANDS = (inspect, verify, prepare, sample, schedule, convert, importance, cache)  # in the order --help lists


def build_parser() -> argparse.ArgumentParser:
    """The ``onlinemix`` argument parser, every command included."""
    parser = argparse.ArgumentParser(
        prog="onlinemix",
        description="Inspect and sample onlinemix mixtures. The sample order is a pure function of "
        "(seed, batch index, weights), so what these commands print is what training sees.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        command.add(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line on ``argv`` (default: ``sys.argv``); returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="onlinemix: %(message)s")  # progress: token caches, compiling
    for name in ("steps", "batches", "start", "workers"):
        if getattr(args, name, 0) is not None and getattr(args, name, 0) < 0:
            print(f"onlinemix: error: --{name} must be >= 0", file=sys.stderr)
            return 2
    try:
        args.run(args)
    except BrokenPipeError:  # e.g. piped into `head`
        return 0
    except OSError as error:  # a missing file, a folder where a file was expected, no permission
        where = f"{error.filename}: " if error.filename else ""
        print(f"onlinemix: error: {where}{error.strerror or error}", file=sys.stderr)
        return 1
    except (ConfigError, SourceError, ScheduleLogError, ValueError, WeightsTimeout, ImportError) as error:
        print(f"onlinemix: error: {_message(error)}", file=sys.stderr)
        return 1
    return 0


def _message(error: BaseException) -> str:
    """The error's own message; for one raised in a DataLoader worker, without the worker's traceback.

    The DataLoader re-raises a worker's exception in the main process with the worker's whole traceback
    in its message ("Caught SourceError in DataLoader worker process 0. Original Traceback ..."): the
    last line of that traceback is the error itself.
    """
    text = str(error)
    if "Original Traceback (most recent call last):" not in text:
        return text
    last = text.rstrip().rpartition("\n")[2]
    return last.partition(": ")[2] or last


if __name__ == "__main__":
    sys.exit(main())
