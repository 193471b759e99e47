"""Trainer integrations, run for real on a tiny model: plain loop helper, HF ``Trainer``, Lightning."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import resealed, write_tokens
from torch import nn

from onlinemix.mixing.schedule_log import ScheduleLogError, read_schedule
from onlinemix.mixing.training import OnlineMixing, per_sample_loss

SEQ_LEN, BATCH, VOCAB = 16, 8, 258


def tiny_mixture(root: Path) -> Path:
    """Three token-bin domains of byte-sized ids (different statistics, so losses differ by domain)."""
    rng = np.random.default_rng(0)
    write_tokens(root / "a.bin", np.arange(4000) % 7)  # easy: a short cycle
    write_tokens(root / "b.bin", rng.integers(0, 256, 4000))  # hard: noise
    write_tokens(root / "c.bin", (np.arange(4000) * 3) % 50)
    domains = [
        {"name": name, "source": "tokenbin", "path": f"{name}.bin", "dtype": "uint16", "weight": w}
        for name, w in zip("abc", (0.4, 0.3, 0.3))
    ]
    config = {"seed": 7, "global_batch_size": BATCH, "seq_len": SEQ_LEN, "domains": domains}
    path = root / "mixture.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def test_per_sample_loss_averages_real_tokens_only():
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, -100], [4, -100, -100]])
    token = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, reduction="none", ignore_index=-100)
    expected = torch.stack([token[0, :2].mean(), token[1, 0]])
    torch.testing.assert_close(per_sample_loss(logits, labels), expected)
    assert per_sample_loss(logits, torch.full((2, 3), -100)).tolist() == [0.0, 0.0]


def test_loader_checkpoints_at_an_earlier_handed_out_batch(tmp_path):
    config = tiny_mixture(tmp_path)
    mixing = OnlineMixing.from_config(config, controller="static")
    batches = iter(mixing)
    seen = [next(batches)["index"] for _ in range(5)]
    state = mixing.state_dict(batch=3)  # a trainer that fetched 5 but trained on 3
    assert state["loader"]["position"]["batch"] == 3
    fresh = OnlineMixing.from_config(config, controller="static")
    fresh.load_state_dict(state)
    again = iter(fresh)
    assert [next(again)["index"].tolist() for _ in range(2)] == [s.tolist() for s in seen[3:]]
    with pytest.raises(ValueError, match="batch 2 is not one this loader can still checkpoint at"):
        mixing.state_dict(batch=2)


def test_accumulation_draws_every_micro_batch_of_a_step_with_the_same_weights(tmp_path):
    config = tiny_mixture(tmp_path)
    mixing = OnlineMixing.from_config(config, controller="odm", accumulation=2, lag=1, warmup=0)
    schedule = mixing.dataset.schedule
    assert schedule.version(np.arange(8)).tolist() == [0, 0, 0, 0, 1, 1, 2, 2]
    batches = iter(mixing)
    for _step in range(3):
        for _ in range(2):
            batch = next(batches)
            mixing.observe(torch.rand(BATCH) + batch["domain"].float(), batch)
        mixing.step()
    assert mixing.mixer.step_count == 3
    assert mixing.loader.position.batch == 6


# -- Hugging Face Trainer ------------------------------------------------------------------------

transformers = pytest.importorskip("transformers")


def tiny_gpt2(dropout: float = 0.1):
    """A randomly initialised GPT-2 from a config (no download), with dropout: a resumed run must restore the
    random generators the Trainer restores, and the loader must not draw from them."""
    config = transformers.GPT2Config(vocab_size=VOCAB, n_positions=SEQ_LEN, n_embd=16, n_layer=1, n_head=2)
    config.resid_pdrop = config.embd_pdrop = config.attn_pdrop = dropout
    return transformers.GPT2LMHeadModel(config)


def hf_run(config: Path, out: Path, steps: int, resume: str | None = None, accumulation: int = 2):
    from transformers import TrainingArguments

    from onlinemix.mixing.integrations.hf import MixingTrainer

    class Recording(MixingTrainer):
        trained: list

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                self.trained.append(torch.stack([inputs["domain"], inputs["index"]], 1).tolist())
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)

    torch.manual_seed(0)
    model = tiny_gpt2()
    mixing = OnlineMixing.from_config(
        config, controller="odm", warmup=0, lag=2, accumulation=accumulation, log=out / "schedule.oms"
    )
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=steps,
        gradient_accumulation_steps=accumulation,
        save_steps=3,
        learning_rate=1e-2,
        report_to=[],
        logging_steps=1000,
        use_cpu=True,
        disable_tqdm=True,
        save_safetensors=False,
    )
    trainer = Recording(model=model, args=args, mixing=mixing)
    trainer.trained = []
    trainer.train(resume_from_checkpoint=resume)
    mixing.close()
    return trainer, mixing


def test_hf_trainer_mixes_online_and_resumes_from_its_checkpoint_exactly(tmp_path):
    config = tiny_mixture(tmp_path)
    full, mixing = hf_run(config, tmp_path / "full", steps=6)
    assert len(full.trained) == 12  # 6 steps x 2 micro-batches
    assert mixing.mixer.step_count == 6  # one update per optimizer step, not per micro-batch
    log = read_schedule(tmp_path / "full/schedule.oms")
    assert log.steps.tolist() == list(range(7))
    assert not np.allclose(log.weights[0], log.weights[-1])  # the weights moved
    assert (tmp_path / "full/checkpoint-3/onlinemix.pt").exists()

    resumed, again = hf_run(config, tmp_path / "full", steps=6, resume=str(tmp_path / "full/checkpoint-3"))
    assert resumed.trained == full.trained[6:]  # the exact next micro-batches
    # the epoch: samples drawn over the mixture's (the Trainer's own figure would restart at the resume)
    windows = sum(len(source) for source in mixing.dataset.sources)
    assert resumed.state.epoch == full.state.epoch == pytest.approx(6 * 2 * BATCH / windows)
    assert torch.equal(again.weights, mixing.weights)
    assert read_schedule(tmp_path / "full/schedule.oms").weights.tolist() == log.weights.tolist()
    for name, value in full.model.state_dict().items():  # dropout > 0: bit for bit all the same
        assert torch.equal(value, resumed.model.state_dict()[name]), name


def test_an_hf_run_extended_by_resuming_with_more_steps_counts_its_epoch_on(tmp_path):
    config = tiny_mixture(tmp_path)
    first, mixing = hf_run(config, tmp_path / "run", steps=6)
    longer, _ = hf_run(config, tmp_path / "run", steps=9, resume=str(tmp_path / "run/checkpoint-6"))
    windows = sum(len(source) for source in mixing.dataset.sources)
    assert first.state.epoch == pytest.approx(6 * 2 * BATCH / windows)
    assert longer.state.epoch == pytest.approx(9 * 2 * BATCH / windows)
    assert longer.state.epoch > first.state.epoch  # on from where it was, never backwards


def test_a_checkpoint_copied_to_another_folder_resumes_on_its_own_and_restores_the_log(tmp_path):
    """Whatever a resume needs travels in the checkpoint: the schedule log so far is in the mixture's state, and is
    written where the resumed run logs when nothing is there."""
    config = tiny_mixture(tmp_path)
    full, mixing = hf_run(config, tmp_path / "full", steps=6)
    shutil.copytree(tmp_path / "full/checkpoint-3", tmp_path / "moved/checkpoint-3")
    resumed, again = hf_run(config, tmp_path / "moved", steps=6, resume=str(tmp_path / "moved/checkpoint-3"))
    assert resumed.trained == full.trained[6:] and torch.equal(again.weights, mixing.weights)
    assert (
        read_schedule(tmp_path / "moved/schedule.oms").weights.tolist()
        == read_schedule(tmp_path / "full/schedule.oms").weights.tolist()
    )


def test_resuming_without_the_runs_log_or_a_copy_of_it_says_what_to_copy(tmp_path):
    config = tiny_mixture(tmp_path)
    mixing = OnlineMixing.from_config(config, controller="odm", lag=2, log=tmp_path / "a/schedule.oms")
    for batch, _ in zip(mixing, range(3)):
        mixing.observe(torch.ones(len(batch["domain"])), batch)
        mixing.step()
    state = mixing.state_dict()
    assert state["mixer"]["log"] == (tmp_path / "a/schedule.oms").read_bytes()
    del state["mixer"]["log"]  # a checkpoint from before checkpoints carried the log, or a log over 64 MiB
    state["mixer"] = resealed(state["mixer"])
    elsewhere = OnlineMixing.from_config(config, controller="odm", lag=2, log=tmp_path / "b/schedule.oms")
    with pytest.raises(ScheduleLogError, match=r"schedule log not found: .*b/schedule.oms\. The checkpoint continues "
                       r"a run that logged its weights, .*copy that run's log to .*b/schedule.oms, or resume with "
                       r"log=None"):  # fmt: skip
        elsewhere.load_state_dict(state)
    mixing.close()


def test_hf_trainer_optimises_the_models_own_loss_and_evaluates_ordinary_datasets(tmp_path):
    """A mixture-of-experts model's router loss stays in the objective; the mixer gets per-sample losses; an
    eval_dataset of plain input_ids/labels evaluates; the logged batch size is the loader's."""
    from transformers import MixtralConfig, MixtralForCausalLM, TrainingArguments

    from onlinemix.mixing.integrations.hf import MixingTrainer

    torch.manual_seed(0)
    moe = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=2, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        output_router_logits=True, router_aux_loss_coef=0.5)  # fmt: skip
    model = MixtralForCausalLM(moe)
    mixing = OnlineMixing.from_config(tiny_mixture(tmp_path), controller="odm", lag=2)
    ids = torch.randint(0, 256, (6, SEQ_LEN))
    heldout = [{"input_ids": row, "labels": row} for row in ids]  # the HF convention: labels = input_ids
    args = TrainingArguments(output_dir=str(tmp_path / "out"), max_steps=2, report_to=[], use_cpu=True,
                             disable_tqdm=True, per_device_eval_batch_size=3)  # fmt: skip
    trainer = MixingTrainer(model=model, args=args, mixing=mixing, eval_dataset=heldout)
    assert trainer.args.per_device_train_batch_size == BATCH  # the loader's batches: true throughput figures
    batch = next(iter(mixing))
    loss = trainer.compute_loss(model, dict(batch))
    plain = per_sample_loss(model(input_ids=batch["input_ids"]).logits, batch["labels"]).mean()
    outputs = model(input_ids=batch["input_ids"], labels=batch["labels"], shift_labels=batch["labels"])
    torch.testing.assert_close(loss, outputs.loss)  # the model's own loss, router loss included:
    assert loss > plain + 0.4  # 0.5 x an aux loss of about 2 on top of the cross-entropy
    assert mixing.mixer.controller.stats.window[1].sum() == BATCH  # each sample's loss went to the mixer
    metrics = trainer.evaluate()
    assert np.isfinite(metrics["eval_loss"])
    with pytest.raises(ValueError, match="per_device_train_batch_size is 4, but the mixture hands out batches of 8"):
        bad = TrainingArguments(output_dir=str(tmp_path / "bad"), max_steps=2, report_to=[], use_cpu=True,
                                per_device_train_batch_size=4)  # fmt: skip
        MixingTrainer(model=model, args=bad, mixing=mixing)


def test_hf_trainer_refuses_mismatched_accumulation(tmp_path):
    from transformers import TrainingArguments

    from onlinemix.mixing.integrations.hf import MixingTrainer

    mixing = OnlineMixing.from_config(tiny_mixture(tmp_path), controller="odm")
    model = tiny_gpt2()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, gradient_accumulation_steps=4, report_to=[])
    with pytest.raises(ValueError, match="gradient_accumulation_steps is 4 but the mixer was built with accumulation"):
        MixingTrainer(model=model, args=args, mixing=mixing)


# -- PyTorch Lightning --------------------------------------------------------------------------


def lightning_run(config: Path, out: Path, steps: int, resume: str | None = None, accumulation: int = 2):
    pl = pytest.importorskip("lightning.pytorch")

    from onlinemix.mixing.integrations.lightning import OnlineMixingCallback

    class Bigram(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(VOCAB, VOCAB)
            self.trained: list = []

        def training_step(self, batch, batch_idx):
            self.trained.append(torch.stack([batch["domain"], batch["index"]], 1).tolist())
            losses = per_sample_loss(self.table(batch["input_ids"]), batch["labels"])
            return {"loss": losses.mean(), "losses": losses.detach()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    torch.manual_seed(0)
    mixing = OnlineMixing.from_config(
        config, controller="odm", warmup=0, lag=2, accumulation=accumulation, log=out / "schedule.oms"
    )
    callback = OnlineMixingCallback(mixing)
    checkpoints = pl.callbacks.ModelCheckpoint(dirpath=out, every_n_train_steps=3, save_top_k=-1)
    trainer = pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulation,
        callbacks=[callback, checkpoints],
        accelerator="cpu",
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    module = Bigram()
    trainer.fit(module, train_dataloaders=callback.train_dataloader(), ckpt_path=resume)
    mixing.close()
    return module, mixing


def test_lightning_callback_mixes_online_and_resumes_from_its_checkpoint_exactly(tmp_path):
    config = tiny_mixture(tmp_path)
    full, mixing = lightning_run(config, tmp_path / "full", steps=6)
    assert len(full.trained) == 12
    assert mixing.mixer.step_count == 6
    log = read_schedule(tmp_path / "full/schedule.oms")
    assert log.steps.tolist() == list(range(7))
    assert not np.allclose(log.weights[0], log.weights[-1])

    checkpoint = next((tmp_path / "full").glob("*step=3.ckpt"))
    resumed, again = lightning_run(config, tmp_path / "full", steps=6, resume=str(checkpoint))
    assert resumed.trained == full.trained[6:]
    assert torch.equal(again.weights, mixing.weights)


def test_a_lightning_checkpoint_copied_elsewhere_resumes_on_its_own(tmp_path):
    config = tiny_mixture(tmp_path)
    full, mixing = lightning_run(config, tmp_path / "full", steps=6)
    (tmp_path / "moved").mkdir()
    checkpoint = shutil.copy(next((tmp_path / "full").glob("*step=3.ckpt")), tmp_path / "moved")
    resumed, again = lightning_run(config, tmp_path / "moved", steps=6, resume=str(checkpoint))
    assert resumed.trained == full.trained[6:] and torch.equal(again.weights, mixing.weights)
    assert read_schedule(tmp_path / "moved/schedule.oms").steps.tolist() == list(range(7))


def test_lightning_callback_needs_a_lag_of_two(tmp_path):
    pytest.importorskip("lightning.pytorch")
    from onlinemix.mixing.integrations.lightning import OnlineMixingCallback

    mixing = OnlineMixing.from_config(tiny_mixture(tmp_path), controller="odm", lag=1)
    with pytest.raises(ValueError, match="lag >= 2"):
        OnlineMixingCallback(mixing)
