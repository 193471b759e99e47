"""``onlinemix verify CONFIG``: every token cache and token-bin file of a mixture against its recorded checksums."""

from __future__ import annotations

import argparse

from onlinemix.cli.common import Commands, command, load_mixture
from onlinemix.loaders import build
from onlinemix.loaders.config import ConfigError
from onlinemix.loaders.sources import SourceError
from onlinemix.loaders.sources.base import NothingToVerify

# each command's (or action's) one-line help and its description, as --help shows them
ABOUT = {
    "verify": (
        "check every token cache and token-bin file of a mixture against its recorded checksums",
        "Open every domain of CONFIG and check what onlinemix derived from it or recorded of it: a token cache's "
        "files against their lengths and the CRC-32 of every 16 MiB, and its input files against the full digests"
        " recorded when it was built (an edit at the same size that the sampled cache key did not see); a "
        "token-bin file against the checksums recorded when it was first scanned. A cache not built yet (or a "
        "file never scanned) has nothing to compare with: it is said, and built only with --build. Prints a line "
        "per domain; exits 1 if any fails. A full check reads everything once; --sampled reads three chunks a "
        "file.",
    ),
}


def run(args: argparse.Namespace) -> None:
    """Check each domain and print a line for it; fail if any check failed."""
    config = load_mixture(args.config)
    how = "sampled" if args.sampled else "full"
    failed = 0
    for domain in config.domains:
        try:
            source = build.open_source(config, domain, build=args.build)  # checks the cache's lengths
            checked = source.verify(how, config.cache_dir)
        except NothingToVerify as nothing:
            print(f"{domain.name}: nothing to verify ({nothing}; --build builds it first)")
            continue
        except (ConfigError, SourceError) as error:
            failed += 1
            print(f"{domain.name}: FAILED: {error}")
            continue
        if checked is None:
            print(f"{domain.name}: not checked (a {domain.source} source without an onlinemix cache)")
        else:
            print(f"{domain.name}: ok ({checked}, {how} checksums)")
    if failed:
        raise SourceError(f"{failed} of {len(config.domains)} domains failed verification")


def add(commands: Commands) -> None:
    """The ``verify`` parser."""
    parser = command(commands, "verify", *ABOUT["verify"], run)
    parser.add_argument("config", help="the YAML mixture file")
    parser.add_argument("--sampled", action="store_true", help="check three 16 MiB chunks of each file, not all")
    parser.add_argument("--build", action="store_true", help="build a token cache that is not there yet, then check it")
