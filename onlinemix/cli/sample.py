"""``onlinemix sample CONFIG --batches N``: the exact batches training would see, as JSON lines."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from onlinemix.cli.common import Commands, command, load_mixture
from onlinemix.loaders.dataset import MixedDataset
from onlinemix.loaders.loader import MixedLoader
from onlinemix.loaders.plan import PlanState, fast_forward
from onlinemix.mixing.schedule_log import replay_schedule

# each command's (or action's) one-line help and its description, as --help shows them
ABOUT = {
    "sample": (
        "print the (domain, index) pairs of each batch, in training order, as JSON lines",
        'Print one JSON line per global batch: {"batch": b, "samples": [[domain, index], ...]}, in the exact '
        "order training sees them. The output does not depend on --workers, and --start B prints exactly the "
        "lines an uninterrupted run prints from batch B on.",
    ),
}


def run(args: argparse.Namespace) -> None:
    """Print one line per global batch: its (domain, index) pairs in training order."""
    config = load_mixture(args.config)
    dataset = MixedDataset.from_config(
        config, rank=args.rank, world_size=args.world_size, num_batches=args.start + args.batches
    )
    if args.schedule is not None:
        dataset.schedule = replay_schedule(args.schedule, dataset, past_end=args.past_end)
    loader = MixedLoader(dataset, num_workers=args.workers)
    if args.start:
        start = fast_forward(dataset.spec, PlanState.start(dataset.spec.num_domains), args.start, dataset.schedule)
        loader.start_at(start)
    names = np.array(dataset.names)
    for offset, batch in enumerate(loader):
        domains = names[batch["domain"].numpy()].tolist() if args.names else batch["domain"].tolist()
        pairs = [list(pair) for pair in zip(domains, batch["index"].tolist())]
        print(json.dumps({"batch": args.start + offset, "samples": pairs}, separators=(",", ":")))


def add(commands: Commands) -> None:
    """The ``sample`` parser."""
    parser = command(commands, "sample", *ABOUT["sample"], run)
    parser.add_argument("config", help="the YAML mixture file")
    parser.add_argument("--batches", type=int, required=True, help="how many batches to print")
    parser.add_argument("--start", type=int, default=0, help="first batch index (default 0)")
    parser.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0; same output)")
    parser.add_argument("--rank", type=int, default=0, help="print this rank's slice (default 0)")
    parser.add_argument("--world-size", type=int, default=1, help="number of data-parallel ranks (default 1)")
    parser.add_argument("--format", choices=["jsonl"], default="jsonl", help="output format (default jsonl)")
    parser.add_argument(
        "--schedule", type=Path, help="replay the weights recorded in this schedule log (as the recorded run saw them)"
    )
    parser.add_argument(
        "--past-end",
        choices=["error", "hold"],
        default="error",
        help="with --schedule: batches after the recorded run are an error (default) or keep its last weights",
    )
    parser.add_argument("--names", action="store_true", help="print domain names instead of domain indices")
