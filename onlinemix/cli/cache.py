"""``onlinemix cache list|prune|clear``: the token cache's entries, and removing them."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from onlinemix.cli.common import Commands, command, load_mixture
from onlinemix.loaders.cache import entries
from onlinemix.loaders.cache.folder import cache_root
from onlinemix.loaders.storage import is_url

# each command's (or action's) one-line help and its description, as --help shows them
ABOUT = {
    "cache": (
        "the token cache: list its entries, prune stale or old ones, clear it",
        "Every tokenized domain has an entry in the token cache (--cache-dir, or the cache_dir of the mixture "
        "--config names, else $ONLINEMIX_CACHE_DIR, else ~/.cache/onlinemix). A changed input file or tokenizer "
        "makes a new entry and the old one is never read again (stale). $ONLINEMIX_CACHE_LIMIT (e.g. 50GB) prunes "
        "the least recently used entries after every build. An entry in use (open in a running process, its "
        "DataLoader workers included, or being built) is never removed: it is said to be kept.",
    ),
    "list": (
        "each entry's size, tokens, last use, tokenizer, inputs; stale ones",
        "List every entry, most recently used first: its size, tokens, last use, tokenizer and inputs, and whether "
        "it is stale (an input file changed or gone).",
    ),
    "prune": (
        "remove stale entries; with options, old ones and the least recently used beyond a size",
        "Remove the stale entries (an input file changed or gone: nothing reads them again), those --older-than "
        "asks for, then the least recently used until the rest fit --max-size; and the partial folders and lock "
        "files that killed or failed builds left behind.",
    ),
    "clear": (
        "remove every entry not in use",
        "Remove every entry of the cache not in use (and what builds left behind).",
    ),
}


def _root(args: argparse.Namespace) -> Path:
    """The cache folder a command acts on: ``--cache-dir``, else the ``cache_dir`` of ``--config``'s mixture, else
    ``$ONLINEMIX_CACHE_DIR`` or the user's cache folder (as a mixture without ``cache_dir`` finds it)."""
    if args.cache_dir is not None and args.config is not None:
        raise ValueError("give --cache-dir or --config, not both")
    configured = args.cache_dir
    if args.config is not None:
        configured = load_mixture(args.config).cache_dir
        if is_url(configured):
            raise ValueError(f"{args.config}'s cache_dir is {configured}: the cache commands manage a local folder")
    return cache_root(configured)


def list_entries(args: argparse.Namespace) -> None:
    """``cache list``: every entry, most recently used first."""
    root = _root(args)
    found = entries.entries(root)
    leftovers = entries.leftovers(root)
    print(f"{root}: {len(found)} entries, {sum(e.size for e in found) / 1e6:,.1f} MB"
          + (f", {leftovers} leftovers of killed or failed builds" if leftovers else ""))  # fmt: skip
    now = time.time()
    for entry in reversed(found):  # most recently used first
        inputs = entry.inputs[0] if entry.inputs else "?"
        if len(entry.inputs) > 1:
            inputs += f" and {len(entry.inputs) - 1} more"
        status = f"STALE ({entry.stale})" if entry.stale else "ok"
        used = (now - entry.last_used) / 86400
        print(f"  {entry.folder.name}  {entry.size / 1e6:9,.1f} MB  {entry.tokens:>13,} tokens  "
              f"used {used:5.1f} days ago  {entry.tokenizer} ({entry.backend})  {inputs}  {status}")  # fmt: skip


def prune(args: argparse.Namespace) -> None:
    """``cache prune``: stale entries, old ones, the least recently used beyond a size."""
    max_size = None if args.max_size is None else entries.parse_size(args.max_size)
    root, busy = _root(args), []
    removed = entries.prune(root, older_than_days=args.older_than, max_size=max_size, dry_run=args.dry_run, busy=busy)
    _report_removed(root, removed, busy, args.dry_run)


def clear(args: argparse.Namespace) -> None:
    """``cache clear``: every entry not in use."""
    root, busy = _root(args), []
    _report_removed(root, entries.clear(root, dry_run=args.dry_run, busy=busy), busy, args.dry_run)


def _report_removed(
    root: Path, removed: list[entries.CacheEntry], busy: list[entries.CacheEntry], dry_run: bool
) -> None:
    verb = "would remove" if dry_run else "removed"
    for entry in removed:
        print(f"{verb} {entry.folder.name} ({entry.size / 1e6:,.1f} MB{', ' + entry.stale if entry.stale else ''})")
    for entry in busy:
        print(f"kept {entry.folder.name} ({entry.size / 1e6:,.1f} MB): in use (open in a running process, or being "
              "built)")  # fmt: skip
    summary = f"{verb} {len(removed)} entries, {sum(e.size for e in removed) / 1e6:,.1f} MB from {root}"
    if busy:
        summary += f", kept {len(busy)} in use"
    print(summary if dry_run else f"{summary}; {len(entries.entries(root))} left")


def add(commands: Commands) -> None:
    """The ``cache`` parser and its actions."""
    actions = command(commands, "cache", *ABOUT["cache"], run=None).add_subparsers(
        dest="cache_command", required=True, metavar="ACTION"
    )
    listing = command(actions, "list", *ABOUT["list"], list_entries)
    pruning = command(actions, "prune", *ABOUT["prune"], prune)
    pruning.add_argument("--older-than", type=float, metavar="DAYS", help="entries not used for this many days")
    pruning.add_argument(
        "--max-size", metavar="SIZE", help="then the least recently used until the rest fit (a number and a unit: 50GB)"
    )
    clearing = command(actions, "clear", *ABOUT["clear"], clear)
    for action in (listing, pruning, clearing):
        folder = action.add_mutually_exclusive_group()
        folder.add_argument("--cache-dir", type=Path, help="the cache folder (default: as a mixture finds it)")
        folder.add_argument("--config", type=Path, help="a mixture file: the cache folder it uses (its cache_dir)")
        if action is not listing:
            action.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
