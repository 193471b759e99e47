"""``onlinemix importance fit|score|report``: per-document scores (DSIR, a classifier, CoLoR-Filter) for a mixture.

::

    onlinemix importance fit --target target.jsonl --config mixture.yaml -o est.npz
    onlinemix importance score est.npz --config mixture.yaml --out weights/
    onlinemix importance report est.npz --config mixture.yaml --sidecars weights/ --plot hist.png

``fit`` counts n-grams of the target (files, or a domain of the config) and
of up to ``--raw-docs`` documents per domain, drawn uniformly at random from
the whole domain (not its first lines). ``score`` writes one sidecar per
domain, ``<domain>.importance.npy`` (float64 log weights, ``-inf`` for short
documents) with ``<domain>.importance.json`` (the estimator's fingerprint and
the source's length and content hash): it works in chunks and resumes where an
interrupted run stopped. ``report`` prints per-domain statistics (with each domain's
divergence from the target and the mixture prior it implies) and draws a
histogram of the log weights.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from tqdm import tqdm

from onlinemix.loaders.build import build_sources, open_source
from onlinemix.loaders.config import MixtureConfig
from onlinemix.loaders.convert import input_files, read_documents
from onlinemix.loaders.engines import ENGINES, engine_runner
from onlinemix.loaders.extras import pyplot
from onlinemix.loaders.help_format import DefaultsFormatter
from onlinemix.loaders.importance.classifier import HashedClassifier
from onlinemix.loaders.importance.color_filter import fine_tune_conditional
from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator, NgramHasher
from onlinemix.loaders.importance.scorers import SCORERS, Scorer, file_kind, load_scorer
from onlinemix.loaders.importance.sidecars import domain_texts, load_sidecar, sidecar_paths, source_fingerprint
from onlinemix.loaders.sources import Source

CHUNK = 4096  # documents scored between two progress saves


def _domains(config: MixtureConfig) -> dict[str, Source]:
    return dict(zip(config.names, build_sources(config)))


# -- fit ------------------------------------------------------------------------------------------


def fit(args: argparse.Namespace) -> None:
    """``onlinemix importance fit``."""
    if args.scorer == "color-filter":
        fit_color_filter(args)
        return
    if args.prior:
        raise ImportanceError("--prior is for --scorer color-filter (the model the target fine-tunes)")
    if args.config is None:
        raise ImportanceError(f"--scorer {args.scorer} needs --config: the mixture whose domains are the raw data")
    config = MixtureConfig.load(args.config)
    sources = _domains(config)
    rng = np.random.default_rng(args.seed)
    if args.target_domain:
        if args.target_domain not in sources:
            raise ImportanceError(f"--target-domain {args.target_domain!r} is not a domain of {args.config}")
        source = sources[args.target_domain]
        target = domain_texts(source, np.arange(len(source)), args.field)
    else:
        target = _read_files(args.target, args.field, "target")
    raw = {}
    for name, source in tqdm(sources.items(), desc="raw domains", unit="domain"):
        size = len(source)
        indices = np.sort(rng.choice(size, min(args.raw_docs, size), replace=False))  # uniform over the domain
        raw[name] = domain_texts(source, indices, args.field)
    hasher = NgramHasher(args.buckets, args.ngrams, args.seed, args.hash)
    if args.scorer == "dsir":
        if args.negative:
            raise ImportanceError("--negative is for --scorer classifier (DSIR fits each domain's own distribution)")
        estimator = ImportanceEstimator.fit(target, raw, hasher, args.alpha, args.min_words)
        estimator.save(args.output)
        print(
            f"wrote {args.output}: target {len(target)} documents, "
            + ", ".join(f"{n} {len(t)}" for n, t in raw.items())
        )
        return
    # the classifier: the target's documents against the negatives given, or against the domains' sample
    negative = (
        _read_files(args.negative, args.field, "negative")
        if args.negative
        else [t for texts in raw.values() for t in texts]
    )
    classifier = HashedClassifier.fit(target, negative, hasher, args.l2, args.min_words)
    classifier.save(args.output)
    print(f"wrote {args.output}: a classifier of {len(target)} target documents against {len(negative)} others")


def fit_color_filter(args: argparse.Namespace) -> None:
    """``fit --scorer color-filter``: the prior fine-tuned on the target (``color_filter.fine_tune_conditional``)."""
    if args.prior is None:
        raise ImportanceError(
            "--scorer color-filter needs --prior DIR: a transformers causal LM trained on general data"
        )
    if args.target is None:
        raise ImportanceError("--scorer color-filter fine-tunes on --target files (not --target-domain)")
    target = _read_files(args.target, args.field, "target")
    written = fine_tune_conditional(args.prior, target, args.output, steps=args.steps, lr=args.lr,
                                    batch_size=args.batch_size, max_tokens=args.max_tokens, seed=args.seed,
                                    device=args.device)  # fmt: skip
    print(f"wrote {written}: {args.prior} fine-tuned {args.steps} steps on {len(target)} target documents")


def _read_files(paths: list[Path], field: str, what: str) -> list[str]:
    """Every document of ``paths`` (files or folders: JSONL, text, ...), with a progress bar."""
    files = input_files(paths, "*")
    with tqdm(total=sum(f.stat().st_size for f in files), unit="B", unit_scale=True, desc=what) as bar:
        return list(read_documents(files, field, bar))


# -- score ----------------------------------------------------------------------------------------


def score_domain(scorer: Scorer, name: str, source: Source, folder: Path, field: str) -> dict:
    """Score every document of one domain into its sidecar, resuming a partial one (made by the same scorer of the
    same source; anything else is scored afresh)."""
    weights_path, meta_path = sidecar_paths(folder, name)
    expected = {"estimator": scorer.fingerprint(), "source": source_fingerprint(source, field), "field": field}
    meta = json.loads(meta_path.read_text()) if meta_path.exists() and weights_path.exists() else None
    if meta is not None and {key: meta.get(key) for key in expected} == expected:
        weights = np.load(weights_path, mmap_mode="r+")
    else:
        meta = {**expected, "done": 0, "short": 0}
        weights = np.lib.format.open_memmap(weights_path, mode="w+", dtype=np.float64, shape=(len(source),))
    size = len(source)
    with tqdm(total=size, initial=meta["done"], desc=name, unit="doc") as bar:
        while meta["done"] < size:
            indices = np.arange(meta["done"], min(size, meta["done"] + CHUNK))
            scores, words = scorer.score(domain_texts(source, indices, field), name)
            weights[indices] = scores
            weights.flush()
            meta["short"] += int((words < scorer.min_words).sum())
            meta["done"] = int(indices[-1]) + 1
            meta_path.write_text(json.dumps(meta))
            bar.update(len(indices))
    return meta


def score_task(scorer_file: str, kind: str | None, config_path: str, name: str, out: str, field: str) -> dict:
    """Score one domain into its sidecar (in whichever process the engine runs it: it opens only its own domain,
    which ``score`` has checked and built first); returns the sidecar's meta."""
    scorer = load_scorer(scorer_file, kind)
    config = MixtureConfig.load(config_path)
    source = open_source(config, next(domain for domain in config.domains if domain.name == name))
    return score_domain(scorer, name, source, Path(out), field)


def score(args: argparse.Namespace) -> None:
    """``onlinemix importance score``: every domain, one at a time or ``--workers`` at a time on ``--engine``."""
    if args.workers < 1:
        raise ImportanceError(f"--workers must be >= 1, got {args.workers}")
    sources = _domains(MixtureConfig.load(args.config))  # checked (and token caches built) once, here
    names = list(sources)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.workers == 1 and args.engine == "local":  # in this process, a progress bar per domain
        scorer = load_scorer(args.estimator, args.scorer)
        metas = {name: score_domain(scorer, name, source, args.out, args.field) for name, source in sources.items()}
    else:  # each task loads the scorer and opens its domain itself; a bar counts the domains
        paths = [str(Path(p).resolve()) for p in (args.estimator, args.config, args.out)]
        tasks = [(paths[0], args.scorer, paths[1], name, paths[2], args.field) for name in names]
        with (
            tqdm(total=len(tasks), desc="scoring", unit="domain") as bar,
            engine_runner(args.engine, min(args.workers, len(tasks)), score_task) as run,
        ):
            metas = {task[3]: meta for task, meta in run(tasks, bar).items()}
    for name in names:
        meta = metas[name]
        print(f"{name}: {meta['done']} documents scored ({meta['short']} short) -> {sidecar_paths(args.out, name)[0]}")


# -- report ---------------------------------------------------------------------------------------


def effective_sample_size(log_weights: np.ndarray) -> float:
    """``(Σ w)² / Σ w²`` of ``w = exp(log_weights)``, computed without overflow; ``-inf`` entries are 0."""
    finite = log_weights[np.isfinite(log_weights)]
    if not len(finite):
        return 0.0
    scaled = np.exp(finite - finite.max())
    return float(scaled.sum() ** 2 / (scaled**2).sum())


def report(args: argparse.Namespace) -> None:
    """``onlinemix importance report``."""
    if file_kind(args.estimator) != "dsir":
        raise ImportanceError(f"{args.estimator}: report needs a DSIR estimator (it reads each domain's distribution)")
    estimator = ImportanceEstimator.load(args.estimator)
    rows, histograms = [], {}
    domains = _domains(MixtureConfig.load(args.config))
    prior = dict(zip(domains, estimator.domain_prior(list(domains), args.prior_temperature)))
    for name, source in domains.items():
        weights = load_sidecar(args.sidecars, name, source, args.field)
        finite = np.isfinite(weights)
        k = max(1, int(args.top * finite.sum()))
        top = np.sort(np.argsort(-np.where(finite, weights, -np.inf), kind="stable")[:k])
        selected = estimator.hasher.counts(domain_texts(source, top, args.field))
        rows.append(
            (
                name,
                len(weights),
                int((~finite).sum()),
                float(weights[finite].mean()) if finite.any() else float("nan"),
                effective_sample_size(weights),
                effective_sample_size(args.beta * weights),
                estimator.kl_reduction(selected, name),
                estimator.divergence(name),
                prior[name],
            )
        )
        histograms[name] = weights[finite]
    header = (
        f"{'domain':12} {'docs':>9} {'short':>7} {'mean log w':>11} {'ESS':>9} {'ESS(beta)':>10} {'KL red.':>8}"
        f" {'KL(t||d)':>9} {'prior':>6}"
    )
    print(
        header + f"   (beta={args.beta}, KL reduction of the top {args.top:.0%}, "
        f"prior ∝ exp(-KL / {args.prior_temperature:g}))"
    )
    for name, docs, short, mean, ess, tempered, kl, divergence, weight in rows:
        print(
            f"{name:12} {docs:9d} {short:7d} {mean:11.2f} {ess:9.1f} {tempered:10.1f} {kl:8.4f}"
            f" {divergence:9.4f} {weight:6.3f}"
        )
    if args.plot:
        plt = pyplot()

        # Log weights are sums over a document's n-grams: a few long documents sit far out. The axis spans the
        # 1st to 99th percentile of all domains (what is outside is counted in the title), and each domain is
        # drawn as a density, so a small domain is as visible as a large one.
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
            xlabel="log importance weight (log p_target − log p_domain, summed over the document's n-grams)",
            ylabel="density",
            title=f"DSIR log importance weights\n({outside:,} of {len(everything):,} documents outside the axis, "
            "drawn at its ends)",
        )
        axis.legend(fontsize=8)
        figure.tight_layout()
        figure.savefig(args.plot, dpi=90)
        print(f"wrote {args.plot}")


# -- parser ---------------------------------------------------------------------------------------


def add_importance(commands: argparse._SubParsersAction) -> None:
    """Add the ``importance`` subcommands to the ``onlinemix`` parser."""
    parser = commands.add_parser(
        "importance",
        help="per-document scores (DSIR, classifier, CoLoR-Filter): fit a scorer, score domains, report",
        description=__doc__.split("\n\n")[0],
    )
    actions = parser.add_subparsers(dest="importance_command", required=True, metavar="ACTION")

    fit_parser = actions.add_parser(
        "fit",
        help="fit a scorer (DSIR's n-gram distributions, a classifier, or CoLoR-Filter's pair of models)",
        description="Hash the unigrams and bigrams of a target (files, or a domain of the mixture) and of a uniform "
        "sample of every domain. --scorer dsir (default) saves both distributions as an estimator file (.npz) for "
        "score, report and the mixture file's importance: section; --scorer classifier fits logistic regression "
        "of the target's documents against the domains' sample (or --negative files) and saves it for score; "
        "--scorer color-filter fine-tunes the --prior model (a transformers checkpoint) on the target, saves it "
        "beside -o and writes -o (.json) naming both, for score (CoLoR-Filter's conditional loss reduction).",
        formatter_class=DefaultsFormatter,
    )
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
    fit_parser.add_argument("--raw-docs", type=int, default=10_000, help="documents sampled per domain (uniformly)")
    fit_parser.add_argument("--buckets", type=int, default=10_000, help="hash buckets (more: fewer collisions)")
    fit_parser.add_argument("--ngrams", type=int, choices=(1, 2), default=2, help="2: unigrams and bigrams")
    fit_parser.add_argument("--hash", choices=("fast", "sha256"), default="fast", help="sha256: data-selection's")
    fit_parser.add_argument("--seed", type=int, default=0, help="hash key and raw-document sample")
    fit_parser.add_argument("--alpha", type=float, default=1.0, help="Laplace smoothing added to every bucket")
    fit_parser.add_argument("--min-words", type=int, default=1, help="shorter documents get weight 0 (counted)")
    fit_parser.set_defaults(run=fit)

    score_parser = actions.add_parser(
        "score",
        help="write a per-document score sidecar for every domain",
        description="Score every document of every domain with the scorer: <domain>.importance.npy (log "
        "weights or log-odds) and .json (what they were computed from) in --out. Progress is saved as it goes: a rerun "
        "continues where an interrupted one stopped.",
        formatter_class=DefaultsFormatter,
    )
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
    score_parser.set_defaults(run=score)

    report_parser = actions.add_parser(
        "report",
        help="per-domain weight statistics, KL reduction, histogram",
        description="For every domain: documents scored and too short to score, the mean log weight, the "
        "effective sample size of the raw and tempered weights, the KL reduction of a top selection, the "
        "divergence from the target and the domain prior; --plot draws the log-weight distributions.",
        formatter_class=DefaultsFormatter,
    )
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
    report_parser.set_defaults(run=report)
