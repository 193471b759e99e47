"""The ``onlinemix`` command line.

::

    onlinemix inspect CONFIG [--steps N]        sizes, weights and epochs after N steps
    onlinemix prepare CONFIG [--workers N]      build every token cache (and DSIR sidecar) before training
    onlinemix verify CONFIG [--sampled]         check token caches and token-bin files against their checksums
    onlinemix sample CONFIG --batches N [...]   the exact batches training would see, as JSON lines
    onlinemix schedule show|export|plot LOG     a recorded weight schedule
    onlinemix convert INPUT... -o OUT --to F    text / JSONL to token-bin, MDS or WebDataset shards
    onlinemix importance fit|score|report ...   DSIR importance weights of the domains' documents
    onlinemix cache list|prune|clear            the token cache: sizes, stale entries, removing them
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml

from onlinemix.loaders import build, cache, convert
from onlinemix.loaders.channel import WeightsTimeout
from onlinemix.loaders.config import ConfigError, MixtureConfig, load_yaml
from onlinemix.loaders.dataset import MixedDataset
from onlinemix.loaders.extras import pyplot
from onlinemix.loaders.files import cache_root
from onlinemix.loaders.help_format import DefaultsFormatter
from onlinemix.loaders.importance.cli import add_importance
from onlinemix.loaders.loader import MixedLoader
from onlinemix.loaders.plan import PlanState, StreamEnded, fast_forward
from onlinemix.loaders.prepare import ENGINES, prepare
from onlinemix.loaders.sources import SourceError, TokenBinSource, TokenizedSource
from onlinemix.mixing.schedule_log import ScheduleLog, ScheduleLogError, read_schedule, replay_schedule


def _inspect(args: argparse.Namespace) -> None:
    config = MixtureConfig.load(args.config)
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
        if isinstance(source, TokenizedSource):
            meta = source.cache.meta
            if source.samples == "packed":
                what = f"{meta['documents']:,} documents, {meta['tokens']:,} tokens packed into {len(source):,} windows"
            else:
                what = (
                    f"one sample per document: {meta['documents']:,} documents, {source.dropped_tokens:,} of "
                    f"{meta['tokens']:,} tokens cut off (documents over seq_len + 1), {source.padded_samples:,} padded"
                )
            print(f"domain {name!r}: {what} ({source.tokenizer.name})")
        for shard, why in getattr(source, "skipped", {}).items():  # on_bad: skip
            print(f"domain {name!r} leaves out {shard}: {why}")


def _sample(args: argparse.Namespace) -> None:
    dataset = MixedDataset.from_config(
        args.config, rank=args.rank, world_size=args.world_size, num_batches=args.start + args.batches
    )
    if args.schedule is not None:
        dataset.schedule = replay_schedule(args.schedule, dataset, past_end=args.past_end)
    loader = MixedLoader(dataset, num_workers=args.workers)
    if args.start:
        start = fast_forward(dataset.spec, PlanState.start(dataset.spec.num_domains), args.start, dataset.schedule)
        loader.load_state_dict({**loader.state_dict(), "position": start.state_dict()})
    names = np.array(dataset.names)
    for offset, batch in enumerate(loader):
        domains = names[batch["domain"].numpy()].tolist() if args.names else batch["domain"].tolist()
        pairs = [list(pair) for pair in zip(domains, batch["index"].tolist())]
        print(json.dumps({"batch": args.start + offset, "samples": pairs}, separators=(",", ":")))


def _read_log(path: Path) -> ScheduleLog:
    log = read_schedule(path)
    if not len(log.weights):
        raise ScheduleLogError(f"{path} holds no weight versions (the run stopped before its first step)")
    return log


def _schedule_show(args: argparse.Namespace) -> None:
    log = _read_log(args.log)
    header = log.header
    steps = len(log.steps) - 1
    print(f"{args.log}: {steps} optimizer steps (weight versions 0..{steps}), {len(log.domains)} domains")
    print(f"  controller  {header.get('controller', '?')}")
    print(f"  seed        {header.get('seed', '?')}, global batch {header.get('global_batch_size', '?')}")
    print(f"  lag         {header.get('lag', '?')} (batch b drawn with version b // accumulation - lag), "
          f"accumulation {header.get('accumulation', 1)}")  # fmt: skip
    if header.get("config_hash"):
        print(f"  mixture     {header['config_hash'][:16]} (SHA-256 of the mixture file)")
    if header.get("run"):
        print(f"  run         {header['run']}")
    print(f"{'domain':<16} {'first':>8} {'min':>8} {'mean':>8} {'max':>8} {'last':>8}")
    for d, name in enumerate(log.domains):
        column = log.weights[:, d]
        print(
            f"{name:<16} {column[0]:>8.4f} {column.min():>8.4f} {column.mean():>8.4f} "
            f"{column.max():>8.4f} {column[-1]:>8.4f}"
        )


def static_weights(log: ScheduleLog, which: str) -> np.ndarray:
    """A log's ``"final"`` weights, or the ``"mean"`` over its versions (DoReMi's recipe), summing to 1."""
    weights = log.weights[-1] if which == "final" else log.weights.mean(axis=0)
    return weights / weights.sum()


def _schedule_export(args: argparse.Namespace) -> None:
    log = _read_log(args.log)
    if args.format == "yaml":
        text = _as_mixture(log, args)
    elif args.format == "csv":
        lines = [",".join(["step", *log.domains])]
        lines += [",".join([str(step), *(repr(float(w)) for w in row)]) for step, row in zip(log.steps, log.weights)]
        text = "\n".join(lines) + "\n"
    else:
        text = "".join(
            json.dumps({"step": int(step), "weights": dict(zip(log.domains, row.tolist()))}) + "\n"
            for step, row in zip(log.steps, log.weights)
        )
    if args.output is None:
        sys.stdout.write(text)
        return
    try:
        args.output.write_text(text)
    except OSError as error:
        raise ValueError(f"cannot write {args.output}: {error.strerror}") from None
    print(f"wrote {args.output}", file=sys.stderr)


def _as_mixture(log: ScheduleLog, args: argparse.Namespace) -> str:
    """Static weights of a log as YAML: a ``domains:`` list of weights, or (``--config``) a whole mixture file."""
    weights = dict(zip(log.domains, static_weights(log, args.weights).round(6).tolist()))
    what = "the mean weights" if args.weights == "mean" else "the final weights"
    about = f"# {what} of {args.log} ({log.header.get('controller', '?')} controller, {len(log.steps) - 1} steps)\n"
    if args.config is None:
        lines = [f"  - {{name: {name}, weight: {weight}}}" for name, weight in weights.items()]
        return (
            about
            + "# paste each weight into its domain of a mixture file (or pass --config MIXTURE)\ndomains:\n"
            + ("\n".join(lines) + "\n")
        )
    raw = load_yaml(args.config)
    names = [domain.get("name") for domain in raw.get("domains", [])]
    if sorted(names) != sorted(weights):
        raise ValueError(f"{args.config} has the domains {names}, {args.log} has {list(weights)}")
    for domain in raw["domains"]:
        domain["weight"] = weights[domain["name"]]
    raw.pop("mixing", None)  # the weights are static now
    return about + yaml.safe_dump(raw, sort_keys=False)


def _schedule_plot(args: argparse.Namespace) -> None:
    plt = pyplot()

    log = read_schedule(args.log)
    figure, axes = plt.subplots(figsize=(8, 4.5))
    for d, name in enumerate(log.domains):
        axes.plot(log.steps, log.weights[:, d], label=name)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("sampling weight")
    axes.set_title(f"{args.log.name}: {log.header.get('controller', 'schedule')}")
    axes.legend(loc="best")
    figure.tight_layout()
    figure.savefig(args.output, dpi=120)
    print(f"wrote {args.output}")


def _prepare(args: argparse.Namespace) -> None:
    if args.workers == 0:
        raise ValueError("--workers must be >= 1")
    results = prepare(args.config, args.workers, args.domains, args.engine)
    for result in results:
        print(f"{result.domain}: {result.status} ({result.detail}; {result.seconds:.1f} s)")
    failed = [result.domain for result in results if result.status == "failed"]
    if failed:
        raise SourceError(f"{len(failed)} of {len(results)} domains failed to prepare: {', '.join(failed)}")


def _verify(args: argparse.Namespace) -> None:
    config = MixtureConfig.load(args.config)
    how = "sampled" if args.sampled else "full"
    failed = 0
    for domain in config.domains:
        try:
            source = build.open_source(config, domain)  # checks the cache's lengths
            if isinstance(source, TokenizedSource):
                source.cache.verify(how)
                stale = [] if args.sampled else source.cache.stale_inputs()
                if stale:
                    raise SourceError(
                        f"{stale[0]} is not the file its token cache {source.cache.folder} was built from (edited in "
                        "place at the same size): delete that folder to tokenize it again"
                    )
                what = f"token cache {source.cache.folder.name}: {len(source.cache.meta.get('inputs', []))} inputs"
            elif isinstance(source, TokenBinSource):
                source.verify(how, config.cache_dir)
                what = f"token-bin, {source.num_tokens:,} tokens"
            else:
                print(f"{domain.name}: not checked (a {domain.source} source without an onlinemix cache)")
                continue
        except (ConfigError, SourceError) as error:
            failed += 1
            print(f"{domain.name}: FAILED: {error}")
            continue
        print(f"{domain.name}: ok ({what}, {how} checksums)")
    if failed:
        raise SourceError(f"{failed} of {len(config.domains)} domains failed verification")


def _cache_list(args: argparse.Namespace) -> None:
    root = cache_root(args.cache_dir)
    found = cache.entries(root)
    print(f"{root}: {len(found)} entries, {sum(e.size for e in found) / 1e6:,.1f} MB"
          + (f", {cache.leftovers(root)} lock files or partial builds" if cache.leftovers(root) else ""))  # fmt: skip
    now = time.time()
    for entry in reversed(found):  # most recently used first
        inputs = entry.inputs[0] if entry.inputs else "?"
        if len(entry.inputs) > 1:
            inputs += f" and {len(entry.inputs) - 1} more"
        status = f"STALE ({entry.stale})" if entry.stale else "ok"
        used = (now - entry.last_used) / 86400
        print(f"  {entry.folder.name}  {entry.size / 1e6:9,.1f} MB  {entry.tokens:>13,} tokens  "
              f"used {used:5.1f} days ago  {entry.tokenizer}  {inputs}  {status}")  # fmt: skip


def _cache_prune(args: argparse.Namespace) -> None:
    max_size = None if args.max_size is None else cache.parse_size(args.max_size)
    root = cache_root(args.cache_dir)
    removed = cache.prune(root, older_than_days=args.older_than, max_size=max_size, dry_run=args.dry_run)
    _report_removed(root, removed, args.dry_run)


def _cache_clear(args: argparse.Namespace) -> None:
    root = cache_root(args.cache_dir)
    _report_removed(root, cache.clear(root, dry_run=args.dry_run), args.dry_run)


def _report_removed(root: Path, removed: list[cache.CacheEntry], dry_run: bool) -> None:
    verb = "would remove" if dry_run else "removed"
    for entry in removed:
        print(f"{verb} {entry.folder.name} ({entry.size / 1e6:,.1f} MB{', ' + entry.stale if entry.stale else ''})")
    summary = f"{verb} {len(removed)} entries, {sum(e.size for e in removed) / 1e6:,.1f} MB"
    print(summary if dry_run else f"{summary}; {len(cache.entries(root))} left")


def _add_cache(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "cache",
        help="the token cache: list its entries, prune stale or old ones, clear it",
        description="Every tokenized domain has an entry in the token cache (--cache-dir, else $ONLINEMIX_CACHE_DIR, "
        "else ~/.cache/onlinemix). A changed input file or tokenizer makes a new entry and the old one is never "
        "read again (stale). $ONLINEMIX_CACHE_LIMIT (e.g. 50GB) prunes the least recently used entries after "
        "every build. An entry being built right now is never removed.",
    )
    actions = parser.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    listing = actions.add_parser("list", help="each entry's size, tokens, last use, tokenizer, inputs; stale ones")
    prune = actions.add_parser(
        "prune",
        help="remove stale entries; with options, old ones and the least recently used beyond a size",
        description="Remove the stale entries (an input file changed or gone: nothing reads them again), those "
        "--older-than asks for, then the least recently used until the rest fit --max-size; and the lock files "
        "and partial folders builds left behind.",
    )
    prune.add_argument("--older-than", type=float, metavar="DAYS", help="entries not used for this many days")
    prune.add_argument("--max-size", metavar="SIZE", help="then the least recently used until the rest fit (50GB)")
    clear = actions.add_parser("clear", help="remove every entry")
    for action, run in ((listing, _cache_list), (prune, _cache_prune), (clear, _cache_clear)):
        action.add_argument("--cache-dir", type=Path, help="the cache folder (default: as the mixtures find it)")
        if action is not listing:
            action.add_argument("--dry-run", action="store_true", help="print what would be removed, remove nothing")
        action.set_defaults(run=run)


def build_parser() -> argparse.ArgumentParser:
    """The ``onlinemix`` argument parser, every subcommand included."""
    parser = argparse.ArgumentParser(
        prog="onlinemix",
        description="Inspect and sample onlinemix mixtures. The sample order is a pure function of "
        "(seed, batch index, weights), so what these commands print is what training sees.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    inspect = commands.add_parser(
        "inspect",
        help="domain sizes, effective weights and epochs per domain after a number of steps",
        description="Open every domain of CONFIG and print its size, its effective weight and how many "
        "epochs of it the first STEPS global batches take (computed by the plan itself, so repeat caps "
        "and the renormalisation after a domain is exhausted are exact).",
    )
    inspect.add_argument("config", help="the YAML mixture file")
    inspect.add_argument("--steps", type=int, default=1000, help="global batches to account for (default 1000)")
    inspect.set_defaults(run=_inspect)

    verify = commands.add_parser(
        "verify",
        help="check every token cache and token-bin file of a mixture against its recorded checksums",
        description="Open every domain of CONFIG and check what onlinemix derived from it or recorded of it: a "
        "token cache's files against their lengths and the CRC-32 of every 16 MiB, and its input files against "
        "the full digests recorded when it was built (an edit at the same size that the sampled cache key did "
        "not see); a token-bin file against the checksums recorded when it was first scanned. Prints a line per "
        "domain; exits 1 if any fails. A full check reads everything once; --sampled reads three chunks a file.",
    )
    verify.add_argument("config", help="the YAML mixture file")
    verify.add_argument("--sampled", action="store_true", help="check three 16 MiB chunks of each file, not all")
    verify.set_defaults(run=_verify)

    prepare_command = commands.add_parser(
        "prepare",
        help="build every token cache a mixture needs before training (tokenize once, not in each job)",
        description="Open every domain of CONFIG as a training run would, which builds what a first open builds: "
        "a text domain's token cache (tokenized and packed), a token-bin file's recorded checksums. One domain per "
        "worker process; a cache is written whole or not at all, so a killed run resumes where it stopped, and it "
        "is the same file whatever the number of workers. Caches go to the mixture's cache_dir or "
        "$ONLINEMIX_CACHE_DIR (shared storage lets every node read one prepared cache). Prints a line per domain; "
        "exits 1 if any fails. Where the file resamples by DSIR sidecars and names their estimator (importance: "
        "{estimator, sidecars}), it scores each domain into its sidecar too.",
    )
    prepare_command.add_argument("config", help="the YAML mixture file")
    prepare_command.add_argument(
        "--workers", type=int, help="domains prepared at once, one process each (default: one per core)"
    )
    prepare_command.add_argument("--domains", nargs="+", metavar="NAME", help="only these domains (default: all)")
    prepare_command.add_argument(
        "--engine",
        choices=ENGINES,
        default="local",
        help="local: worker processes here (default); ray: a Ray task per domain, on the cluster at $RAY_ADDRESS or "
        "a local one (pip install 'onlinemix[ray]')",
    )
    prepare_command.set_defaults(run=_prepare)

    sample = commands.add_parser(
        "sample",
        help="print the (domain, index) pairs of each batch, in training order, as JSON lines",
        description='Print one JSON line per global batch: {"batch": b, "samples": [[domain, index], ...]}, '
        "in the exact order training sees them. The output does not depend on --workers, and --start B prints "
        "exactly the lines an uninterrupted run prints from batch B on.",
    )
    sample.add_argument("config", help="the YAML mixture file")
    sample.add_argument("--batches", type=int, required=True, help="how many batches to print")
    sample.add_argument("--start", type=int, default=0, help="first batch index (default 0)")
    sample.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0; same output)")
    sample.add_argument("--rank", type=int, default=0, help="print this rank's slice (default 0)")
    sample.add_argument("--world-size", type=int, default=1, help="number of data-parallel ranks (default 1)")
    sample.add_argument("--format", choices=["jsonl"], default="jsonl", help="output format (default jsonl)")
    sample.add_argument(
        "--schedule", type=Path, help="replay the weights recorded in this schedule log (as the recorded run saw them)"
    )
    sample.add_argument(
        "--past-end",
        choices=["error", "hold"],
        default="error",
        help="with --schedule: batches after the recorded run are an error (default) or keep its last weights",
    )
    sample.add_argument("--names", action="store_true", help="print domain names instead of domain indices")
    sample.set_defaults(run=_sample)

    schedule = commands.add_parser(
        "schedule",
        help="show, export or plot a recorded weight schedule",
        description="Read a schedule log written by OnlineMixer(log=...): every weight version of a run.",
    )
    schedule_commands = schedule.add_subparsers(dest="schedule_command", required=True, metavar="ACTION")
    show = schedule_commands.add_parser(
        "show",
        help="summary table: first, min, mean, max, last weight per domain",
        description="Print a log's header (the run, its mixture, controller, lag) as text, then each domain's "
        "first, smallest, mean, largest and last weight.",
    )
    show.add_argument("log", type=Path, help="the schedule log")
    show.set_defaults(run=_schedule_show)
    export = schedule_commands.add_parser(
        "export",
        help="every version as CSV or JSONL, or static weights as YAML for a mixture file",
        description="Write a recorded schedule in another form. csv: a row per step, a column per domain. jsonl: a "
        "line per step. yaml: static weights for another run (the proxy-to-target workflow): the mean over the "
        "run's steps (DoReMi's recipe) or its final weights, as a domains: list, or with --config as a whole "
        "mixture file with those weights (and no mixing: section).",
    )
    export.add_argument("log", type=Path, help="the schedule log")
    export.add_argument("--format", choices=["csv", "jsonl", "yaml"], default="csv", help="default csv")
    export.add_argument(
        "--weights", choices=["mean", "final"], default="mean", help="yaml: which weights (default mean)"
    )
    export.add_argument("--config", type=Path, help="yaml: a mixture file to write again with the exported weights")
    export.add_argument("-o", "--output", type=Path, help="file to write (default: standard output)")
    export.set_defaults(run=_schedule_export)
    plot = schedule_commands.add_parser(
        "plot",
        help="weights over steps, one line per domain, as a PNG",
        description="Draw each domain's weight over the run's steps (needs matplotlib: onlinemix[plot]) and say "
        "where the picture went.",
    )
    plot.add_argument("log", type=Path, help="the schedule log")
    plot.add_argument("-o", "--output", type=Path, default=Path("weights.png"), help="default weights.png")
    plot.set_defaults(run=_schedule_plot)
    _add_convert(commands)
    add_importance(commands)
    _add_cache(commands)
    return parser


def _add_convert(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "convert",
        help="tokenize text or JSONL into a token-bin file, MDS shards or WebDataset shards",
        description="Tokenize documents into a format a mixture domain can read. A .jsonl input gives one "
        "document per line (its --field), any other file is one document, a folder gives its files matching "
        "--glob. The output appears only when complete (written beside it, then renamed).",
        formatter_class=DefaultsFormatter,
    )
    parser.add_argument("inputs", nargs="+", type=Path, help="files or folders to read")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .bin file or the shard folder to write")
    parser.add_argument("--to", choices=convert.FORMATS, required=True, help="output format")
    parser.add_argument("--field", default="text", help="the text field of JSONL records")
    parser.add_argument("--glob", default="*", help="which files of an input folder to read (recursively)")
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte' (UTF-8 bytes + end-of-text 256, what the loader's ByteTokenizer reads) or the path of a "
        "Hugging Face tokenizer.json",
    )
    parser.add_argument(
        "--eot",
        help="a tokenizer file's end-of-text token, appended to every document (default: the first of "
        "<|endoftext|>, <|end_of_text|>, </s>, <eos>, ... its vocabulary has)",
    )
    parser.add_argument(
        "--pack",
        type=int,
        metavar="SEQ_LEN",
        help="shard formats: write windows of SEQ_LEN + 1 tokens of the concatenated documents instead of one "
        "sample per document (use the mixture's seq_len)",
    )
    parser.add_argument("--shard-size", default="64MB", help="shard formats: start a new shard after this much data")
    parser.add_argument("--compression", help="mds only: shard compression, e.g. zstd (mosaicml-streaming's names)")
    parser.add_argument("--keep-text", action="store_true", help="shard formats: store each document's text too")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    parser.set_defaults(run=convert.run)


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
