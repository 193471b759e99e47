"""Edges that never surprise: damaged logs and records said as such, ``verify: full`` meaning full, what a user
got wrong named by the field they changed, and every command checking the whole mixture file first."""

from __future__ import annotations

import os
import warnings

import pytest
import torch
import yaml
from conftest import make_example, write_jsonl

from onlinemix import (
    ConfigError,
    Controller,
    MiniBatchCoreset,
    MixedDataset,
    MixedLoader,
    OnlineMixer,
    OnlineMixing,
    save_checkpoint,
)
from onlinemix.cli import main
from onlinemix.mixing.coreset import CoresetError
from onlinemix.mixing.schedule_log import ScheduleLogError, read_schedule, replay_schedule

STEPS = 6


def logged_run(config, log, steps=STEPS, stop=None):
    """ODM with lag 2 for ``steps`` steps, logged; with ``stop``, the mixing state at that step."""
    mixing = OnlineMixing.from_config(config, controller="odm", lag=2, log=log,
                                      dataset_options={"num_batches": steps})  # fmt: skip
    state = None
    for step, batch in enumerate(mixing, 1):
        mixing.observe(1.0 + batch["domain"].float(), batch)
        mixing.step()
        if step == stop:
            state = mixing.state_dict()
    mixing.close()
    return state


def rewrite_header_line(log, change) -> None:
    """Edit the log's header line in place (as a damaged byte would), without fixing its checksum."""
    magic, header, body = log.read_bytes().split(b"\n", 2)
    log.write_bytes(magic + b"\n" + change(header) + b"\n" + body)


# ----------------------------------------------------------------------------- 6. schedule logs


def test_a_changed_log_header_is_refused_not_replayed(example, tmp_path, capsys):
    log = tmp_path / "run.oms"
    logged_run(example, log)
    dataset = MixedDataset.from_config(example, num_batches=STEPS)
    rewrite_header_line(log, lambda header: header.replace(b'"lag": 2', b'"lag": 3'))
    with pytest.raises(ScheduleLogError, match=r"run.oms: the header is damaged \(its checksum fails\)"):
        replay_schedule(log, dataset)
    rewrite_header_line(log, lambda header: header.replace(b'"lag": 3', b'"lah": 2'))
    assert main(["sample", str(example), "--batches", "2", "--schedule", str(log)]) == 1
    assert "run.oms: the header is damaged: it lacks 'lag'" in capsys.readouterr().err


def test_resuming_on_a_damaged_or_cut_log_says_so_and_deleting_it_restores_it(example, tmp_path):
    log = tmp_path / "run.oms"
    state = logged_run(example, log, steps=STEPS, stop=4)
    whole = log.read_bytes()
    log.write_bytes(whole[: len(whole) - 3 * (8 + 3 * 8 + 4) - 5])  # cut before the checkpoint's step
    mixing = OnlineMixing.from_config(example, controller="odm", lag=2, log=log, dataset_options={"num_batches": 8})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the torn tail is said once more by the reader
        with pytest.raises(ScheduleLogError, match=r"run.oms is damaged or cut short: it holds steps up to 2, the "
                           r"checkpoint is at step 4; delete it, and the resumed run restores it"):  # fmt: skip
            mixing.load_state_dict(state)
        log.unlink()
        mixing.load_state_dict(state)  # restored from the checkpoint's copy
    assert len(read_schedule(log).steps) == 5


# ----------------------------------------------------------------------------- 7. verify: full


def test_verify_full_at_open_finds_a_same_size_edit_the_sampled_key_misses(tmp_path, monkeypatch):
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    texts = [f"document {i}: " + "lorem ipsum dolor " * 40 for i in range(600)]  # about 450 KB: sampled key
    data = write_jsonl(tmp_path / "big.jsonl", texts)
    config = tmp_path / "mixture.yaml"
    domain = {"name": "big", "source": "jsonl", "path": "big.jsonl"}
    config.write_text(yaml.safe_dump({"seed": 0, "global_batch_size": 4, "seq_len": 16, "verify": "full",
                                      "domains": [domain]}))  # fmt: skip
    MixedDataset.from_config(config)
    stat = data.stat()
    content = bytearray(data.read_bytes())
    middle = len(content) // 2 + 1000  # far from the sampled blocks (the first and last 64 KiB, 32 of 4 KiB)
    offset = content.index(b"lorem", middle)
    content[offset : offset + 5] = b"LOREM"  # same size
    data.write_bytes(bytes(content))
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # and the modification time put back
    with pytest.raises(ConfigError, match=r"big.jsonl is not the file its token cache .* was built from"):
        MixedDataset.from_config(config)
    raw = yaml.safe_load(config.read_text())
    raw["verify"] = "lengths"  # what the other levels promise: the sampled key alone
    config.write_text(yaml.safe_dump(raw))
    MixedDataset.from_config(config)


# ----------------------------------------------------------------------------- 8. coresets


def coreset_mixing(config, pool: int, steps: int = 4) -> OnlineMixing:
    return OnlineMixing.from_config(config, coreset={"pool": pool}, dataset_options={"num_batches": steps})


def select_all(mixing: OnlineMixing, steps: int) -> None:
    for _, pool in zip(range(steps), mixing):
        mixing.select(pool, torch.randn(len(pool["domain"]), 4, generator=torch.Generator().manual_seed(0)))
        mixing.step()


def test_a_coreset_record_or_checkpoint_of_other_pools_names_the_pool(example, tmp_path):
    two = coreset_mixing(example, 2)
    select_all(two, 3)
    record = two.coreset.save(tmp_path / "picks.npz")
    state = two.state_dict()
    four = coreset_mixing(example, 4)
    with pytest.raises(CoresetError, match=r"recorded on pools of 64 samples; this mixing's hold 128 "
                       r"\(mixing.coreset.pool differs: pools of 2 batches then, 4 now\)"):  # fmt: skip
        four.load_state_dict(state)
    replay = MiniBatchCoreset.replay(record, num_domains=3)
    pool = next(iter(four))
    with pytest.raises(CoresetError, match=r"recorded on pools of 64 samples; this mixture's pools hold 128"):
        replay.select(pool, None)
    whole = record.read_bytes()
    for damaged in (whole[: len(whole) // 2], whole[:100] + b"\xff" * 50 + whole[150:]):
        record.write_bytes(damaged)
        with pytest.raises(CoresetError, match=r"cannot read the coreset record .*picks.npz: it is damaged or not"):
            MiniBatchCoreset.replay(record, num_domains=3)


def test_a_pool_beyond_this_machines_memory_is_refused_by_name(example):
    with pytest.raises(ConfigError, match=r"mixing.coreset.pool 1000000000: a pool of 32,000,000,000 samples is "):
        coreset_mixing(example, 1_000_000_000)


# ----------------------------------------------------------------------------- 9. controllers and resumes


class Negative(Controller):
    """A controller of a user's own whose update is no distribution."""

    name = "negative"

    def update(self) -> torch.Tensor:
        self.stats.take()
        return torch.tensor([1.5, -0.5, 0.0])


def test_a_custom_update_that_is_no_distribution_is_rejected_and_counted(example):
    dataset = MixedDataset.from_config(example, num_batches=4)
    controller = Negative(torch.tensor([0.5, 0.3, 0.2]))  # a trust region by default: no limit makes it one
    mixer = OnlineMixer(controller, dataset, lag=1)
    with pytest.warns(UserWarning, match=r"step 1: the negative controller's new weights were not a distribution"):
        for batch in MixedLoader(dataset):
            mixer.observe(torch.ones(len(batch["domain"])), batch["domain"])
            weights = mixer.step()
    assert torch.allclose(weights, torch.tensor([0.5, 0.3, 0.2])) and int(controller.stats.problems[2]) == 4


@pytest.mark.parametrize("knob", ["trust_region", "repeat_budget", "min_ratio"])
def test_true_is_no_number_for_a_limit(example, knob):
    raw = yaml.safe_load(example.read_text())
    raw["mixing"] = {"controller": "odm", knob: True}
    example.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=rf"mixing \(odm controller\): {knob} must be .*got True"):
        OnlineMixing.from_config(example)


def test_resuming_on_another_seq_len_or_a_new_max_epochs_names_that_field(example, tmp_path):
    mixing = OnlineMixing.from_config(example, controller="odm", lag=1, dataset_options={"num_batches": 4})
    for _, batch in zip(range(2), mixing):
        mixing.observe(torch.ones(len(batch["domain"])), batch)
        mixing.step()
    save_checkpoint(mixing.state_dict(), tmp_path / "ckpt.pt")
    state = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    raw = yaml.safe_load(example.read_text())
    for change, expected in (
        ({"seq_len": 64}, "seq_len was 128 when saved, is now 64"),
        ({"domains": [{**raw["domains"][0], "max_epochs": 3}, *raw["domains"][1:]]},  # 3 x 156 windows
         "domain 'code''s repeat cap \\(max_epochs\\) was none when saved, is now 468 samples"),
    ):  # fmt: skip
        example.write_text(yaml.safe_dump({**raw, **change}))
        other = OnlineMixing.from_config(example, controller="odm", lag=1, dataset_options={"num_batches": 4})
        with pytest.raises(ValueError, match=expected):
            other.load_state_dict(state)


# ----------------------------------------------------------------------------- 11. every command checks the file


@pytest.mark.parametrize("command", [["inspect"], ["verify"], ["prepare", "--workers", "1"]])
@pytest.mark.parametrize(("mixing", "message"), [
    ({"controller": "odmm"}, "mixing.controller must be one of"),
    ({"controller": "odm", "reward_scal": 0.1}, "unknown key 'reward_scal'"),
    ({"controller": "odm", "trust_region": -1}, "trust_region must be a number of nats > 0"),
])  # fmt: skip
def test_every_command_that_reads_a_mixture_checks_its_mixing_section(example, capsys, command, mixing, message):
    raw = yaml.safe_load(example.read_text())
    raw["mixing"] = mixing
    example.write_text(yaml.safe_dump(raw))
    assert main([command[0], str(example), *command[1:]]) == 1
    assert message in capsys.readouterr().err


def test_verify_of_a_cache_not_built_yet_says_so_and_builds_only_when_asked(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    config = make_example(tmp_path)
    assert main(["verify", str(config)]) == 0
    out = capsys.readouterr().out
    assert "prose: nothing to verify (" in out and "no token cache yet" in out and "--build builds it" in out
    assert not list((tmp_path / "cache").glob("jsonl-*"))  # nothing was tokenized
    assert main(["verify", str(config), "--build"]) == 0
    assert "prose: ok (token cache jsonl-" in capsys.readouterr().out


@pytest.fixture
def example(tmp_path, monkeypatch):
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    return make_example(tmp_path)
