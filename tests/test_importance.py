"""DSIR importance weights: hashing, the estimator by hand, agreement with data-selection, CLI and sidecars."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import yaml
from conftest import write_jsonl

from onlinemix.cli import main
from onlinemix.loaders.build import build_sources
from onlinemix.loaders.config import MixtureConfig
from onlinemix.loaders.importance.estimator import ImportanceError, ImportanceEstimator, NgramHasher
from onlinemix.loaders.importance.sidecars import load_sidecar, sidecar_paths


def sha_bucket(ngram: str, buckets: int) -> int:
    return int(hashlib.sha256(ngram.encode()).hexdigest(), 16) % buckets


def test_sha256_buckets_are_the_word_punct_ngrams_hashed_by_hand():
    features = NgramHasher(num_buckets=97, hash="sha256").buckets(["Hi, THERE!", "", "ok"])
    assert features.words.tolist() == [4, 0, 1]  # hi , there !
    assert features.unigrams.tolist() == [sha_bucket(w, 97) for w in ("hi", ",", "there", "!", "ok")]
    assert features.bigrams.tolist() == [sha_bucket(b, 97) for b in ("hi ,", ", there", "there !")]


def test_fast_hash_is_stable_seeded_and_never_pairs_across_documents():
    hasher = NgramHasher(num_buckets=1 << 20)
    one = hasher.buckets(["a b", "c d"])
    assert len(one.bigrams) == 2  # "a b", "c d"; never "b c"
    assert NgramHasher(num_buckets=1 << 20).buckets(["a b", "c d"]).unigrams.tolist() == one.unigrams.tolist()
    assert NgramHasher(num_buckets=1 << 20, seed=1).buckets(["a b"]).unigrams.tolist() != one.unigrams[:2].tolist()
    together = hasher.buckets(["a b c d"])  # the same words in one document do pair up
    assert len(together.bigrams) == 3


def test_log_weights_match_a_hand_computed_example():
    hasher = NgramHasher(num_buckets=4, ngrams=1, hash="sha256")
    target, raw = ["x x y"], ["y z", "z z"]
    estimator = ImportanceEstimator.fit(target, {"d": raw}, hasher, alpha=1.0)
    bucket = {w: sha_bucket(w, 4) for w in "xyz"}
    t, r = np.zeros(4), np.zeros(4)
    for w in "xxy":
        t[bucket[w]] += 1
    for w in "yzzz":
        r[bucket[w]] += 1
    log_t, log_r = np.log((t + 1) / (t.sum() + 4)), np.log((r + 1) / (r.sum() + 4))
    expected = [(log_t - log_r)[bucket["x"]] + (log_t - log_r)[bucket["z"]], 2 * (log_t - log_r)[bucket["y"]]]
    scores, words = estimator.score(["x z", "y y"], "d")
    np.testing.assert_allclose(scores, expected)
    assert words.tolist() == [2, 2]


def test_short_documents_are_marked_and_wordless_ones_are_an_error_when_not_allowed():
    estimator = ImportanceEstimator.fit(["a b c"], {"d": ["a", "b"]}, min_words=2)
    scores, words = estimator.score(["a b", "c", "..."], "d")
    assert np.isfinite(scores[0]) and scores[1] == -np.inf and words.tolist() == [2, 1, 1]
    strict = ImportanceEstimator.fit(["a b c"], {"d": ["a"]}, min_words=0)
    with pytest.raises(ImportanceError, match="document 1 of this batch has no words"):
        strict.score(["a", "   "], "d")
    with pytest.raises(ImportanceError, match="the target is empty"):
        ImportanceEstimator.fit([], {"d": ["a"]})
    with pytest.raises(ImportanceError, match="the target has no words"):
        ImportanceEstimator.fit(["  ", ""], {"d": ["a"]})


def test_estimator_file_round_trips_and_refuses_other_files(tmp_path):
    estimator = ImportanceEstimator.fit(["a b"], {"d": ["b c"], "e": ["c d"]}, NgramHasher(64, seed=3), alpha=0.5)
    estimator.save(tmp_path / "est.npz")
    loaded = ImportanceEstimator.load(tmp_path / "est.npz")
    assert loaded.fingerprint() == estimator.fingerprint()
    assert loaded.score(["a b c"], "e")[0].tolist() == estimator.score(["a b c"], "e")[0].tolist()
    (tmp_path / "bad.npz").write_bytes(b"not numpy")
    with pytest.raises(ImportanceError, match="not an importance estimator file"):
        ImportanceEstimator.load(tmp_path / "bad.npz")


def test_agrees_with_the_data_selection_package_when_configured_alike():
    dsir = pytest.importorskip("data_selection.hashed_ngram_dsir")
    rng = np.random.default_rng(0)
    vocabulary = [f"w{i}" for i in range(300)] + [",", ".", "(", ")"]

    def documents(n, bias):
        p = np.exp(-bias * np.arange(len(vocabulary)) / 50)
        return [" ".join(rng.choice(vocabulary, 40, p=p / p.sum())) for _ in range(n)]

    target, raw = documents(50, 1.0), documents(400, 0.1)
    estimator = ImportanceEstimator.fit(target, {"raw": raw}, NgramHasher(hash="sha256"))
    ours, _ = estimator.score(raw, "raw")
    # The package's own featurizer and formula (what HashedNgramDSIR computes, without its file plumbing).
    count = lambda texts: sum(dsir.get_ngram_counts(t) for t in texts)  # noqa: E731
    t, r = count(target) + 1.0, count(raw) + 1.0
    log_diff = np.log(t / t.sum()) - np.log(r / r.sum())
    theirs = np.array([log_diff @ dsir.get_ngram_counts(text) for text in raw])
    np.testing.assert_allclose(ours, theirs, rtol=1e-9, atol=1e-9)


def test_cli_fits_scores_resumes_and_reports(tmp_path, capsys):
    write_jsonl(tmp_path / "a.jsonl", [f"def f{i}(x): return x + {i}" for i in range(60)])
    write_jsonl(tmp_path / "b.jsonl", [f"the cat sat on mat number {i}" for i in range(40)] + ["", "!"])
    write_jsonl(tmp_path / "target.jsonl", ["def g(y): return y", "def h(): return 0"])
    domains = [{"name": n, "source": "jsonl", "path": f"{n}.jsonl", "samples": "documents"} for n in "ab"]
    config = tmp_path / "mix.yaml"
    config.write_text(yaml.safe_dump({"global_batch_size": 4, "seq_len": 16, "domains": domains}))
    est, out = tmp_path / "est.npz", tmp_path / "w"
    assert main(["importance", "fit", "--target", str(tmp_path / "target.jsonl"), "--config", str(config),
                 "-o", str(est), "--raw-docs", "30", "--min-words", "2"]) == 0  # fmt: skip
    assert ImportanceEstimator.load(est).documents == {"target": 2, "a": 30, "b": 30}
    assert main(["importance", "score", str(est), "--config", str(config), "--out", str(out)]) == 0
    assert "b: 42 samples scored (2 short)" in capsys.readouterr().out  # "" has no words, "!" one: both short
    sources = dict(zip(["a", "b"], build_sources(MixtureConfig.load(config))))
    full = load_sidecar(out, "a", sources["a"]).copy()
    texts = [f"def f{i}(x): return x + {i}" for i in range(60)]
    assert full.tolist() == ImportanceEstimator.load(est).score(texts, "a")[0].tolist()

    # An interrupted run resumes where it stopped, and ends with the same weights.
    weights_path, meta_path = sidecar_paths(out, "a")
    meta = json.loads(meta_path.read_text())
    np.save(weights_path, np.where(np.arange(len(full)) < 20, full, 0.0))
    meta_path.write_text(json.dumps({**meta, "done": 20}))
    with pytest.raises(ImportanceError, match="scoring stopped at 20 of 60"):
        load_sidecar(out, "a", sources["a"])
    assert main(["importance", "score", str(est), "--config", str(config), "--out", str(out)]) == 0
    assert load_sidecar(out, "a", sources["a"]).tolist() == full.tolist()
    capsys.readouterr()

    assert main(["importance", "report", str(est), "--config", str(config), "--sidecars", str(out),
                 "--plot", str(tmp_path / "h.png")]) == 0  # fmt: skip
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["domain", "samples", "short"]
    assert lines[2].split()[:3] == ["b", "42", "2"]
    assert (tmp_path / "h.png").stat().st_size > 0

    write_jsonl(tmp_path / "a.jsonl", [f"changed {i}" for i in range(60)])  # same length, other documents
    with pytest.raises(ImportanceError, match="does not match domain 'a'"):
        load_sidecar(out, "a", build_sources(MixtureConfig.load(config))[0])
