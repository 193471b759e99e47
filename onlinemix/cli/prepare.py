"""``onlinemix prepare CONFIG``: build every token cache (and importance sidecar) a mixture needs, before training."""

from __future__ import annotations

import argparse

from onlinemix.cli.common import Commands, command, load_mixture
from onlinemix.loaders.cache.entries import parse_size
from onlinemix.loaders.prepare import ENGINES, prepare
from onlinemix.loaders.sources import SourceError

# each command's (or action's) one-line help and its description, as --help shows them
ABOUT = {
    "prepare": (
        "build every token cache a mixture needs before training (tokenize once, not in each job)",
        "Open every domain of CONFIG as a training run would, which builds what a first open builds: a text "
        "domain's token cache (tokenized and packed), a token-bin file's recorded checksums. One domain, file, or "
        "part of a large file per worker process; a cache is written whole or not at all, so a killed run resumes "
        "where it stopped, and it is the same file whatever the number of workers. Caches go to the mixture's "
        "cache_dir or $ONLINEMIX_CACHE_DIR (shared storage lets every node read one prepared cache). Prints a line "
        "per domain; exits 1 if any fails. Where the file resamples by DSIR sidecars and names their estimator "
        "(importance: {estimator, sidecars}), it scores each domain into its sidecar too.",
    ),
}


def run(args: argparse.Namespace) -> None:
    """Prepare the domains and print a line per domain; fail if any failed."""
    if args.workers == 0:
        raise ValueError("--workers must be >= 1")
    load_mixture(args.config)  # the whole file checked before any work
    part_size = parse_size(args.part_size)
    results = prepare(args.config, args.workers, args.domains, args.engine, part_size)
    for result in results:
        print(f"{result.domain}: {result.status} ({result.detail}; {result.seconds:.1f} s)")
    failed = [result.domain for result in results if result.status == "failed"]
    if failed:
        raise SourceError(f"{len(failed)} of {len(results)} domains failed to prepare: {', '.join(failed)}")


def add(commands: Commands) -> None:
    """The ``prepare`` parser."""
    parser = command(commands, "prepare", *ABOUT["prepare"], run)
    parser.add_argument("config", help="the YAML mixture file")
    parser.add_argument(
        "--workers", type=int, help="domains prepared at once, one process each (default: one per core)"
    )
    parser.add_argument("--domains", nargs="+", metavar="NAME", help="only these domains (default: all)")
    parser.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: worker processes here (default); ray: a Ray task per domain, on the cluster at $RAY_ADDRESS or "
        "a local one (pip install 'onlinemix[ray]')",
    )
    parser.add_argument(
        "--part-size",
        default="32MB",
        help="a large JSONL or Parquet file is tokenized in parts of about this size, one task each (default 32MB):"
        " smaller parts spread it over more workers, at a small cost per part",
    )
