"""``mixing.metrics()``: the figures against hand-computed values, and read back from the event files of the trackers
people use (TensorBoard after an HF Trainer run, a Lightning run, torchtitan's logger and the example script; W&B in
its offline mode)."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_tokens

from onlinemix.mixing.limits import MemorisationGuard
from onlinemix.mixing.metrics import LOSS_EMA
from onlinemix.mixing.schedule_log import read_schedule
from onlinemix.mixing.training import OnlineMixing

SEQ_LEN, BATCH = 16, 8
NAMES = ("a", "b", "c")


def mixture(root: Path) -> Path:
    rng = np.random.default_rng(0)
    write_tokens(root / "a.bin", np.arange(4000) % 7)
    write_tokens(root / "b.bin", rng.integers(0, 256, 4000))
    write_tokens(root / "c.bin", (np.arange(4000) * 3) % 50)
    domains = [{"name": n, "source": "tokenbin", "path": f"{n}.bin", "dtype": "uint16"} for n in NAMES]
    config = {"seed": 7, "global_batch_size": BATCH, "seq_len": SEQ_LEN, "domains": domains, "vocab_size": 258}
    path = root / "mixture.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard event files under ``folder``: tag -> {step: value}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found: dict[str, dict[int, float]] = {}
    for events in sorted(folder.rglob("events.out.tfevents.*")):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found.setdefault(tag, {}).update({e.step: e.value for e in accumulator.Scalars(tag)})
    return found


def test_the_figures_are_the_published_weights_and_the_observed_losses(tmp_path):
    mixing = OnlineMixing.from_config(mixture(tmp_path), controller="odm", warmup=0)
    domains = torch.tensor([0, 0, 1, 2, 2, 2, 1, 0])
    first = torch.tensor([1.0, 3.0, 5.0, 2.0, 4.0, 6.0, 7.0, 2.0])
    mixing.mixer.observe(first, domains)
    mixing.step()
    figures = mixing.metrics()
    assert figures["mixing/version"] == 1
    assert [figures[f"mixing/weight/{n}"] for n in NAMES] == pytest.approx(mixing.weights.tolist(), abs=1e-7)
    assert [figures[f"mixing/loss/{n}"] for n in NAMES] == pytest.approx([2.0, 6.0, 4.0])
    assert [figures[f"mixing/loss_mean/{n}"] for n in NAMES] == pytest.approx([2.0, 6.0, 4.0])
    drawn = mixing.mixer.controller.epochs.drawn.tolist()
    assert [figures[f"mixing/epochs/{n}"] for n in NAMES] == pytest.approx(drawn)
    assert [figures[f"mixing/held/{n}"] for n in NAMES] == [0.0, 0.0, 0.0]
    assert not any(key.startswith("mixing/heldout/") for key in figures)  # no probes given
    assert figures["mixing/samples_per_second"] > 0

    # two steps before the next read: the per-read loss is over both, the running mean an EMA per step
    mixing.mixer.observe(torch.tensor([4.0, 8.0]), torch.tensor([0, 1]))
    mixing.step()
    mixing.mixer.observe(torch.tensor([6.0]), torch.tensor([0]))
    mixing.step()
    mixing.observe_heldout(torch.tensor([1.5, float("nan"), 2.5]))
    figures = mixing.metrics()
    assert figures["mixing/version"] == 3
    assert figures["mixing/loss/a"] == pytest.approx(5.0) and figures["mixing/loss/b"] == pytest.approx(8.0)
    assert "mixing/loss/c" not in figures  # not drawn since the last read
    a = LOSS_EMA * (LOSS_EMA * 2.0 + (1 - LOSS_EMA) * 4.0) + (1 - LOSS_EMA) * 6.0
    assert figures["mixing/loss_mean/a"] == pytest.approx(a)
    assert figures["mixing/loss_mean/c"] == pytest.approx(4.0)  # kept while c is not drawn
    # the held-out probes arrive with the next published version
    assert "mixing/heldout/a" not in figures
    mixing.step()
    figures = mixing.metrics()
    assert figures["mixing/heldout/a"] == pytest.approx(1.5) and figures["mixing/heldout/c"] == pytest.approx(2.5)
    assert "mixing/heldout/b" not in figures and "mixing/loss/a" not in figures
    assert "mixing/samples_per_second" in figures
    assert "mixing/samples_per_second" not in mixing.metrics()  # no step since the last read
    mixing.close()


def test_a_held_domain_shows_as_held(tmp_path):
    mixing = OnlineMixing.from_config(mixture(tmp_path), controller="odm", warmup=0)
    guard = mixing.mixer.controller.limit(MemorisationGuard)
    guard.heldout_best.copy_(torch.tensor([1.0, 1.0, 1.0]))
    mixing.mixer.controller.weights = torch.tensor([0.6, 0.2, 0.2])  # a favoured: above its start
    mixing.observe_heldout(torch.tensor([1.5, 1.0, 1.0]))  # ... and its held-out loss rose: held
    mixing.step()
    figures = mixing.metrics()
    assert [figures[f"mixing/held/{n}"] for n in NAMES] == [1.0, 0.0, 0.0]
    mixing.close()


def hf_trainer(tmp_path: Path, report_to: list[str], steps: int = 6):
    transformers = pytest.importorskip("transformers")

    from onlinemix.mixing.integrations.hf import MixingTrainer

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=258, n_positions=SEQ_LEN, n_embd=16, n_layer=1, n_head=2)
    mixing = OnlineMixing.from_config(mixture(tmp_path), controller="odm", warmup=0, log=tmp_path / "schedule.oms")
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path / "hf"),
        logging_dir=str(tmp_path / "tb"),
        max_steps=steps,
        logging_steps=2,
        save_strategy="no",
        learning_rate=1e-2,
        report_to=report_to,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = MixingTrainer(model=transformers.GPT2LMHeadModel(config), args=args, mixing=mixing)
    trainer.train()
    mixing.close()
    return trainer


def test_an_hf_trainer_run_leaves_the_schedule_logs_weights_in_its_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    hf_trainer(tmp_path, ["tensorboard"])
    found = scalars(tmp_path / "tb")
    log = read_schedule(tmp_path / "schedule.oms")
    for name in NAMES:
        logged = found[f"train/mixing/weight/{name}"]
        assert sorted(logged) == [2, 4, 6]  # every logging step
        column = NAMES.index(name)
        assert [logged[step] for step in (2, 4, 6)] == pytest.approx(log.weights[[2, 4, 6], column], abs=1e-6)
        assert set(found[f"train/mixing/loss/{name}"]) <= {2, 4, 6}
    assert found["train/mixing/version"] == {2: 2.0, 4: 4.0, 6: 6.0}
    assert found["train/mixing/samples_per_second"][6] > 0
    assert "train/loss" in found  # the Trainer's own figures as before


def wandb_history(run: Path) -> list[dict[str, float]]:
    """The history rows of an offline W&B run file (``run-*.wandb``: a LevelDB-style log of 32 KiB blocks, each
    record a 7-byte header, CRC, length and kind, then a piece of a protobuf ``Record``), as W&B would upload them."""
    from wandb.proto import wandb_internal_pb2

    raw, position, pending, rows = run.read_bytes(), 7, b"", []  # 7: ":W&B", a magic number, a version
    while position + 7 <= len(raw):
        left = 32768 - position % 32768
        length, kind = struct.unpack("<HB", raw[position + 4 : position + 7])
        if left < 7 or (length == 0 and kind == 0):  # the padding at a block's end
            position += left
            continue
        pending += raw[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or a record's last piece
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            if record.WhichOneof("record_type") == "history":
                items = record.history.item
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items})
    return rows


def test_an_hf_trainer_run_reports_the_figures_to_wandb_offline(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    hf_trainer(tmp_path, ["wandb"])
    wandb.finish()  # the Trainer leaves its run open: the run file is whole once it ends
    (run,) = tmp_path.glob("wandb/offline-run-*/run-*.wandb")
    rows = [row for row in wandb_history(run) if "train/mixing/version" in row]
    log = read_schedule(tmp_path / "schedule.oms")
    assert [row["train/global_step"] for row in rows] == [2, 4, 6]
    for row in rows:
        step = row["train/global_step"]
        assert row["train/mixing/version"] == step
        logged = [row[f"train/mixing/weight/{name}"] for name in NAMES]
        assert logged == pytest.approx(log.weights[step].tolist(), abs=1e-6)


def test_a_lightning_run_logs_the_figures_through_its_logger(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    pytest.importorskip("tensorboard")
    from torch import nn

    from onlinemix import per_sample_loss
    from onlinemix.mixing.integrations.lightning import OnlineMixingCallback

    class Bigram(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.table = nn.Embedding(258, 258)

        def training_step(self, batch, batch_idx):
            losses = per_sample_loss(self.table(batch["input_ids"]), batch["labels"])
            return {"loss": losses.mean(), "losses": losses.detach()}

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.5)

    mixing = OnlineMixing.from_config(
        mixture(tmp_path), controller="odm", warmup=0, lag=2, log=tmp_path / "schedule.oms"
    )
    callback = OnlineMixingCallback(mixing)
    trainer = pl.Trainer(
        max_steps=6,
        callbacks=[callback],
        accelerator="cpu",
        logger=pl.loggers.TensorBoardLogger(tmp_path / "tb", name="", version=""),
        log_every_n_steps=2,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(Bigram(), train_dataloaders=callback.train_dataloader())
    mixing.close()
    found = scalars(tmp_path / "tb")
    log = read_schedule(tmp_path / "schedule.oms")
    versions = found["mixing/version"]
    assert sorted(versions.values()) == [2.0, 4.0, 6.0]  # the weights after each logging step
    for name in NAMES:
        logged = found[f"mixing/weight/{name}"]
        assert set(logged) == set(versions)
        expected = [log.weights[int(versions[step]), NAMES.index(name)] for step in sorted(logged)]
        assert [logged[step] for step in sorted(logged)] == pytest.approx(expected, abs=1e-6)


def test_torchtitans_training_log_carries_the_figures_to_its_tensorboard_logger(tmp_path):
    """torchtitan's own ``MetricsProcessor.log`` and ``TensorBoardLogger`` (its device memory monitor needs a GPU,
    so a stand-in reports zero memory)."""
    pytest.importorskip("torchtitan")
    from types import SimpleNamespace

    from torchtitan.components.metrics import MetricsProcessor, TensorBoardLogger
    from torchtitan.tools.utils import NoColor

    from onlinemix.mixing.integrations.torchtitan import log_with

    processor = MetricsProcessor.__new__(MetricsProcessor)
    memory = SimpleNamespace(**dict.fromkeys(["max_active_gib", "max_active_pct", "max_reserved_gib"], 0.0))
    memory.max_reserved_pct, memory.num_alloc_retries, memory.num_ooms = 0.0, 0, 0
    processor.device_memory_monitor = SimpleNamespace(get_peak_stats=lambda: memory, reset_peak_stats=lambda: None)
    processor.config = MetricsProcessor.Config(log_freq=1)
    processor.logger = TensorBoardLogger(str(tmp_path / "tb"))
    processor.color, processor.gpu_peak_flops, processor.has_quantization = NoColor(), 1e12, False
    processor.num_flops_per_token, processor.ntokens_since_last_log, processor.data_loading_times = 1, 0, []
    processor.time_last_log, processor.parallel_dims = 0.0, SimpleNamespace(non_data_parallel_size=1)

    mixing = OnlineMixing.from_config(mixture(tmp_path), controller="odm", warmup=0)
    log_with(processor, mixing)
    for step in (1, 2):
        mixing.mixer.observe(torch.tensor([1.0, 2.0, 3.0]) * step, torch.tensor([0, 1, 2]))
        mixing.step()
        weights = mixing.weights.tolist()
        processor.data_loading_times.append(0.0)  # as its trainer's loop adds each step's
        processor.log(step, 2.0, 2.0, 1.0, extra_metrics={"n_tokens_seen": 10})
    processor.logger.close()
    mixing.close()
    found = scalars(tmp_path / "tb")
    assert [found[f"mixing/weight/{name}"][2] for name in NAMES] == pytest.approx(weights, abs=1e-6)
    assert found["mixing/loss/b"] == {1: 2.0, 2: 4.0}
    assert found["n_tokens_seen"] == {1: 10.0, 2: 10.0}  # its own extra metrics kept


def test_the_example_script_writes_tensorboard_events(tmp_path):
    pytest.importorskip("tensorboard")
    sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
    train_gpt = pytest.importorskip("train_gpt")
    config = mixture(tmp_path)
    argv = [f"--config={config}", "--method=odm", "--steps=20", "--workers=0", "--width=32", "--warmup=0"]
    argv += [f"--log={tmp_path / 'run.oms'}", f"--checkpoint={tmp_path / 'run.pt'}", f"--tensorboard={tmp_path / 'tb'}"]
    train_gpt.train(train_gpt.parser().parse_args(argv))
    found = scalars(tmp_path / "tb")
    log = read_schedule(tmp_path / "run.oms")
    for name in NAMES:
        logged = found[f"mixing/weight/{name}"]
        assert sorted(logged) == [10, 20]
        assert [logged[10], logged[20]] == pytest.approx(log.weights[[10, 20], NAMES.index(name)], abs=1e-6)
    assert sorted(found["train/loss"]) == [10, 20]
