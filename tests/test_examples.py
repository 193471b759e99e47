"""The end-to-end example on a tiny mixture: every method trains and logs; a preempted DGA run resumes bit for bit
and its log replays the batches it trained on."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl, write_tokens

from onlinemix import ConfigError, MixedDataset, MixedLoader, OnlineMixer, read_schedule, replay_schedule

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
train_gpt = pytest.importorskip("train_gpt")


@pytest.fixture
def mixture(tmp_path: Path) -> Path:
    """Three training domains and a held-out set of each plus a target set, as prepare_data.py lays them out."""
    rng = np.random.default_rng(0)
    texts = {"a": np.arange(3000) % 11, "b": rng.integers(0, 256, 3000), "c": (np.arange(3000) * 5) % 97}
    domains, heldout = [], []
    for name, tokens in texts.items():
        write_tokens(tmp_path / f"{name}.bin", tokens)
        write_tokens(tmp_path / f"val/{name}.bin", tokens[::-1])
        domains.append({"name": name, "source": "tokenbin", "path": f"{name}.bin", "dtype": "uint16"})
        heldout.append({"name": name, "source": "tokenbin", "path": f"val/{name}.bin", "dtype": "uint16"})
    write_jsonl(tmp_path / "val/target.jsonl", [f"target document {i} " * 3 for i in range(20)])
    heldout.append({"name": "target", "source": "jsonl", "path": "val/target.jsonl"})
    for file, entries in (("mixture.yaml", domains), ("heldout.yaml", heldout)):
        config = {"seed": 3, "global_batch_size": 8, "seq_len": 16, "domains": entries}
        (tmp_path / file).write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path / "mixture.yaml"


def run(mixture: Path, method: str, *extra: str, name: str | None = None) -> dict:
    out = mixture.parent / "runs" / (name or method)
    argv = [f"--config={mixture}", f"--method={method}", "--steps=6", "--eval-every=3", "--workers=0", "--width=32"]
    argv += [f"--log={out}.oms", f"--checkpoint={out}.pt", "--eval-windows=4", "--dga-every=2", *extra]
    return train_gpt.train(train_gpt.parser().parse_args(argv))


def test_every_method_trains_logs_and_reports(mixture):
    out = mixture.parent / "runs"
    uniform = run(mixture, "uniform", f"--save-model={out / 'reference.pt'}")
    assert [e["step"] for e in uniform["evals"]] == [3, 6]
    assert set(uniform["evals"][-1]["loss"]) == {"a", "b", "c", "target"}
    assert np.allclose(read_schedule(out / "uniform.oms").weights, 1 / 3)
    run(mixture, "proportional")  # equal sizes: equal weights
    assert np.allclose(read_schedule(out / "proportional.oms").weights, 1 / 3)

    for method in ("odm", "ado", "doremi", "dga", "bandit"):
        extra = [f"--reference={out / 'reference.pt'}"] if method in ("doremi", "bandit") else ["--warmup=2"]
        history = run(mixture, method, *extra)
        log = read_schedule(out / f"{method}.oms")
        assert len(history["trained"]) == 6 and log.steps.tolist() == list(range(7)), method
        assert log.header["controller"] == method
        assert not np.allclose(log.weights[-1], 1 / 3), f"{method} never moved its weights"


def test_a_preempted_dga_run_resumes_bit_for_bit_and_its_log_replays_it(mixture):
    whole = run(mixture, "dga")
    first = run(mixture, "dga", "--stop-after=3", name="parts")
    rest = run(mixture, "dga", "--resume", name="parts")
    assert first["trained"] + rest["trained"] == whole["trained"]
    assert rest["evals"] == [e for e in whole["evals"] if e["step"] > 3]  # same model at step 6
    out = mixture.parent / "runs"
    for key, value in torch.load(out / "dga.pt", weights_only=False)["model"].items():
        assert torch.equal(value, torch.load(out / "parts.pt", weights_only=False)["model"][key]), key
    assert np.array_equal(read_schedule(out / "parts.oms").weights, read_schedule(out / "dga.oms").weights)

    dataset = MixedDataset.from_config(mixture, num_batches=6)
    dataset.schedule = replay_schedule(out / "dga.oms", dataset)
    replayed = [torch.stack([b["domain"], b["index"]], 1).tolist() for b in MixedLoader(dataset, num_workers=0)]
    assert replayed == whole["trained"]


def test_coreset_training_keeps_the_batch_size_and_resumes_bit_for_bit(mixture):
    whole = run(mixture, "odm", "--coreset=3", "--warmup=2", name="coreset")
    assert [len(step) for step in whole["trained"]] == [8] * 6  # the file's batch size, from pools of 24
    first = run(mixture, "odm", "--coreset=3", "--warmup=2", "--stop-after=3", name="coreset-parts")
    rest = run(mixture, "odm", "--coreset=3", "--warmup=2", "--resume", name="coreset-parts")
    assert first["trained"] + rest["trained"] == whole["trained"]
    plain = run(mixture, "odm", "--warmup=2", name="plain")
    assert plain["trained"] != whole["trained"]  # the coreset chose among more samples
    checkpoint = torch.load(mixture.parent / "runs/coreset-parts.pt", weights_only=False)
    assert checkpoint["mixing"]["coreset"]["slots"].shape == (6, 8)
    raw = yaml.safe_load(mixture.read_text())
    mixture.write_text(yaml.safe_dump({**raw, "mixing": {"coreset": {"pool": 2}}}))
    with pytest.raises(ConfigError, match=r"mixing\.coreset changes what the loader draws"):
        OnlineMixer.from_config(mixture, MixedDataset.from_config(mixture))


def test_without_held_out_sets_the_example_still_shows_progress_loss_and_weights(mixture, capsys):
    (mixture.parent / "heldout.yaml").unlink()  # a user's own corpus: no held-out sets
    history = run(mixture, "odm")
    assert history["evals"] == []
    shown = capsys.readouterr().err  # the progress bar
    assert "odm: 100%" in shown and "6/6" in shown
    assert re.search(r"loss \d+\.\d{3} \| weights a 0\.\d\d b 0\.\d\d c 0\.\d\d", shown)


@pytest.mark.parametrize(("method", "hint"), [("doremi", "the uniform run's"), ("bandit", "a model of your target")])
def test_doremi_and_the_bandit_without_a_reference_say_what_they_need(mixture, method, hint):
    with pytest.raises(SystemExit, match=f"--method {method} needs --reference MODEL.pt .*{hint}"):
        run(mixture, method)


@pytest.mark.parametrize("script", ["hf_trainer", "lightning_trainer"])
def test_the_trainer_examples_mix_online_and_resume(mixture, script):
    example = pytest.importorskip(script)
    out = mixture.parent / script
    common = [f"--config={mixture}", f"--out={out}", "--controller=ado", "--accumulation=2"]
    example.main([*common, "--steps=4"])
    example.main([*common, "--steps=6", "--resume"])  # from the step-4 checkpoint
    log = read_schedule(out / "schedule.oms")
    assert log.steps.tolist() == list(range(7))
    assert log.header["accumulation"] == 2 and log.header["controller"] == "ado"
    # Seeded: the same arguments give the same run. ODM's weights follow the losses from its first step, so they
    # differ unless the two models start the same.
    twice = [mixture.parent / f"{script}-{n}" for n in (1, 2)]
    for out in twice:
        example.main([f"--config={mixture}", f"--out={out}", "--controller=odm", "--steps=4"])
    first, second = (read_schedule(out / "schedule.oms").weights for out in twice)
    assert not np.array_equal(first[0], first[-1]) and np.array_equal(first, second)


def test_the_torchtitan_example_config_builds_the_mixing_trainer_and_its_data_loader(mixture, monkeypatch):
    pytest.importorskip("torchtitan")
    example = pytest.importorskip("torchtitan_mixed")
    from onlinemix.mixing.integrations.torchtitan import MixingDataLoader, MixingTrainer

    monkeypatch.setenv("ONLINEMIX_MIXTURE", str(mixture))
    config = example.llama3_mixed()
    assert type(config) is MixingTrainer.Config and type(config)._owner is MixingTrainer
    assert config.model_spec is not None and config.optimizer is not None  # llama3's own settings kept
    runtime = {"dp_world_size": 2, "dp_rank": 1, "tokenizer": None, "local_batch_size": 4}
    config.dataloader.device, config.dataloader.num_workers = "cpu", 0  # a GPU machine: its local device
    assert (config.training.seq_len, config.training.local_batch_size) == (16, 8)  # the mixture's, not llama3-debug's
    with pytest.raises(ValueError, match=r"training\.seq_len is 2048 but .* has seq_len 16"):
        config.dataloader.build(seq_len=2048, **runtime)  # llama3-debug's own: refused before any data is opened
    loader = config.dataloader.build(seq_len=config.training.seq_len, **runtime)  # as the trainer builds it, rank 1
    assert isinstance(loader, MixingDataLoader)
    inputs, labels = next(iter(loader))
    assert inputs["input"].shape == labels.shape == (4, 16)


def test_the_token_datasets_example_writes_each_tools_format_and_mixes_them(tmp_path):
    """megatron-core, litdata and a raw memmap write the data, one mixture reads it (a script: litdata.optimize
    starts its workers by spawning, which imports the caller's ``__main__``)."""
    pytest.importorskip("megatron.core")
    pytest.importorskip("litdata")
    import subprocess

    script = EXAMPLES / "token_datasets.py"
    result = subprocess.run([sys.executable, str(script), f"--out={tmp_path}"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    dataset = MixedDataset.from_config(tmp_path / "mixture.yaml")
    assert dataset.names == ["megatron", "litdata", "olmo", "prose"]
    assert [type(s).__name__ for s in dataset.sources] == ["MegatronSource", "LitDataTokens", "TokenBinSource",
                                                           "TokenizedSource"]  # fmt: skip
    lines = [line for line in result.stdout.splitlines() if line.startswith("batch:")]
    assert len(lines) == 4 and {word.split(":")[0] for line in lines for word in line.split()[1:]} == set(dataset.names)
    assert re.search(r"megatron: [\d,]+ windows; \d+ documents, [\d,]+ uint16 tokens in 1 \.bin file", result.stdout)
