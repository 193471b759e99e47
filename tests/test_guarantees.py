"""Nothing silent: the stream never ends or changes without an error, and a resume refuses what it cannot honour."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import torch
import yaml
from conftest import make_example, resealed, write_jsonl, write_tokens

from onlinemix import (
    ConfigError,
    DGAController,
    MixedDataset,
    MixedLoader,
    MixingError,
    ODMController,
    OnlineMixer,
    StaticController,
    save_checkpoint,
)
from onlinemix.cli import main
from onlinemix.loaders.atomic import atomic_output
from onlinemix.mixing.schedule_log import ScheduleLogError

STEPS = 20


def online(config, log=None, lag=2, accumulation=1, controller=None, **mixer):
    dataset = MixedDataset.from_config(config, num_batches=STEPS)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    controller = controller or ODMController(initial, reward_scale=0.5)
    mixer = OnlineMixer(controller, dataset, lag=lag, accumulation=accumulation, log=log, **mixer)
    return dataset, mixer, MixedLoader(dataset)


def losses_of(batch):
    return 1.0 + batch["domain"].float() + (batch["index"] % 5).float() / 10


# ----------------------------------------------------------------------------- weights that are no distribution


@pytest.mark.parametrize("initial", [[0.0, 0.0, 0.0], [float("nan"), 0.5, 0.5], [-0.5, 1.5, 0.0]])
def test_a_controller_refuses_initial_weights_that_are_no_distribution(initial):
    with pytest.raises(ValueError, match=r"initial weights must (be finite|be >= 0|not all be zero)"):
        ODMController(torch.tensor(initial))


def test_a_nan_alignment_keeps_the_last_good_weights_warns_and_the_stream_goes_on(example):
    dataset = MixedDataset.from_config(example, num_batches=STEPS)
    dga = DGAController(torch.tensor([0.5, 0.3, 0.2]), eta=1.0, ema=0.0)
    mixer = OnlineMixer(dga, dataset, lag=1)
    seen, weights = 0, []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for batch in MixedLoader(dataset):
            alignment = torch.tensor([1.0, 0.0, -1.0]) if seen < 5 else torch.tensor([float("nan"), 0.0, 0.0])
            dga.observe_alignment(alignment)  # from step 6 on: overflowing gradients
            mixer.observe(losses_of(batch), batch["domain"])
            weights.append(mixer.step())
            seen += 1
    assert seen == STEPS  # every batch trained: the stream did not end
    assert torch.isfinite(torch.stack(weights)).all() and torch.equal(weights[-1], weights[4])
    messages = [str(w.message) for w in caught if "not a distribution" in str(w.message)]
    assert messages[0].startswith("step 6: the dga controller's new weights were not a distribution")
    assert "kept the last good weights" in messages[0]
    assert len(messages) == 4  # at the 1st, 2nd, 4th and 8th of 15 rejections
    assert mixer.controller.stats.problems[2] == 15


def test_overflowing_losses_with_nonfinite_error_raise_naming_the_step(example):
    _, mixer, loader = online(example, nonfinite="error")
    batch = next(iter(loader))
    mixer.observe(torch.full((32,), 1e38), batch["domain"])  # finite, but the rewards overflow to inf
    mixer.step()  # rejected: the last good weights are published, the error waits for the next call
    with pytest.raises(MixingError, match=r"step 1: the odm controller's new weights were not a distribution"):
        mixer.observe(torch.ones(32), batch["domain"])


# ----------------------------------------------------------------------------- resume


def stop_and_save(config, path, stop, **kwargs):
    _, mixer, loader = online(config, **kwargs)
    for step, batch in enumerate(loader):
        mixer.observe(losses_of(batch), batch["domain"])
        mixer.step()
        if step + 1 == stop:
            break
    save_checkpoint({"loader": loader.state_dict(), "mixer": mixer.state_dict()}, path)
    mixer.close()


@pytest.mark.parametrize(("key", "saved", "now"), [("lag", 2, 4), ("lag", 4, 2), ("accumulation", 1, 2)])
def test_resuming_with_another_lag_or_accumulation_is_an_error_naming_it(example, tmp_path, key, saved, now):
    stop_and_save(example, tmp_path / "ckpt.pt", 5, **{key: saved})
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    _, mixer, loader = online(example, **{key: now})
    with pytest.raises(ValueError, match=f"{key} was {saved} when saved, is now {now}"):
        loader.load_state_dict(state["loader"])
    with pytest.raises(ValueError, match=f"{key} was {saved} when saved, is now {now}"):
        mixer.load_state_dict(state["mixer"])


def test_a_log_belongs_to_its_run(example, tmp_path):
    log = tmp_path / "schedule.oms"
    stop_and_save(example, tmp_path / "run-a.pt", 5, log=log)  # run A, checkpointed at step 5
    stop_and_save(example, tmp_path / "run-b.pt", 12, log=log)  # run B restarted from scratch over the same log
    state = torch.load(tmp_path / "run-a.pt", weights_only=False)
    _, mixer, _ = online(example, log=log)
    with pytest.raises(ScheduleLogError, match=r"schedule\.oms was written by another run"):
        mixer.load_state_dict(state["mixer"])
    state = torch.load(tmp_path / "run-b.pt", weights_only=False)
    _, mixer, _ = online(example, log=log)
    mixer.load_state_dict(state["mixer"])  # its own log: continued


def test_a_checkpoint_written_by_save_checkpoint_survives_a_kill_mid_save(tmp_path):
    path = tmp_path / "ckpt.pt"
    save_checkpoint({"step": 1}, path)
    script = textwrap.dedent(f"""\
        import os, torch
        import onlinemix.loaders.atomic as files
        real = torch.save
        def dying(obj, file):  # writes half, then the process is killed
            file.write(b"half a checkpoint")
            file.flush()
            os._exit(9)
        torch.save = dying
        files.save_checkpoint({{"step": 2}}, {str(path)!r})
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True)
    assert done.returncode == 9
    assert torch.load(path) == {"step": 1}  # the previous checkpoint, whole
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "ckpt.pt"]
    assert all(name.startswith(".ckpt.pt.") for name in leftovers)  # only a temporary, never the checkpoint


def test_resuming_with_another_tokenizer_is_an_error_naming_it(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    write_jsonl(tmp_path / "docs.jsonl", [f"words {i} and more words" for i in range(200)])
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel()
    tokenizer.train_from_iterator(["words and more"] * 10, trainers.BpeTrainer(special_tokens=["<|endoftext|>"]))
    tokenizer.save(str(tmp_path / "tok.json"))
    domain = {"name": "docs", "source": "jsonl", "path": "docs.jsonl"}
    for name, extra in (("byte.yaml", {}), ("bpe.yaml", {"tokenizer": "tok.json"})):
        config = {"global_batch_size": 4, "seq_len": 8, "domains": [domain], **extra}
        (tmp_path / name).write_text(yaml.safe_dump(config))
    byte = MixedLoader(MixedDataset.from_config(tmp_path / "byte.yaml"))
    bpe = MixedLoader(MixedDataset.from_config(tmp_path / "bpe.yaml"))
    state = byte.state_dict()
    state["mixture"]["sizes"] = bpe.identity()["sizes"]  # make the sizes agree: the tokenizer alone differs
    with pytest.raises(ValueError, match=r"tokenizer was 'byte-1' when saved, is now 'hf-"):
        bpe.load_state_dict(resealed(state))
    del state["mixture"]["tokenizer"]  # as a checkpoint from before the mixture's tokenizer was recorded
    with pytest.raises(
        ValueError, match=r"domain 'docs''s data \(content, tokenizer, samples\) was .*byte-1.* now .*hf-"
    ):
        bpe.load_state_dict(resealed(state))
    assert bpe.dataset.tokenizer.vocab_size == bpe.dataset.sources[0].tokenizer.vocab_size < 300


# ----------------------------------------------------------------------------- ranks


def test_ranks_in_the_environment_without_torch_distributed_is_an_error(example, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match=r"WORLD_SIZE=2 is set but torch\.distributed is not initialised"):
        online(example)
    online(example, sync="none")  # said out loud: fine


# ----------------------------------------------------------------------------- data


def test_token_ids_outside_the_vocabulary_are_an_error(tmp_path):
    make_example(tmp_path)
    write_tokens(tmp_path / "data/web.bin", np.arange(5000) % 50_000)  # GPT-2-sized ids beside byte-tokenized text
    with pytest.raises(ConfigError, match=r"domain 'web': .*web\.bin holds token id 4999, but byte has 258 ids"):
        MixedDataset.from_config(tmp_path / "mixture.yaml")
    raw = yaml.safe_load((tmp_path / "mixture.yaml").read_text())
    raw["domains"] = [d for d in raw["domains"] if d["source"] == "tokenbin"]
    for d in raw["domains"]:
        d["weight"] = 0.5
    (tmp_path / "tokens-only.yaml").write_text(yaml.safe_dump(raw))
    dataset = MixedDataset.from_config(tmp_path / "tokens-only.yaml")  # no tokenizer named: nothing to check
    assert dataset.tokenizer is None


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"mixing": {"controller": "odm", "lag": "4"}}, "mixing.lag must be an integer >= 1, got '4'"),
        ({"mixing": {"controller": "odm", "timeout": -1}}, "mixing.timeout must be a number of seconds > 0, got -1"),
        ({"domains": [{"name": "../../escaped", "source": "jsonl", "path": "x"}]}, "name must be letters, digits"),
    ],
)
def test_config_values_of_the_wrong_kind_name_their_key(tmp_path, change, message):
    from onlinemix import OnlineMixer as Mixer

    path = make_example(tmp_path)
    raw = {**yaml.safe_load(path.read_text()), **change}
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        Mixer.from_config(path, MixedDataset.from_config(path))


def test_a_duplicate_key_and_a_bad_stride_name_themselves(tmp_path):
    path = make_example(tmp_path)
    path.write_text(path.read_text() + "seed: 9\n")  # seed twice: YAML would keep the last silently
    with pytest.raises(ConfigError, match="found key 'seed' twice"):
        MixedDataset.from_config(path)
    path = make_example(tmp_path)
    path.write_text(path.read_text().replace("dtype: uint16, weight: 0.5", "dtype: uint16, stride: abc, weight: 0.5"))
    with pytest.raises(ConfigError, match="domain 'code': stride must be an integer, got 'abc'"):
        MixedDataset.from_config(path)


def test_an_mds_remote_that_does_not_exist_is_named(tmp_path):
    config = {
        "global_batch_size": 4,
        "seq_len": 8,
        "domains": [{"name": "books", "source": "mds", "path": "cache", "remote": str(tmp_path / "nowhere")}],
    }
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError, match=r"domain 'books': cannot read .*nowhere/index\.json into .*cache"):
        MixedDataset.from_config(tmp_path / "m.yaml")


def test_a_worker_read_error_is_one_line_in_the_cli(tmp_path, capsys):
    path = make_example(tmp_path)
    text = path.read_text().replace("field: text,", "field: text, transform: 'conftest:shout',")
    path.write_text(text)
    (tmp_path / "data/prose.jsonl").write_text('{"text": "fine"}\n' + "not json\n" * 400)
    assert main(["sample", str(path), "--batches", "4", "--workers", "2"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("onlinemix: error: ") and "is not valid JSON" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_log_holding_only_its_header_is_named(tmp_path, capsys):
    log = tmp_path / "run.oms"
    from onlinemix.mixing.schedule_log import ScheduleWriter

    ScheduleWriter(log, {"domains": ["a", "b"], "seed": 0, "lag": 1}).close()  # killed before record 0
    assert main(["schedule", "show", str(log)]) == 1
    assert f"{log} holds no weight versions" in capsys.readouterr().err


def test_an_interrupted_conversion_killed_outright_leaves_a_temporary_the_next_run_removes(tmp_path):
    out = tmp_path / "out.bin"
    stale = tmp_path / ".out.bin.partial-999999999"  # the temporary of a process SIGKILLed mid-write
    stale.write_bytes(b"half")
    with atomic_output(out) as temporary:
        temporary.write_bytes(b"whole")
    assert out.read_bytes() == b"whole" and not stale.exists()
    mine = tmp_path / f".out.bin.partial-{os.getpid()}"  # a live process's temporary is left alone
    mine.write_bytes(b"in progress")
    other = tmp_path / "other.bin"
    with atomic_output(other) as temporary:
        temporary.write_bytes(b"x")
    assert mine.exists()


def test_importance_sidecars_stay_inside_their_folder(tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", ["some text here"] * 20)
    raw = {"global_batch_size": 2, "seq_len": 8, "domains": [{"name": "..", "source": "jsonl", "path": str(docs)}]}
    (tmp_path / "m.yaml").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"domains\[0\]: name must be letters"):
        MixedDataset.from_config(tmp_path / "m.yaml")


def test_a_static_run_stays_a_static_run(example):
    """The weights of a StaticController never move, whatever it is fed (NaN included)."""
    dataset = MixedDataset.from_config(example, num_batches=4)
    mixer = OnlineMixer(StaticController(torch.tensor([0.5, 0.3, 0.2])), dataset, lag=1)
    with pytest.warns(UserWarning, match="non-finite losses"):
        for batch in MixedLoader(dataset):
            mixer.observe(torch.full((32,), float("nan")), batch["domain"])
            assert torch.allclose(mixer.step(), torch.tensor([0.5, 0.3, 0.2]))
