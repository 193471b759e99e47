"""``onlinemix importance fit|score|report``: per-sample scores (DSIR, a classifier, CoLoR-Filter) for a mixture.

::

    onlinemix importance fit --target target.jsonl --config mixture.yaml -o est.npz
    onlinemix importance score est.npz --config mixture.yaml --out weights/
    onlinemix importance report est.npz --config mixture.yaml --sidecars weights/ --plot hist.png

``fit`` counts n-grams of the target (files, or a domain of the config) and of up to ``--raw-docs`` samples
per domain, drawn uniformly at random from the whole domain (not its first lines). ``score`` writes one
sidecar per domain, ``<domain>.importance.npy`` (float64 log weights, ``-inf`` for samples too short to score)
with ``<domain>.importance.json`` (the estimator's fingerprint and the source's length and content hash): it
works in chunks and resumes where an interrupted run stopped. A packed domain is scored window by window (what
the stream resamples), a per-document one document by document. ``report`` prints per-domain statistics (with
each domain's divergence from the target and the mixture prior it implies) and draws a histogram of the log
weights. The work is the library's (``loaders/importance``: ``fitting``, ``scoring``, ``report``); this
module parses and prints.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from onlinemix.cli.common import Commands, command, load_mixture
from onlinemix.loaders.build import build_sources
from onlinemix.loaders.engines import ENGINES
from onlinemix.loaders.extras import pyplot
from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator, NgramHasher
from onlinemix.loaders.importance.fitting import fit_ngram_scorer, raw_sample, read_files, target_of_domain
from onlinemix.loaders.importance.report import domain_reports
from onlinemix.loaders.importance.scorers import SCORERS, file_kind
from onlinemix.loaders.importance.scoring import score_domains
from onlinemix.loaders.importance.sidecars import sidecar_paths
from onlinemix.loaders.sources import Source

# each command's (or action's) one-line help and its description, as --help shows them
ABOUT = {
    "importance": (
        "per-sample scores (DSIR, classifier, CoLoR-Filter): fit a scorer, score domains, report",
        __doc__.split("\n\n")[0],
    ),
    "fit": (
        "fit a scorer (DSIR's n-gram distributions, a classifier, or CoLoR-Filter's pair of models)",
        "Hash the unigrams and bigrams of a target (files, or a domain of the mixture) and of a uniform sample of "
        "every domain. --scorer dsir (default) saves both distributions as an estimator file (.npz) for score, "
        "report and the mixture file's importance: section; --scorer classifier fits logistic regression of the "
        "target's documents against the domains' sample (or --negative files) and saves it for score; --scorer "
        "color-filter fine-tunes the --prior model (a transformers checkpoint) on the target, saves it beside -o "
        "and writes -o (.json) naming both, for score (CoLoR-Filter's conditional loss reduction).",
    ),
    "score": (
        "write a per-sample score sidecar for every domain",
        "Score every sample of every domain with the scorer (a window of a packed domain, a document of a "
        "per-document one): <domain>.importance.npy (log weights or log-odds) and .json (what they were computed "
        "from) in --out. Progress is saved as it goes: a rerun continues where an interrupted one stopped.",
    ),
    "report": (
        "per-domain weight statistics, KL reduction, histogram",
        "For every domain: samples scored and too short to score, the mean log weight, the effective sample size "
        "of the raw and tempered weights, the KL reduction of a top selection, the divergence from the target and "
        "the domain prior; --plot draws the log-weight distributions.",
    ),
}


def _domains(config_path: Path) -> dict[str, Source]:
    config = load_mixture(config_path)
    return dict(zip(config.names, build_sources(config)))


def fit(args: argparse.Namespace) -> None:
    """``importance fit``: DSIR's estimator, the classifier, or CoLoR-Filter's fine-tuned model."""
    if args.scorer == "color-filter":
        fit_color_filter(args)
        return
    if args.prior:
        raise ImportanceError("--prior is for --scorer color-filter (the model the target fine-tunes)")
    if args.config is None:
        raise ImportanceError(f"--scorer {args.scorer} needs --config: the mixture whose domains are the raw data")
    sources = _domains(args.config)
    if args.target_domain:
        target = target_of_domain(sources, args.target_domain, args.field)
    else:
        target = read_files(args.target, args.field, "target")
    raw = raw_sample(sources, args.raw_docs, args.seed, args.field)
    negative = read_files(args.negative, args.field, "negative") if args.negative else None
    hasher = NgramHasher(args.buckets, args.ngrams, args.seed, args.hash)
    fitted = fit_ngram_scorer(args.scorer, target, raw, hasher, alpha=args.alpha, min_words=args.min_words,
                              negative=negative, l2=args.l2)  # fmt: skip
    fitted.save(args.output)
    if args.scorer == "dsir":
        counts = ", ".join(f"{name} {len(texts)}" for name, texts in raw.items())
        print(f"wrote {args.output}: target {len(target)} samples, {counts}")
    else:
        others = len(negative) if negative else sum(map(len, raw.values()))
        print(f"wrote {args.output}: a classifier of {len(target)} target samples against {others} others")


def fit_color_filter(args: argparse.Namespace) -> None:
    """``fit --scorer color-filter``: the prior fine-tuned on the target (``fine_tune_conditional``)."""
    from onlinemix.color_filter_training import fine_tune_conditional

    if args.prior is None:
        raise ImportanceError(
            "--scorer color-filter needs --prior DIR: a transformers causal LM trained on general data"
        )
    if args.target is None:
        raise ImportanceError("--scorer color-filter fine-tunes on --target files (not --target-domain)")
    target = read_files(args.target, args.field, "target")
    written = fine_tune_conditional(args.prior, target, args.output, steps=args.steps, lr=args.lr,
                                    batch_size=args.batch_size, max_tokens=args.max_tokens, seed=args.seed,
                                    device=args.device)  # fmt: skip
    print(f"wrote {written}: {args.prior} fine-tuned {args.steps} steps on {len(target)} target documents")


def score(args: argparse.Namespace) -> None:
    """``importance score``: every domain, one at a time or ``--workers`` at a time on ``--engine``."""
    if args.workers < 1:
        raise ImportanceError(f"--workers must be >= 1, got {args.workers}")
    sources = _domains(args.config)  # checked (and token caches built) once, here
    metas = score_domains(args.estimator, args.scorer, args.config, sources, args.out, args.field, args.workers,
                          args.engine)  # fmt: skip
    for name in sources:
        meta = metas[name]
        print(f"{name}: {meta['done']} samples scored ({meta['short']} short) -> {sidecar_paths(args.out, name)[0]}")


def report(args: argparse.Namespace) -> None:
    """``importance report``: the table, and the histogram with ``--plot``."""
    if file_kind(args.estimator) != "dsir":
        raise ImportanceError(f"{args.estimator}: report needs a DSIR estimator (it reads each domain's distribution)")
    estimator = ImportanceEstimator.load(args.estimator)
    rows = domain_reports(estimator, _domains(args.config), args.sidecars, args.field, args.top, args.beta,
                          args.prior_temperature)  # fmt: skip
    header = (
        f"{'domain':12} {'samples':>9} {'short':>7} {'mean log w':>11} {'ESS':>9} {'ESS(beta)':>10} {'KL red.':>8}"
        f" {'KL(t||d)':>9} {'prior':>6}"
    )
    print(
        header + f"   (beta={args.beta}, KL reduction of the top {args.top:.0%}, "
        f"prior ∝ exp(-KL / {args.prior_temperature:g}))"
    )
    for row in rows:
        print(
            f"{row.name:12} {row.samples:9d} {row.short:7d} {row.mean:11.2f} {row.ess:9.1f} {row.tempered_ess:10.1f}"
            f" {row.kl_reduction:8.4f} {row.divergence:9.4f} {row.prior:6.3f}"
        )
    if args.plot:
        _histogram({row.name: row.log_weights for row in rows}, args.plot)


def _histogram(histograms: dict[str, np.ndarray], path: Path) -> None:
    """Each domain's log weights as a density. Log weights are sums over a sample's n-grams: a few long samples
    sit far out, so the axis spans the 1st to 99th percentile of all domains (what is outside is counted in the
    title), and each domain is drawn as a density, so a small domain is as visible as a large one."""
    plt = pyplot()
    everything = np.concatenate([w for w in histograms.values() if len(w)] or [np.zeros(1)])
    low, high = np.percentile(everything, [1, 99])
    if high <= low:
        low, high = low - 1, high + 1
    bins = np.linspace(low, high, 61)
    outside = int(((everything < low) | (everything > high)).sum())
    figure, axis = plt.subplots(figsize=(8, 4.5))
    for name, weights in histograms.items():
        axis.hist(np.clip(weights, low, high), bins=bins, density=True, histtype="step", linewidth=1.5, label=name)
    axis.set(
        xlabel="log importance weight (log p_target − log p_domain, summed over the sample's n-grams)",
        ylabel="density",
        title=f"DSIR log importance weights\n({outside:,} of {len(everything):,} samples outside the axis, "
        "drawn at its ends)",
    )
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    print(f"wrote {path}")


def add(commands: Commands) -> None:
    """The ``importance`` parser and its actions."""
    actions = command(commands, "importance", *ABOUT["importance"], run=None).add_subparsers(
        dest="importance_command", required=True, metavar="ACTION"
    )
    fit_parser = command(actions, "fit", *ABOUT["fit"], fit)
    fit_parser.add_argument(
        "--scorer",
        choices=("dsir", "classifier", "color-filter"),
        default="dsir",
        help="dsir: importance weights; classifier: log-odds; color-filter: --prior fine-tuned on the target",
    )
    fit_parser.add_argument("--prior", type=Path, help="color-filter: the prior model's folder (transformers)")
    fit_parser.add_argument("--steps", type=int, default=200, help="color-filter: fine-tuning steps on the target")
    fit_parser.add_argument("--lr", type=float, default=1e-3, help="color-filter: fine-tuning learning rate")
    fit_parser.add_argument("--batch-size", type=int, default=16, help="color-filter: documents per step")
    fit_parser.add_argument("--max-tokens", type=int, default=512, help="color-filter: tokens kept per document")
    fit_parser.add_argument("--device", default="cpu", help="color-filter: where to fine-tune and score (cpu, cuda)")
    fit_parser.add_argument("--negative", type=Path, nargs="+", help="classifier: negative examples (files or folders)")
    fit_parser.add_argument("--l2", type=float, default=1e-4, help="classifier: L2 penalty (larger: smoother scores)")
    where = fit_parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--target", type=Path, nargs="+", help="target files (.jsonl: one document per line)")
    where.add_argument("--target-domain", help="use this domain of the config as the target")
    fit_parser.add_argument("--config", type=Path, help="the mixture whose domains are the raw data (dsir, classifier)")
    fit_parser.add_argument("-o", "--output", type=Path, required=True, help="the file to write (.npz; .json)")
    fit_parser.add_argument("--raw-docs", type=int, default=10_000, help="samples read per domain (uniformly)")
    fit_parser.add_argument("--buckets", type=int, default=10_000, help="hash buckets (more: fewer collisions)")
    fit_parser.add_argument("--ngrams", type=int, choices=(1, 2), default=2, help="2: unigrams and bigrams")
    fit_parser.add_argument("--hash", choices=("fast", "sha256"), default="fast", help="sha256: data-selection's")
    fit_parser.add_argument("--seed", type=int, default=0, help="hash key and raw-document sample")
    fit_parser.add_argument("--alpha", type=float, default=1.0, help="Laplace smoothing added to every bucket")
    fit_parser.add_argument("--min-words", type=int, default=1, help="shorter samples get weight 0 (counted)")
    score_parser = command(actions, "score", *ABOUT["score"], score)
    score_parser.add_argument("estimator", type=Path, help="the file importance fit wrote (any scorer)")
    score_parser.add_argument(
        "--scorer",
        help=f"{', '.join(SCORERS)} or package.module:Class (Class.load(file) is a scorer); default: the file's",
    )
    score_parser.add_argument("--config", type=Path, required=True, help="the mixture whose domains to score")
    score_parser.add_argument("--out", type=Path, default=Path("importance"), help="sidecar folder")
    score_parser.add_argument("--workers", type=int, default=1, help="domains scored at once")
    score_parser.add_argument(
        "--engine", choices=ENGINES, default="local", help="local: worker processes here; ray: Ray tasks ($RAY_ADDRESS)"
    )
    report_parser = command(actions, "report", *ABOUT["report"], report)
    report_parser.add_argument("estimator", type=Path, help="the file importance fit wrote")
    report_parser.add_argument("--config", type=Path, required=True, help="the mixture whose domains to report")
    report_parser.add_argument("--sidecars", type=Path, default=Path("importance"), help="the folder score wrote")
    report_parser.add_argument("--top", type=float, default=0.1, help="fraction selected for the KL reduction")
    report_parser.add_argument("--beta", type=float, default=0.5, help="temperature for the tempered ESS")
    report_parser.add_argument("--plot", type=Path, help="write a histogram PNG here")
    report_parser.add_argument(
        "--prior-temperature", type=float, default=1.0, help="domain prior: weights ∝ exp(-KL(target || domain) / T)"
    )
    for sub in (fit_parser, score_parser, report_parser):
        sub.add_argument("--field", default="text", help="the text field of JSON / MDS / WebDataset records")
