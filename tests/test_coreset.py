"""Mini-batch coresets: quotas by hand, what facility location keeps, weights, resume and replay."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
import yaml
from conftest import make_example

from onlinemix import ByteTokenizer, MiniBatchCoreset, OnlineMixing, output_gradients
from onlinemix.mixing.coreset import CoresetError, domain_quotas


def test_quotas_are_each_domains_share_rounded_by_largest_remainder():
    # 12 samples, 5 picks: exact shares 35/12, 15/12, 10/12, 0 -> floors 2, 1, 0, 0 and 2 picks left, which go to
    # the largest remainders 11/12 (domain 0) and 10/12 (domain 2), not 3/12 (domain 1).
    domains = torch.tensor([0] * 7 + [1] * 3 + [2] * 2)
    assert domain_quotas(domains, 4, 5).tolist() == [3, 1, 1, 0]
    # Equal remainders: the lower domain id wins.
    assert domain_quotas(torch.tensor([0, 1, 2, 3]), 4, 2).tolist() == [1, 1, 0, 0]
    # Every quota within floor/ceil of the exact share, and they add up, for random pools.
    generator = torch.Generator().manual_seed(0)
    for _ in range(50):
        domains = torch.randint(0, 5, (64,), generator=generator)
        quota = domain_quotas(domains, 5, 16)
        exact = torch.bincount(domains, minlength=5) * 16 / 64
        assert quota.sum() == 16 and (quota >= exact.floor()).all() and (quota <= exact.ceil()).all()


def pool_of(domains: list[int]) -> dict[str, torch.Tensor]:
    return {"domain": torch.tensor(domains), "index": torch.arange(len(domains)) * 7 + 3}


def test_facility_location_keeps_one_of_each_group_of_duplicates_and_weights_it_by_the_group():
    # Domain 0: three copies of one direction, two of another, one outlier; domain 1: two samples.
    directions = torch.eye(4)
    proxies = torch.stack([directions[i] for i in (0, 0, 0, 1, 1, 2, 3, 3)]) * torch.arange(1.0, 9.0).unsqueeze(1)
    pool = pool_of([0, 0, 0, 0, 0, 0, 1, 1])
    coreset = MiniBatchCoreset(4, num_domains=2)
    batch = coreset(pool, proxies)  # quotas: 6*4/8 = 3 of domain 0, 1 of domain 1
    # Greedy: the triple first (it covers most), then the pair, then the outlier: one slot from each group.
    assert batch["domain"].tolist() == [0, 0, 0, 1]
    assert batch["index"].tolist() == [3, 3 + 7 * 3, 3 + 7 * 5, 3 + 7 * 6]
    # Weights: pool samples standing behind each pick (3, 2, 1 and 2), scaled by 4/8.
    assert batch["coreset_weight"].tolist() == [1.5, 1.0, 0.5, 1.0]


def test_a_small_domain_keeps_its_share_whatever_the_gradients():
    proxies = torch.randn(16, 8, generator=torch.Generator().manual_seed(1))
    proxies[:12] *= 100  # the large domain's gradients dwarf the small one's
    batch = MiniBatchCoreset(4, num_domains=2)(pool_of([0] * 12 + [1] * 4), proxies)
    assert batch["domain"].tolist() == [0, 0, 0, 1]
    assert torch.isclose(batch["coreset_weight"][batch["domain"] == 1].sum(), torch.tensor(1.0))


def test_output_gradients_by_hand():
    logits = torch.tensor([[[0.0, 0.0], [2.0, 0.0]]])  # one sample, two positions, vocabulary of 2
    labels = torch.tensor([[1, -100]])  # the second position is padding
    assert torch.allclose(output_gradients(logits, labels), torch.tensor([[0.5, -0.5]]))
    labels = torch.tensor([[1, 0]])
    p = torch.softmax(torch.tensor([2.0, 0.0]), 0)
    expected = (torch.tensor([0.5, -0.5]) + p - torch.tensor([1.0, 0.0])) / 2
    assert torch.allclose(output_gradients(logits, labels), expected.unsqueeze(0))


def test_output_gradients_a_few_samples_at_a_time_are_the_same(monkeypatch):
    generator = torch.Generator().manual_seed(2)
    logits, labels = torch.randn(5, 4, 7, generator=generator), torch.randint(0, 7, (5, 4), generator=generator)
    labels[2, 1:] = -100
    whole = output_gradients(logits, labels)
    monkeypatch.setattr("onlinemix.mixing.coreset.SOFTMAX_CHUNK", 2 * 4 * 7)  # two samples per chunk
    assert torch.allclose(output_gradients(logits, labels), whole)
    onehot = torch.nn.functional.one_hot(labels.clamp(min=0), 7) * (labels != -100).unsqueeze(-1)
    by_formula = ((torch.softmax(logits, -1) - onehot) * (labels != -100).unsqueeze(-1)).sum(1)
    assert torch.allclose(whole, by_formula / (labels != -100).sum(1, keepdim=True))


def test_bad_inputs_are_clear_errors():
    coreset = MiniBatchCoreset(4, num_domains=2)
    with pytest.raises(CoresetError, match="a pool of 3 samples cannot give a coreset of 4"):
        coreset(pool_of([0, 1, 0]), torch.zeros(3, 2))
    with pytest.raises(CoresetError, match=r"proxies must be \(pool size 8, D\)"):
        coreset(pool_of([0] * 8), torch.zeros(7, 2))
    with pytest.raises(CoresetError, match="needs the pool's gradient proxies"):
        coreset(pool_of([0] * 8), None)
    with pytest.raises(CoresetError, match="batch_size must be an integer >= 1"):
        MiniBatchCoreset(0, num_domains=2)
    with pytest.raises(CoresetError, match="a batch of 10 samples is not 4 pools' worth"):
        MiniBatchCoreset.for_pools(SimpleNamespace(local_batch_size=10, names=["a", "b"]), 4)
    assert MiniBatchCoreset.for_pools(SimpleNamespace(local_batch_size=12, names=["a", "b"]), 4).batch_size == 3
    with pytest.raises(IndexError):  # a domain id past the mixture's is an error, never dropped
        domain_quotas(torch.tensor([0, 1, 2]), 2, 2)


def train(mixing: OnlineMixing, model: torch.nn.Module, optimizer, steps: int) -> list[list[int]]:
    """A few steps of the documented loop; returns the trained samples' indices per step."""
    trained = []
    for step, pool in enumerate(mixing, start=1):
        with torch.no_grad():
            proxies = output_gradients(model(pool["input_ids"]), pool["labels"])
        batch = mixing.select(pool, proxies)
        losses = torch.nn.functional.cross_entropy(model(batch["input_ids"]).transpose(1, 2), batch["labels"],
                                                   reduction="none").mean(1)  # fmt: skip
        optimizer.zero_grad()
        (losses * batch["coreset_weight"]).mean().backward()
        optimizer.step()
        mixing.observe(losses.detach(), batch)
        mixing.step()
        trained.append(batch["index"].tolist())
        if step == steps:
            break
    return trained


class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        vocab = ByteTokenizer().vocab_size
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table(ids)


@pytest.fixture
def coreset_config(tmp_path):
    config = make_example(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["mixing"] = {"coreset": {"pool": 3}}
    config.write_text(yaml.safe_dump(raw))
    return config, raw["global_batch_size"]


def test_the_loader_draws_pools_and_the_batch_is_the_files_batch_size(coreset_config):
    config, batch_size = coreset_config
    mixing = OnlineMixing.from_config(config)
    assert mixing.loader.batch_size == 3 * batch_size and mixing.coreset.batch_size == batch_size
    model = Bigram()
    train(mixing, model, torch.optim.SGD(model.parameters(), lr=0.1), 2)
    record = mixing.state_dict()["coreset"]
    assert record["slots"].shape == (2, batch_size)
    with pytest.raises(CoresetError, match="this mixing has no coreset"):
        OnlineMixing.from_config(config, coreset=None).select({}, None)
    with pytest.raises(ValueError, match=r"coreset\.pool must be an integer >= 2"):
        OnlineMixing.from_config(config, coreset={"pool": 1})


def test_a_resumed_run_selects_and_trains_on_exactly_what_the_whole_run_did(coreset_config):
    config, _ = coreset_config
    model = Bigram()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    online = {"controller": "odm", "warmup": 2}
    whole = train(OnlineMixing.from_config(config, **online), model, optimizer, 6)

    model = Bigram()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = OnlineMixing.from_config(config, **online)
    head = train(first, model, optimizer, 3)
    checkpoint = {"mixing": first.state_dict(), "model": model.state_dict(), "optimizer": optimizer.state_dict()}
    model = Bigram()
    model.load_state_dict(checkpoint["model"])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    optimizer.load_state_dict(checkpoint["optimizer"])
    resumed = OnlineMixing.from_config(config, **online)
    resumed.load_state_dict(checkpoint["mixing"])
    assert head + train(resumed, model, optimizer, 3) == whole
    assert np.array_equal(resumed.state_dict()["coreset"]["slots"][:3], checkpoint["mixing"]["coreset"]["slots"])


def test_replay_gives_the_recorded_picks_without_a_model_and_refuses_another_stream(coreset_config, tmp_path):
    config, batch_size = coreset_config
    model = Bigram()
    recording = OnlineMixing.from_config(config)
    trained = train(recording, model, torch.optim.SGD(model.parameters(), lr=0.1), 4)
    path = recording.coreset.save(tmp_path / "picks.npz")

    replay = OnlineMixing.from_config(config)
    replay.coreset = MiniBatchCoreset.replay(path, num_domains=len(replay.names))
    replayed = []
    for pool in replay:
        replayed.append(replay.select(pool, None)["index"].tolist())
        replay.step()
        if len(replayed) == 4:
            break
    assert replayed == trained
    with pytest.raises(CoresetError, match="step 4 is past its end"):
        replay.select(next(iter(replay)), None)

    raw = yaml.safe_load(config.read_text())
    (tmp_path / "other.yaml").write_text(yaml.safe_dump({**raw, "seed": raw["seed"] + 1}))
    other = OnlineMixing.from_config(tmp_path / "other.yaml")
    other.coreset = MiniBatchCoreset.replay(path, num_domains=len(other.names))
    with pytest.raises(CoresetError, match="step 0: the pool is not the one the selection was recorded on"):
        other.select(next(iter(other)), None)
    with pytest.raises(CoresetError, match="recorded with batch_size"):
        MiniBatchCoreset(batch_size + 1, len(other.names)).load_state_dict(recording.state_dict()["coreset"])
