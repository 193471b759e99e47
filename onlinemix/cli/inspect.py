"""``onlinemix inspect CONFIG``: each domain's size, weight and epochs after a number of steps."""

from __future__ import annotations

import argparse

from onlinemix.cli.common import Commands, command, load_mixture
from onlinemix.loaders.cache.folder import cache_root
from onlinemix.loaders.dataset import MixedDataset
from onlinemix.loaders.plan import PlanState, StreamEnded, fast_forward

# each command's (or action's) one-line help and its description, as --help shows them
ABOUT = {
    "inspect": (
        "domain sizes, effective weights and epochs per domain after a number of steps",
        "Open every domain of CONFIG and print its size, its effective weight and how many epochs of it the first"
        " STEPS global batches take (computed by the plan itself, so repeat caps and the renormalisation after a "
        "domain is exhausted are exact).",
    ),
}


def run(args: argparse.Namespace) -> None:
    """Open every domain, play the plan forward ``--steps`` batches, and print a table."""
    config = load_mixture(args.config)
    dataset = MixedDataset.from_config(config, rank=0, world_size=1)
    spec = dataset.spec
    weights = dataset.schedule.weights_for(0, 1)[0]
    state = PlanState.start(spec.num_domains)
    ended = None
    try:
        fast_forward(spec, state, args.steps, dataset.schedule)
    except StreamEnded as end:
        ended = end.batch
    weighting = "as given" if config.domains[0].weight is not None else f"by temperature {config.temperature}"
    print(
        f"{args.config}: seed {config.seed}, global batch {config.global_batch_size}, seq_len {config.seq_len}, "
        f"{config.sampling} sampling, weights {weighting}"
    )
    tokenizer = dataset.tokenizer
    known = "not given (token-bin domains only)"
    if tokenizer is not None:
        known = f"{tokenizer.name}, {tokenizer.vocab_size:,} ids, end of text {tokenizer.eot_id}"
    print(f"tokenizer: {known}; token caches in {cache_root(config.cache_dir)}")
    columns = f"{'domain':<16} {'source':<9} {'samples':>12} {'weight':>8} {'max_epochs':>10}"
    header = f"{columns} {f'epochs@{state.batch}':>14}"
    print(header)
    print("-" * len(header))
    for d, domain in enumerate(config.domains):
        epochs = state.cursors[d] / spec.sizes[d]
        cap = "-" if domain.max_epochs is None else f"{domain.max_epochs:g}"
        mark = "  (exhausted)" if state.cursors[d] >= spec.caps[d] else ""
        row = f"{domain.name:<16} {domain.source:<9} {spec.sizes[d]:>12,} {weights[d]:>8.4f} {cap:>10}"
        print(f"{row} {epochs:>14.3f}{mark}")
    if ended is not None:
        print(f"the stream ends at batch {ended}: every domain with positive weight is exhausted")
    for name, source in zip(config.names, dataset.sources):
        summary = source.summary()
        if summary:
            print(f"domain {name!r}: {summary}")
        for shard, why in getattr(source, "skipped", {}).items():  # on_bad: skip
            print(f"domain {name!r} leaves out {shard}: {why}")


def add(commands: Commands) -> None:
    """The ``inspect`` parser."""
    parser = command(commands, "inspect", *ABOUT["inspect"], run)
    parser.add_argument("config", help="the YAML mixture file")
    parser.add_argument("--steps", type=int, default=1000, help="global batches to account for (default 1000)")
