"""Importance inside the stream: resampled epochs from sidecars, online accept/reject, priors, config errors."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl

from onlinemix.cli import main
from onlinemix.loaders import MixedDataset, MixedLoader
from onlinemix.loaders.build import build_sources, initial_weights
from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.importance.estimator import ImportanceEstimator, NgramHasher
from onlinemix.loaders.importance.sidecars import load_sidecar
from onlinemix.loaders.plan import UNLIMITED, PlanSpec, ResampledOrder, resampled_order
from onlinemix.mixing.training import OnlineMixing

TARGET_WORDS = "matrix vector tensor gradient"


def text(i: int, like_target: bool) -> str:
    words = TARGET_WORDS if like_target else "river meadow orchard harvest"
    return f"{words} {' '.join(words.split()[::-1])} item {i % 5}"


@pytest.fixture(scope="module")
def mixture(tmp_path_factory) -> Path:
    """Two JSONL domains, a third of 'science' and a quarter of 'garden' look like the target; an
    estimator and both sidecars."""
    root = tmp_path_factory.mktemp("stream")
    write_jsonl(root / "science.jsonl", [text(i, i % 3 == 0) for i in range(240)])
    write_jsonl(root / "garden.jsonl", [text(i, i % 4 == 0) for i in range(160)] + ["", "!"])  # two too short
    write_jsonl(root / "target.jsonl", [text(i, True) for i in range(20)])
    # one sample per document: DSIR weighs documents
    domains = [
        {"name": n, "source": "jsonl", "path": f"{n}.jsonl", "samples": "documents"} for n in ("science", "garden")
    ]
    (root / "base.yaml").write_text(
        yaml.safe_dump({"seed": 7, "global_batch_size": 8, "seq_len": 32, "domains": domains})
    )
    assert main(["importance", "fit", "--target", str(root / "target.jsonl"), "--config", str(root / "base.yaml"),
                 "-o", str(root / "est.npz"), "--raw-docs", "100", "--min-words", "2"]) == 0  # fmt: skip
    assert main(["importance", "score", str(root / "est.npz"), "--config", str(root / "base.yaml"),
                 "--out", str(root / "scores")]) == 0  # fmt: skip
    return root


def config(root: Path, name: str, **importance) -> Path:
    raw = yaml.safe_load((root / "base.yaml").read_text())
    raw["importance"] = importance
    path = root / name
    path.write_text(yaml.safe_dump(raw))
    return path


def pairs(batches) -> list[list[tuple[int, int]]]:
    return [list(zip(b["domain"].tolist(), b["index"].tolist())) for b in batches]


# -- resampled epochs -------------------------------------------------------------------------


def spec_with(log_weights, beta: float, size: int) -> PlanSpec:
    order = ResampledOrder(np.asarray(log_weights, dtype=np.float64), beta, size)
    return PlanSpec(np.array([size]), np.array([UNLIMITED]), 11, 4, resampled=(order,))


def test_resampled_epochs_follow_the_tempered_weights_and_skip_unweighted_samples():
    weights = np.log([1.0, 2.0, 3.0, 4.0, 1.0])
    weights[4] = -np.inf  # no weight: never drawn
    spec = spec_with(weights, beta=1.0, size=4)
    epochs = [resampled_order(spec, 0, e) for e in range(4000)]
    assert all(sorted(epoch.tolist()) == [0, 1, 2, 3] for epoch in epochs)  # without replacement, whole epoch
    first = np.bincount([epoch[0] for epoch in epochs], minlength=5) / len(epochs)
    assert np.abs(first - [0.1, 0.2, 0.3, 0.4, 0.0]).max() < 0.03  # first draw ∝ exp(beta log w) = w
    assert resampled_order(spec, 0, 3).tolist() == epochs[3].tolist()  # a pure function of (seed, domain, epoch)
    # keep: an epoch is the top `size` keys; a large beta makes that the heaviest samples, heaviest first
    assert resampled_order(spec_with(weights, beta=50.0, size=2), 0, 0).tolist() == [3, 2]
    flat = spec_with(weights, beta=0.0, size=4)  # beta 0: a uniform shuffle
    assert np.abs(np.bincount([resampled_order(flat, 0, e)[0] for e in range(4000)]) / 4000 - 0.25).max() < 0.03
    with pytest.raises(ValueError, match="an epoch of 5 samples needs 1 to 4"):
        spec_with(weights, beta=1.0, size=5)


def test_a_resampled_domain_prefers_the_target_and_resumes_exactly(mixture):
    path = config(mixture, "resampled.yaml", sidecars="scores", beta=1.0, keep=0.5)
    dataset = MixedDataset.from_config(path, num_batches=40)
    science = load_sidecar(mixture / "scores", "science", dataset.sources[0])
    garden = load_sidecar(mixture / "scores", "garden", dataset.sources[1])
    assert dataset.spec.sizes.tolist() == [120, 80]  # keep 0.5 of 240, and of the 160 garden samples with a weight
    batches = list(MixedLoader(dataset, num_workers=2))
    drawn = pairs(batches)
    first_epoch: list[int] = []  # whole batches while they stay within the first 120 takes (slots are shuffled)
    for batch in drawn:
        taken = [i for d, i in batch if d == 0]
        if len(first_epoch) + len(taken) > 120:
            break
        first_epoch += taken
    assert len(first_epoch) > 100 and len(set(first_epoch)) == len(first_epoch)  # no repeat within an epoch
    assert np.mean(science[first_epoch]) > np.mean(science) + 1  # closer to the target than the domain is
    assert np.mean([i % 3 == 0 for i in first_epoch]) > 0.5  # the target-like third, well over a third
    garden_drawn = [i for batch in drawn for d, i in batch if d == 1]
    assert 160 not in garden_drawn and 161 not in garden_drawn  # the short documents have no weight
    for batch in batches:  # the importance field is the sidecar's weight; reads are all 1
        weights = [(science, garden)[d][i] for d, i in zip(batch["domain"].tolist(), batch["index"].tolist())]
        assert np.array_equal(batch["importance"].numpy(), weights)
        assert batch["reads"].tolist() == [1] * 8

    loader = MixedLoader(MixedDataset.from_config(path, num_batches=40), num_workers=2)
    head = pairs(itertools.islice(loader, 13))
    state = loader.state_dict()
    resumed = MixedLoader(MixedDataset.from_config(path, num_batches=40), num_workers=1)
    resumed.load_state_dict(state)
    assert head + pairs(resumed) == drawn


# -- online accept/reject -----------------------------------------------------------------------


def test_online_acceptance_is_reproducible_across_restarts_and_worker_counts(mixture):
    path = config(mixture, "accepted.yaml", estimator="est.npz", beta=2.0, accept_quantile=0.9, warmup=64)
    reference = MixedDataset.from_config(path, num_batches=30)
    assert reference.acceptance.keys() == {0, 1} and reference.spec.resampled == (None, None)
    batches = list(MixedLoader(reference, num_workers=0))
    for workers in (1, 3):
        again = list(MixedLoader(MixedDataset.from_config(path, num_batches=30), num_workers=workers))
        assert pairs(again) == pairs(batches)
        assert all(a["reads"].tolist() == b["reads"].tolist() for a, b in zip(again, batches))
    loader = MixedLoader(MixedDataset.from_config(path, num_batches=30), num_workers=2)
    head = pairs(itertools.islice(loader, 11))
    resumed = MixedLoader(MixedDataset.from_config(path, num_batches=30), num_workers=2)
    resumed.load_state_dict(loader.state_dict())
    assert head + pairs(resumed) == pairs(batches)

    reads = np.concatenate([b["reads"].numpy() for b in batches])
    assert reads.min() >= 1 and reads.max() <= 32 and (reads > 1).mean() > 0.2  # rejections happened
    kept = [i for batch in pairs(batches) for d, i in batch if d == 0]
    assert np.mean([i % 3 == 0 for i in kept]) > 0.6  # the target-like third of science dominates what is kept
    science = load_sidecar(mixture / "scores", "science", reference.sources[0])
    kept_weights = np.concatenate([b["importance"][b["domain"] == 0].numpy() for b in batches])
    assert np.allclose(kept_weights, science[kept])  # the field holds the kept sample's log weight


def test_acceptance_keeps_each_sample_or_not_once_and_for_all(mixture):
    path = config(mixture, "accepted.yaml", estimator="est.npz", beta=2.0, accept_quantile=0.9, warmup=64)
    acceptance = MixedDataset.from_config(path).acceptance[0]
    ids = np.arange(240)
    kept, _ = acceptance.acceptable(ids)
    per_word, _ = acceptance.score(ids)
    probability = np.minimum(1.0, np.exp(2.0 * (per_word - acceptance.tau)))
    assert np.array_equal(kept[::-1], acceptance.acceptable(ids[::-1])[0])  # per sample, whatever the batch
    assert kept[probability >= 1].all()  # above tau: always kept
    chosen, reads, _ = acceptance.choose(ids)
    assert kept[chosen[reads < 32]].all()  # a slot ends on a kept sample unless it ran out of reads
    assert np.array_equal(chosen[kept], ids[kept]) and (reads[kept] == 1).all()  # kept at once: read once
    finite = np.isfinite(per_word[:64])
    assert acceptance.tau <= per_word.max() and finite.any()


def test_the_batches_importance_reaches_a_controller_with_an_importance_gain(mixture):
    path = config(mixture, "signal.yaml", sidecars="scores", beta=1.0)
    raw = yaml.safe_load(path.read_text())
    raw["mixing"] = {"controller": "odm", "reward_scale": 0.5, "importance_gain": 0.01, "lag": 1}
    path.write_text(yaml.safe_dump(raw))
    mixing = OnlineMixing.from_config(path, dataset_options={"num_batches": 1})
    batch = next(iter(mixing))
    mixing.observe(torch.ones(8), batch)  # the batch's importance field goes along by itself
    mixing.step()
    domains, importance = batch["domain"].numpy(), batch["importance"].numpy()
    initial = mixing.dataset.schedule.weights_for(0, 1)[0]  # π, the weights batch 0 was drawn with
    share = [np.mean(domains == d) for d in (0, 1)]  # each sample is one pull of its domain's arm
    expected = [0.5 * share[d] * np.mean(1 + 0.01 * importance[domains == d]) / initial[d] for d in (0, 1)]
    assert np.allclose(mixing.mixer.controller.rewards.numpy(), expected)
    mixing.close()


# -- priors and errors ----------------------------------------------------------------------------


def test_domain_prior_is_a_softmax_of_minus_kl_by_hand():
    estimator = ImportanceEstimator(
        NgramHasher(num_buckets=2), np.array([3.0, 1.0]), {"near": np.array([3.0, 1.0]), "far": np.array([1.0, 3.0])}
    )
    # Laplace (alpha 1): target [4, 2] / 6, near the same (KL 0), far [2, 4] / 6: KL = (2/3) ln 2 - (1/3) ln 2
    assert estimator.divergence("far") == pytest.approx(math.log(2) / 3)
    expected = np.array([1.0, 2 ** (-1 / 3)]) / (1 + 2 ** (-1 / 3))
    assert np.allclose(estimator.domain_prior(["near", "far"], 1.0), expected)
    assert np.allclose(estimator.domain_prior(["near", "far"], 1e9), [0.5, 0.5])


def test_prior_from_the_config_sets_the_initial_weights(mixture):
    path = config(mixture, "prior.yaml", estimator="est.npz", domains=["science"], prior_temperature=0.05)
    loaded = MixtureConfig.load(path)
    weights = initial_weights(loaded, build_sources(loaded))
    assert np.allclose(weights, ImportanceEstimator.load(mixture / "est.npz").domain_prior(["science", "garden"], 0.05))
    assert weights[0] > weights[1]  # science has the target's vocabulary in a third of it, garden in a quarter


def test_bandit_neighbours_come_from_the_estimators_ngram_profiles(mixture):
    path = config(mixture, "bandit.yaml", estimator="est.npz", prior_temperature=0.05)
    raw = yaml.safe_load(path.read_text())
    raw["mixing"] = {"controller": "bandit", "neighbours": 2, "temperature": 0.25}
    path.write_text(yaml.safe_dump(raw))
    controller = OnlineMixing.from_config(path).mixer.controller
    profiles = ImportanceEstimator.load(mixture / "est.npz").raw
    features = torch.from_numpy(np.log1p(np.stack([profiles["science"], profiles["garden"]]))).float()
    unit = torch.nn.functional.normalize(features, dim=1)
    between = float(unit[0] @ unit[1])  # the two domains' cosine similarity: each row is [1, s] / (1 + s)
    expected = torch.tensor([[1.0, between], [between, 1.0]]) / (1 + between)
    assert controller.name == "bandit" and controller.temperature == 0.25
    torch.testing.assert_close(controller.similarity, expected)
    raw["importance"] = {"sidecars": "scores"}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="needs an estimator"):
        OnlineMixing.from_config(path)


@pytest.mark.parametrize(
    ("importance", "message"),
    [
        ({"beta": 1.0}, "give sidecars"),
        ({"sidecars": "nowhere"}, "not a folder"),
        ({"sidecars": "scores", "domains": ["books"]}, "'books' is not a domain"),
        ({"sidecars": "scores", "keep": 0}, "keep must be > 0"),
        ({"sidecars": "scores", "beta": -1}, r"beta must be a number in \[0, inf\]"),
        ({"sidecars": "scores", "prior_temperature": 1.0}, "prior_temperature needs importance.estimator"),
        ({"sidecars": "scores", "colour": 1}, "unknown key 'colour'"),
    ],
)
def test_bad_importance_sections_are_errors_that_name_the_key(mixture, importance, message):
    with pytest.raises(ConfigError, match=message):
        MixtureConfig.load(config(mixture, "bad.yaml", **importance))


def test_a_sidecar_of_other_data_or_a_domain_without_scores_is_an_error(mixture, tmp_path):
    scores = tmp_path / "scores"
    scores.mkdir()
    for name in ("science.importance.npy", "science.importance.json"):
        (scores / name).write_bytes((mixture / "scores" / name).read_bytes())
    raw = yaml.safe_load((mixture / "base.yaml").read_text())
    for domain in raw["domains"]:
        domain["path"] = str(mixture / domain["path"])
    write_jsonl(tmp_path / "other.jsonl", [f"other {i}" for i in range(240)])
    raw["domains"][0]["path"] = str(tmp_path / "other.jsonl")
    raw["importance"] = {"sidecars": str(scores)}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="does not match domain 'science'"):
        MixedDataset.from_config(tmp_path / "mix.yaml")
    raw["domains"][0]["path"] = str(mixture / "science.jsonl")
    raw["importance"] = {"sidecars": str(scores), "domains": ["science", "garden"]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="domain 'garden' has no sidecar"):
        MixedDataset.from_config(tmp_path / "mix.yaml")
