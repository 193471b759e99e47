"""DSIR fit and score speed, onlinemix vs the ``data-selection`` package, on the same documents, one core.

    python benchmarks/importance_throughput.py --documents 3000

Documents: Python's standard library source cut into pieces of about 285
word/punctuation tokens (the length quoted for the package). Target: the
stdlib's docstrings. Both sides featurize the same documents in one process:

- fit: bucket counts of every document (the package: ``get_ngram_counts``
  per document, NLTK ``wordpunct`` + sha256 per n-gram);
- score: the per-document log importance weight against a fitted estimator;
- selection quality: the KL reduction (in the package's sha256 feature space)
  of the top 10% chosen by each, and the overlap of the two selections;
- the classifier scorer (``HashedClassifier``, the docstrings against the
  documents) scoring the same documents, beside DSIR's ``fast`` scorer.
"""

from __future__ import annotations

import argparse
import ast
import itertools
import sysconfig
import time
from pathlib import Path

import numpy as np

from onlinemix.loaders.importance.classifier import HashedClassifier
from onlinemix.loaders.importance.estimator import (
    WORDS,
    ImportanceEstimator,
    NgramHasher,
    kl_divergence,
    log_distribution,
)


def corpus(count: int, words_per_document: int = 285) -> tuple[list[str], list[str]]:
    """``count`` stdlib pieces of about ``words_per_document`` tokens, and the stdlib's docstrings."""
    root = Path(sysconfig.get_paths()["stdlib"])
    documents, docstrings = [], []
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="replace")
        try:
            tree = ast.parse(text)
            nodes = [n for n in ast.walk(tree) if isinstance(n, (ast.Module, ast.FunctionDef, ast.ClassDef))]
            docstrings += [d for n in nodes if (d := ast.get_docstring(n)) and len(d) > 80]
        except SyntaxError:
            pass
        spans = [m.start() for m in WORDS.finditer(text)][::words_per_document]
        documents += [text[a:b] for a, b in itertools.pairwise(spans)]
        if len(documents) >= count:
            break
    return documents[:count], docstrings


def timed(function, *args):
    start = time.perf_counter()
    result = function(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--documents", type=int, default=3000)
    parser.add_argument("--top", type=float, default=0.1)
    args = parser.parse_args()
    from data_selection.hashed_ngram_dsir import get_ngram_counts

    documents, target = corpus(args.documents)
    words = np.mean([len(WORDS.findall(d)) for d in documents])
    print(f"{len(documents)} documents of {words:.0f} tokens on average; target: {len(target)} docstrings\n")

    # fit: featurize every document
    package_counts, package_fit = timed(lambda: np.stack([get_ngram_counts(d) for d in documents]))
    rates = {"data-selection 1.0.3": len(documents) / package_fit}
    for mode in ("sha256", "fast"):
        _, seconds = timed(NgramHasher(hash=mode).counts, documents)  # a cold word cache, like the package
        rates[f"onlinemix, hash={mode}"] = len(documents) / seconds

    # score: log importance weights
    t, r = get_ngram_counts(" ".join(target)) + 1.0, package_counts.sum(0) + 1.0
    log_diff = np.log(t / t.sum()) - np.log(r / r.sum())
    package_scores, package_score = timed(lambda: np.array([log_diff @ get_ngram_counts(d) for d in documents]))
    score_rates = {"data-selection 1.0.3": len(documents) / package_score}
    selections = {"data-selection 1.0.3": package_scores}
    for mode in ("sha256", "fast"):
        estimator = ImportanceEstimator.fit(target, {"raw": documents}, NgramHasher(hash=mode))
        estimator.hasher = NgramHasher(hash=mode)  # score from a cold cache
        (scores, _), seconds = timed(estimator.score, documents, "raw")
        score_rates[f"onlinemix, hash={mode}"] = len(documents) / seconds
        selections[f"onlinemix, hash={mode}"] = scores

    # selection quality, measured in the package's feature space
    k = int(args.top * len(documents))
    log_target, log_raw = log_distribution(t - 1, 1.0), log_distribution(r - 1, 1.0)
    base = kl_divergence(log_target, log_raw)
    package_top = set(np.argsort(-package_scores)[:k].tolist())
    columns = f"fit docs/s | vs package | score docs/s | vs package | KL reduction, top {args.top:.0%} | overlap"
    print(f"| featurizer | {columns} |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    reference_fit, reference_score = rates["data-selection 1.0.3"], score_rates["data-selection 1.0.3"]
    for name in rates:
        top = np.argsort(-selections[name])[:k]
        reduction = base - kl_divergence(log_target, log_distribution(package_counts[top].sum(0), 1.0))
        overlap = len(package_top & set(top.tolist())) / k
        print(
            f"| {name} | {rates[name]:,.0f} | {rates[name] / reference_fit:.1f}x | {score_rates[name]:,.0f} | "
            f"{score_rates[name] / reference_score:.1f}x | {reduction:.4f} | {overlap:.0%} |"
        )

    # the classifier scorer: the same features, one weight per bucket, log-odds per document; interleaved with
    # DSIR's fast scorer, best of 3 rounds each (a shared machine's noise falls on both)
    classifier, fit_seconds = timed(HashedClassifier.fit, target, documents)
    estimator = ImportanceEstimator.fit(target, {"raw": documents})
    best = {"dsir": 0.0, "classifier": 0.0}
    for _ in range(3):
        best["dsir"] = max(best["dsir"], len(documents) / timed(estimator.score, documents, "raw")[1])
        best["classifier"] = max(best["classifier"], len(documents) / timed(classifier.score, documents)[1])
    print(
        f"\nclassifier scorer (hash=fast), fit on {len(target)} + {len(documents)} documents in {fit_seconds:.1f} s: "
        f"scores {best['classifier']:,.0f} docs/s against DSIR's {best['dsir']:,.0f} "
        f"({best['classifier'] / best['dsir']:.2f}x)"
    )


if __name__ == "__main__":
    main()
