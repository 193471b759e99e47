"""Per-document scorers: the hashed n-gram classifier, the one scoring interface (dsir, classifier,
package.module:Class), and their sidecars read by the stream."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl

from onlinemix import MixedDataset, MixedLoader
from onlinemix.cli import main
from onlinemix.loaders.build import build_sources
from onlinemix.loaders.config import MixtureConfig
from onlinemix.loaders.importance import HashedClassifier, ImportanceError, NgramHasher, load_scorer
from onlinemix.loaders.importance.sidecars import load_sidecar, sidecar_paths

GERMAN = ["der", "die", "das", "und", "ist", "nicht", "ein", "eine", "zu", "mit", "auf", "für", "von", "dem", "den",
          "sich", "auch"]  # fmt: skip
ENGLISH = ["the", "of", "and", "to", "in", "is", "it", "that", "for", "on", "with", "as", "was", "at", "by", "this",
           "be", "not"]  # fmt: skip


def sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, 12)) for _ in range(n)]


def test_the_classifier_ranks_unseen_documents_of_the_positive_kind_first():
    classifier = HashedClassifier.fit(sentences(GERMAN, 40, 0), sentences(ENGLISH, 200, 1))
    german, english = sentences(GERMAN, 50, 2), sentences(ENGLISH, 50, 3)
    scores, words = classifier.score(german + english + ["", "und"])
    assert words.tolist() == [12] * 100 + [0, 1]
    assert scores[:50].min() > scores[50:100].max()  # every unseen German sentence above every English one
    assert scores[:50].mean() > 0 > scores[50:100].mean()  # classes weigh alike: the log-odds straddle 0
    assert scores[100] == -np.inf and np.isfinite(scores[101])  # no words: not scorable


def test_scores_are_the_log_odds_of_the_fitted_weights_by_hand():
    hasher = NgramHasher(num_buckets=64, ngrams=1)
    classifier = HashedClassifier.fit(["a a b"], ["c c b"], hasher, l2=0.1)
    features = hasher.buckets(["a b b c"])
    frequencies = np.bincount(features.unigrams, minlength=64) / 4
    by_hand = frequencies @ classifier.weights + classifier.bias
    assert classifier.score(["a b b c"])[0][0] == pytest.approx(by_hand)
    # and those weights minimise the class-balanced, penalised logistic loss: its gradient is zero there
    x = torch.tensor(
        np.stack([np.bincount(hasher.buckets([t]).unigrams, minlength=64) / 3 for t in ["a a b", "c c b"]])
    )
    w = torch.tensor(classifier.weights, requires_grad=True)
    b = torch.tensor(classifier.bias, requires_grad=True, dtype=torch.float64)
    labels = torch.tensor([1.0, 0.0], dtype=torch.float64)
    logistic = torch.nn.functional.binary_cross_entropy_with_logits(x @ w + b, labels, reduction="sum")
    loss = 0.5 * logistic + 0.05 * (w * w).sum()  # each class weighs half; l2 / 2 = 0.05
    loss.backward()
    assert w.grad.abs().max() < 1e-5 and abs(b.grad) < 1e-5


def test_the_classifier_file_round_trips_and_other_files_are_refused(tmp_path):
    classifier = HashedClassifier.fit(sentences(GERMAN, 10, 0), sentences(ENGLISH, 10, 1))
    classifier.save(tmp_path / "clf.npz")
    loaded = load_scorer(tmp_path / "clf.npz")  # the kind read from the file
    assert isinstance(loaded, HashedClassifier) and loaded.fingerprint() == classifier.fingerprint()
    texts = sentences(GERMAN, 5, 7)
    assert loaded.score(texts)[0].tolist() == classifier.score(texts)[0].tolist()
    (tmp_path / "junk.npz").write_bytes(b"not a file")
    with pytest.raises(ImportanceError, match=r"junk\.npz: not a scorer file"):
        load_scorer(tmp_path / "junk.npz")
    with pytest.raises(ImportanceError, match="unknown scorer 'nonsense'"):
        load_scorer(tmp_path / "clf.npz", "nonsense")
    with pytest.raises(ImportanceError, match="a classifier needs examples of both kinds: got 3 positive and 0"):
        HashedClassifier.fit(["a", "b", "c"], [])


def mixture(root) -> str:
    write_jsonl(root / "german.jsonl", sentences(GERMAN, 60, 10))
    write_jsonl(root / "mixed.jsonl", sentences(ENGLISH, 60, 11) + sentences(GERMAN, 20, 12) + ["", "!"])
    write_jsonl(root / "target.jsonl", sentences(GERMAN, 30, 13))
    domains = [
        {"name": n, "source": "jsonl", "path": f"{n}.jsonl", "samples": "documents"} for n in ("german", "mixed")
    ]
    config = root / "mix.yaml"
    config.write_text(yaml.safe_dump({"global_batch_size": 8, "seq_len": 64, "domains": domains}))
    return str(config)


def test_cli_fits_a_classifier_scores_sidecars_and_the_stream_draws_the_positive_kind(tmp_path, capsys):
    config = mixture(tmp_path)
    model, out = tmp_path / "clf.npz", tmp_path / "scores"
    assert main(["importance", "fit", "--scorer", "classifier", "--target", str(tmp_path / "target.jsonl"),
                 "--config", config, "-o", str(model), "--raw-docs", "40"]) == 0  # fmt: skip
    assert HashedClassifier.load(model).documents == {"positive": 30, "negative": 80}
    assert main(["importance", "score", str(model), "--config", config, "--out", str(out)]) == 0
    assert "mixed: 82 samples scored (1 short)" in capsys.readouterr().out  # "" has no words
    sources = dict(zip(["german", "mixed"], build_sources(MixtureConfig.load(config))))
    scores = load_sidecar(out, "mixed", sources["mixed"])
    assert scores[60:80].min() > scores[:60].max()  # the German documents of the mixed domain rank first
    assert (
        json.loads(sidecar_paths(out, "mixed")[1].read_text())["estimator"]
        == HashedClassifier.load(model).fingerprint()
    )

    # The stream resamples by the classifier's scores like by DSIR's: with beta 4 and keep 0.25 an epoch of the mixed
    # domain is its 20 best-scored documents, the German ones.
    raw = yaml.safe_load((tmp_path / "mix.yaml").read_text())
    raw["domains"] = [raw["domains"][1]]
    raw["importance"] = {"sidecars": str(out), "beta": 4.0, "keep": 0.25}
    resampled = tmp_path / "resampled.yaml"
    resampled.write_text(yaml.safe_dump(raw))
    drawn = [i for batch in MixedLoader(MixedDataset.from_config(resampled, num_batches=2), num_workers=0)
             for i in batch["index"].tolist()]  # fmt: skip
    assert len(drawn) == 16 and set(drawn) <= set(range(60, 80))

    write_jsonl(tmp_path / "mixed.jsonl", sentences(ENGLISH, 82, 99))  # the source changed: its scores are refused
    with pytest.raises(ImportanceError, match="does not match domain 'mixed'"):
        load_sidecar(out, "mixed", build_sources(MixtureConfig.load(config))[1])


USER_SCORER = """
import numpy as np


class LengthScorer:
    \"\"\"A scorer of the user's: the log of the number of words (``load`` ignores the file's content).\"\"\"

    min_words = 1

    @classmethod
    def load(cls, path):
        return cls()

    def fingerprint(self):
        return "length-v1"

    def score(self, texts, domain):
        words = np.array([len(t.split()) for t in texts])
        return np.where(words >= 1, np.log(np.maximum(words, 1)), -np.inf), words
"""


def test_a_scorer_of_the_users_own_by_module_and_class(tmp_path, monkeypatch):
    config = mixture(tmp_path)
    (tmp_path / "user_scorers.py").write_text(USER_SCORER)
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("user_scorers", None)
    (tmp_path / "anything").write_text("")
    out = tmp_path / "scores"
    assert main(["importance", "score", str(tmp_path / "anything"), "--scorer", "user_scorers:LengthScorer",
                 "--config", config, "--out", str(out)]) == 0  # fmt: skip
    sources = build_sources(MixtureConfig.load(config))
    assert load_sidecar(out, "german", sources[0]).tolist() == [np.log(12)] * 60
    with pytest.raises(ImportanceError, match="scorer 'user_scorers:Missing'"):
        load_scorer(tmp_path / "anything", "user_scorers:Missing")


def test_color_filter_scores_rank_target_like_documents_first(tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    from onlinemix.color_filter_training import byte_level_tokenizer, train_causal_lm

    tokenizer = byte_level_tokenizer()
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=128, n_embd=32, n_layer=1, n_head=2)
    torch.manual_seed(0)
    prior = train_causal_lm(transformers.GPT2LMHeadModel(config), tokenizer,
                            sentences(GERMAN, 100, 0) + sentences(ENGLISH, 100, 1), steps=80, lr=3e-3)  # fmt: skip
    prior.save_pretrained(tmp_path / "prior")
    tokenizer.save_pretrained(tmp_path / "prior")
    # The recipe, as a command: the prior fine-tuned on the target, saved beside cf.json, which names both.
    write_jsonl(tmp_path / "german.jsonl", sentences(GERMAN, 100, 2))
    fit = ["importance", "fit", "--scorer", "color-filter", "--prior", str(tmp_path / "prior"),
           "--target", str(tmp_path / "german.jsonl"), "-o", str(tmp_path / "cf.json"), "--steps", "40",
           "--lr", "3e-3"]  # fmt: skip
    assert main(fit) == 0
    assert "fine-tuned 40 steps on 100 target documents" in capsys.readouterr().out
    settings = json.loads((tmp_path / "cf.json").read_text())
    assert settings["prior"] == "prior" and settings["conditional"] == "cf.conditional"

    scorer = load_scorer(tmp_path / "cf.json")  # the kind read from the file
    german, english = sentences(GERMAN, 30, 5), sentences(ENGLISH, 30, 6)
    scores, words = scorer.score(german + english + [""])
    assert words.tolist() == [12] * 60 + [0] and scores[60] == -np.inf
    assert np.median(scores[:30]) > np.percentile(scores[30:60], 90)  # target-like documents rank first
    assert scores[:30].mean() > 0 > scores[30:60].mean()  # the fine-tuned model predicts German better, English worse

    # by hand for one document: the two saved models' summed next-token losses
    ids = tokenizer(german[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        losses = [
            model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            for model in (scorer.prior, scorer.conditional)
        ]
    assert scores[0] == pytest.approx(losses[0] - losses[1], rel=1e-4)
    fingerprint = scorer.fingerprint()
    conditional = scorer.conditional
    train_causal_lm(conditional, tokenizer, sentences(ENGLISH, 50, 7), steps=2, seed=2).save_pretrained(
        tmp_path / "cf.conditional"
    )
    assert load_scorer(tmp_path / "cf.json").fingerprint() != fingerprint  # another model: another scorer
    (tmp_path / "bad.json").write_text(json.dumps({**settings, "conditional": "missing"}))
    with pytest.raises(ImportanceError, match=r"the conditional model folder .*missing does not exist"):
        load_scorer(tmp_path / "bad.json")
    assert main(["importance", "fit", "--scorer", "color-filter", "--target", str(tmp_path / "german.jsonl"),
                 "-o", str(tmp_path / "x.json")]) != 0  # fmt: skip
    assert "needs --prior DIR" in capsys.readouterr().err


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_scoring_on_several_workers_writes_the_same_sidecars(tmp_path, engine, capsys):
    if engine == "ray":
        pytest.importorskip("ray")
    config = mixture(tmp_path)
    model = tmp_path / "clf.npz"
    HashedClassifier.fit(sentences(GERMAN, 20, 0), sentences(ENGLISH, 20, 1)).save(model)
    assert main(["importance", "score", str(model), "--config", config, "--out", str(tmp_path / "one")]) == 0
    assert main(["importance", "score", str(model), "--config", config, "--out", str(tmp_path / "two"),
                 "--workers", "2", "--engine", engine]) == 0  # fmt: skip
    for name in ("german", "mixed"):
        for one, two in zip(sidecar_paths(tmp_path / "one", name), sidecar_paths(tmp_path / "two", name)):
            assert one.read_bytes() == two.read_bytes(), (name, one.name)
    assert main(["importance", "score", str(model), "--config", config, "--workers", "0"]) != 0
    assert "--workers must be >= 1, got 0" in capsys.readouterr().err
