"""accelerate and torchtitan's checkpoint protocol under two gloo ranks (one process each, on loopback)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import yaml
from conftest import run_ranks
from test_integrations import BATCH, SEQ_LEN, VOCAB, tiny_mixture

from onlinemix import MixedDataset, MixedLoader, OnlineMixing, per_sample_loss

STEPS = 10


def global_batches(config: Path, n: int) -> list[list[list[int]]]:
    loader = MixedLoader(MixedDataset.from_config(config, num_batches=n, rank=0, world_size=1))
    return [[list(pair) for pair in zip(b["domain"].tolist(), b["index"].tolist())] for b in loader]


def union(records: list[dict], key: str = "batches") -> list[list]:
    return [[pair for record in records for pair in record[key][step]] for step in range(len(records[0][key]))]


# ----------------------------------------------------------------------------- accelerate


def _accelerate(rank: int, world: int, config: str, prepare_dataloader: bool) -> dict:
    from accelerate import Accelerator
    from torch.utils.data import DataLoader

    # accelerate reads the launch from the environment; the group itself is the one the test started
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT="1"
    )
    accelerator = Accelerator(cpu=True)  # joins the gloo group the test started
    dataset = MixedDataset.from_config(config, num_batches=4)  # rank and world size from torch.distributed
    if prepare_dataloader:
        loader = accelerator.prepare(DataLoader(dataset, batch_size=None))
        try:
            next(iter(loader))
        except RuntimeError as error:
            return {"error": str(error)}
        return {"error": None}
    loader = MixedLoader(dataset)
    prepared = accelerator.prepare(loader)
    batches = [[list(pair) for pair in zip(b["domain"].tolist(), b["index"].tolist())] for b in prepared]
    return {"same_object": prepared is loader, "batches": batches}


def test_accelerate_leaves_a_mixed_loader_as_it_is_and_each_rank_gets_its_slice(tmp_path):
    config = tiny_mixture(tmp_path)
    records = run_ranks(2, tmp_path / "ranks", _accelerate, config=str(config), prepare_dataloader=False)
    assert all(record["same_object"] for record in records)
    assert union(records) == global_batches(config, 4)  # the whole stream, each sample once


def test_accelerate_preparing_a_dataloader_of_a_mixed_dataset_is_refused_not_half_skipped(tmp_path):
    config = tiny_mixture(tmp_path)
    records = run_ranks(2, tmp_path / "ranks", _accelerate, config=str(config), prepare_dataloader=True)
    for record in records:
        assert record["error"] is not None and "accelerate is splitting a MixedDataset's batches" in record["error"]


# ----------------------------------------------------------------------------- torchtitan


def titan_mixture(root: Path) -> str:
    """The tiny mixture with a ``mixing:`` section: what ``MixingDataLoader.Config`` builds its mixer from."""
    path = tiny_mixture(root)
    config = yaml.safe_load(path.read_text())
    config["mixing"] = {"controller": "odm", "warmup": 0, "lag": 2}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def build_titan_loader(config: str, world: int, rank: int, **overrides):
    """As torchtitan's Trainer builds its data loader from ``config.dataloader``."""
    from onlinemix.mixing.integrations.torchtitan import MixingDataLoader

    runtime = {"dp_world_size": world, "dp_rank": rank, "seq_len": SEQ_LEN, "local_batch_size": BATCH // world}
    loader_config = MixingDataLoader.Config(mixture=config, num_workers=1, device="cpu")
    return loader_config.build(**{**runtime, "tokenizer": None, "snapshot_every_n_steps": 5, **overrides})


def _torchtitan(rank: int, world: int, config: str, checkpoint: str, save_at: int | None, resume: bool) -> dict:
    """A torchtitan-shaped loop: the data loader built from its Config, the loss through MixingLoss, the mixer
    stepped by the optimizer's step, and the state saved and loaded with torch.distributed.checkpoint."""
    import torch.distributed.checkpoint as dcp

    from onlinemix.mixing.integrations.torchtitan import MixingLoss, step_after

    torch.manual_seed(0)
    model = torch.nn.Embedding(VOCAB, VOCAB)  # a bigram model, the same on every rank
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    loader = build_titan_loader(config, world, rank)
    mixing = loader.mixing

    def cross_entropy(pred, labels, global_valid_tokens):  # torchtitan's loss signature: (loss, extra)
        loss = torch.nn.functional.cross_entropy(pred.flatten(0, 1), labels.flatten(), reduction="sum")
        return loss / global_valid_tokens, None

    loss_fn = MixingLoss(cross_entropy, loader)
    step_after(optimizer, mixing)
    if resume:
        state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dataloader": loader}
        dcp.load(state, checkpoint_id=checkpoint)
        model.load_state_dict(state["model"])
    record = {"batches": [], "weights": []}
    for inputs, labels in loader:
        record["batches"].append(loader.pending[0]["domain"].tolist())  # the domains of this rank's slice
        loss, _ = loss_fn(model(inputs["input"]), labels, (labels != -100).sum())
        optimizer.zero_grad()
        loss.backward()
        for parameter in model.parameters():  # data parallel: average the gradients
            torch.distributed.all_reduce(parameter.grad)
            parameter.grad /= world
        optimizer.step()  # ... and the mixer steps right after
        record["weights"].append(mixing.weights.tolist())
        step = mixing.loader.position.batch
        if step == save_at:
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "dataloader": loader}
            dcp.save(state, checkpoint_id=checkpoint)
        if step in (save_at, STEPS):
            break
    loader.mixing.close()
    return record


def test_torchtitan_state_saved_with_dcp_on_two_ranks_resumes_the_exact_stream_and_weights(tmp_path):
    config = titan_mixture(tmp_path)
    checkpoint = str(tmp_path / "dcp")
    common = {"config": config, "checkpoint": checkpoint}
    whole = run_ranks(2, tmp_path / "whole", _torchtitan, save_at=None, resume=False, **common)
    head = run_ranks(2, tmp_path / "head", _torchtitan, save_at=4, resume=False, **common)
    tail = run_ranks(2, tmp_path / "tail", _torchtitan, save_at=None, resume=True, **common)
    for rank in range(2):
        assert head[rank]["batches"] + tail[rank]["batches"] == whole[rank]["batches"]
        assert head[rank]["weights"] + tail[rank]["weights"] == whole[rank]["weights"]  # bit for bit
    assert whole[0]["weights"] == whole[1]["weights"]  # every rank publishes the same weights
    assert whole[0]["weights"][0] != whole[0]["weights"][-1]  # and they moved


def test_torchtitan_mixing_loss_feeds_per_sample_losses_with_the_right_domains(tmp_path):
    from onlinemix.mixing.integrations.torchtitan import MixingDataLoader, MixingLoss

    mixing = OnlineMixing.from_config(tiny_mixture(tmp_path), controller="odm", lag=2)
    loader = MixingDataLoader.of(mixing)
    _, labels = next(iter(loader))
    domains = loader.pending[0]["domain"]
    pred = torch.randn(len(labels), SEQ_LEN, VOCAB)
    MixingLoss(lambda logits, targets, tokens: (logits.sum() * 0, None), loader)(pred, labels, 1)
    assert not loader.pending  # consumed by the loss it belongs to
    sums, counts = mixing.mixer.controller.stats.window
    expected = per_sample_loss(pred, labels)
    for d in range(3):
        mine = domains == d
        torch.testing.assert_close(sums[d], expected[mine].sum())
        assert counts[d] == mine.sum()
    with pytest.raises(RuntimeError, match="did not hand out"):
        MixingLoss(lambda logits, targets, tokens: (logits.sum(), None), loader)(pred, labels, 1)


def test_torchtitan_data_loader_refuses_a_trainer_that_does_not_match_the_mixture(tmp_path):
    config = titan_mixture(tmp_path)
    with pytest.raises(ValueError, match=f"training.seq_len is 32 but {config} has seq_len {SEQ_LEN}"):
        build_titan_loader(config, 1, 0, seq_len=32)
    with pytest.raises(ValueError, match=f"local_batch_size is {BATCH} but .* over 2 data-parallel ranks gives"):
        build_titan_loader(config, 2, 0, local_batch_size=BATCH)

    class Tokenizer:  # torchtitan's BaseTokenizer interface, as far as the check reads it
        def get_vocab_size(self) -> int:
            return 50_000

    named = yaml.safe_load(Path(config).read_text())
    Path(config).write_text(yaml.safe_dump({**named, "tokenizer": "byte"}))
    with pytest.raises(ValueError, match=r"the trainer's tokenizer has 50000 tokens; .*'s \(byte\) has 258"):
        build_titan_loader(config, 1, 0, tokenizer=Tokenizer())


def test_torchtitan_trainer_config_builds_the_mixing_trainer_and_attach_wires_loss_and_step(tmp_path):
    from types import SimpleNamespace

    from torchtitan.trainer import Trainer

    from onlinemix.mixing.integrations.torchtitan import MixingLoss, MixingTrainer, attach

    assert issubclass(MixingTrainer.Config, Trainer.Config) and MixingTrainer.Config._owner is MixingTrainer
    loader = build_titan_loader(titan_mixture(tmp_path), 1, 0)
    optimizer = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
    logged = []
    processor = SimpleNamespace(log=lambda step, *losses, extra_metrics=None: logged.append(extra_metrics))
    trainer = SimpleNamespace(
        dataloader=loader, loss_fn=lambda *a: None, optimizers=optimizer, metrics_processor=processor
    )
    trainer.gradient_accumulation_steps = 2
    with pytest.raises(
        ValueError, match="gradient accumulation steps is 2 but the mixer was built with accumulation=1"
    ):
        attach(trainer)
    trainer.gradient_accumulation_steps = 1
    assert attach(trainer) is loader and isinstance(trainer.loss_fn, MixingLoss)
    trainer.optimizers.step()
    assert loader.mixing.mixer.step_count == 1  # the mixer stepped with the optimizer
    trainer.metrics_processor.log(1, 2.0, 2.0, 1.0, extra_metrics={"n_tokens_seen": 5})
    assert logged[0]["n_tokens_seen"] == 5 and logged[0]["mixing/version"] == 1  # the training log carries them
    assert {f"mixing/weight/{name}" for name in loader.mixing.names} <= set(logged[0])
    with pytest.raises(TypeError, match=r"set config\.dataloader = MixingDataLoader\.Config"):
        attach(SimpleNamespace(dataloader=[], gradient_accumulation_steps=1))
