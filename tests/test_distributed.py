"""Several ranks for real: ``torch.distributed`` with the gloo backend, one process per rank, on loopback.

Each rank has its own DataLoader worker, its own ODM controller and its own
weights channel. The synthetic losses are multiples of 1/4, so per-domain
sums are exact in any order: the all-reduced statistics of several ranks
equal the single process's, and so must every weight and every batch.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import make_example, run_ranks

from onlinemix.loaders import MixedDataset, MixedLoader
from onlinemix.mixing.controllers import ODMController
from onlinemix.mixing.mixer import MixingError, OnlineMixer

STEPS, LAG = 12, 2


def exact_losses(batch: dict) -> torch.Tensor:
    return 1.0 + batch["domain"].float() + (batch["index"] % 4).float() / 4


def train(config: Path, resume: Path | None, save: Path | None, stop: int, tamper_at: int | None, **_) -> dict:
    """One rank's run (or the single-process reference): batches and weights of each step."""
    dataset = MixedDataset.from_config(config, num_batches=stop)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    mixer = OnlineMixer(ODMController(initial, reward_scale=0.5), dataset, lag=LAG, check_every=1)
    loader = MixedLoader(dataset, num_workers=1)
    if resume is not None:
        state = torch.load(resume)
        loader.load_state_dict(state["loader"])
        mixer.load_state_dict(state["mixer"])
    record = {"batches": [], "weights": []}
    for batch in loader:
        record["batches"].append(list(zip(batch["domain"].tolist(), batch["index"].tolist())))
        mixer.observe(exact_losses(batch), batch["domain"])
        if tamper_at is not None and mixer.step_count == tamper_at and dataset.rank == 1:
            mixer.controller.rewards = mixer.controller.rewards + torch.tensor([1.0, 0.0, 0.0])  # diverges
        try:
            record["weights"].append(mixer.step().tolist())
        except MixingError as error:
            record["error"] = str(error)
            break
    if save is not None and dataset.rank == 0:
        torch.save({"loader": loader.state_dict(), "mixer": mixer.state_dict()}, save)
    return record


def ranks(world: int, config: Path, folder: Path, **kwargs) -> list[dict]:
    return run_ranks(world, folder, train, config=config, **kwargs)


def run_alone(config: Path, folder: Path, **kwargs) -> dict:
    return json.loads(json.dumps(train(config, **kwargs)))  # as the ranks' records come back: through JSON


KWARGS = {"resume": None, "save": None, "stop": STEPS, "tamper_at": None}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("distributed"))


@pytest.fixture(scope="module")
def alone(config, tmp_path_factory):
    return run_alone(config, tmp_path_factory.mktemp("alone"), **KWARGS)


def union(records: list[dict]) -> list[list]:
    """The global batches: every step, the ranks' slices in rank order."""
    steps = range(len(records[0]["batches"]))
    return [[pair for record in records for pair in record["batches"][step]] for step in steps]


@pytest.mark.parametrize("world", [2, 4])
def test_ranks_together_draw_the_single_process_sequence_with_online_weights(config, alone, tmp_path, world):
    records = ranks(world, config, tmp_path, **KWARGS)
    assert union(records) == alone["batches"]
    for record in records:  # identical weights on every rank, and equal to the single process's
        assert record["weights"] == alone["weights"]
    assert alone["weights"][0] != alone["weights"][-1]  # they did move


def test_elastic_resume_four_to_two_ranks_and_back(config, alone, tmp_path):
    first = ranks(4, config, tmp_path / "a", **{**KWARGS, "stop": 4, "save": tmp_path / "at4.pt"})
    second = ranks(
        2, config, tmp_path / "b", **{**KWARGS, "resume": tmp_path / "at4.pt", "stop": 9, "save": tmp_path / "at9.pt"}
    )
    third = ranks(4, config, tmp_path / "c", **{**KWARGS, "resume": tmp_path / "at9.pt"})
    assert union(first) + union(second) + union(third) == alone["batches"]
    weights = first[0]["weights"] + second[1]["weights"] + third[3]["weights"]
    assert weights == alone["weights"]


def test_divergent_weights_fail_loudly_on_every_rank(config, tmp_path):
    records = ranks(2, config, tmp_path, **{**KWARGS, "tamper_at": 3})
    for record in records:
        assert record["error"].startswith("step 4: the mixture weights differ across ranks (rank(s) [1] disagree")
        assert len(record["weights"]) == 3  # steps 1-3 published; step 4 raised


def test_replication_groups_see_identical_samples(config, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "4")
    seen = {}
    for rank in range(4):  # two data-parallel ranks, each split over two model-parallel ranks
        monkeypatch.setenv("RANK", str(rank))
        dataset = MixedDataset.from_config(config, replicas=2, num_batches=2)
        assert (dataset.rank, dataset.world_size) == (rank // 2, 2)
        seen[rank] = [batch["index"].tolist() for batch in MixedLoader(dataset)]
    assert seen[0] == seen[1] and seen[2] == seen[3] and seen[0] != seen[2]
    with pytest.raises(ValueError, match="world size 4 does not split into replication groups of 3 ranks"):
        MixedDataset.from_config(config, replicas=3)
