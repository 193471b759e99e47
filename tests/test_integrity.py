"""Caches and replays that cannot lie: each case is an exact result or one clear line naming the file and the fix.

The numbers in the test names are the cases of the guarantees page (docs/guides/guarantees.md).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_example, resealed, write_config, write_jsonl, write_tokens

from onlinemix import (
    ConfigError,
    DGAController,
    MixedDataset,
    MixedLoader,
    MixtureConfig,
    ODMController,
    OnlineMixer,
    replay_schedule,
)
from onlinemix.cli import main
from onlinemix.loaders.cache.folder import remove_stale_partials
from onlinemix.loaders.checksums import content_digest
from onlinemix.mixing.schedule_log import ScheduleLogError

STEPS = 6


def record_log(config: Path, log: Path, steps: int = STEPS) -> list[list[list[int]]]:
    """Train ``steps`` batches with ODM (lag 1), logging the schedule; the (domain, index) pairs of each batch."""
    dataset = MixedDataset.from_config(config, num_batches=steps)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    mixer = OnlineMixer(ODMController(initial, reward_scale=2.0), dataset, lag=1, log=log)
    batches = []
    for batch in MixedLoader(dataset):
        batches.append(torch.stack([batch["domain"], batch["index"]], 1).tolist())
        mixer.observe(1.0 + batch["domain"].float(), batch["domain"])
        mixer.step()
    mixer.close()
    return batches


def replayed(config: Path, log: Path, steps: int = STEPS) -> list[list[list[int]]]:
    dataset = MixedDataset.from_config(config, num_batches=steps)
    dataset.schedule = replay_schedule(log, dataset)
    return [torch.stack([b["domain"], b["index"]], 1).tolist() for b in MixedLoader(dataset)]


def cache_folders(root: Path) -> list[Path]:
    return sorted(path for path in root.glob("jsonl-*") if path.is_dir())


@pytest.fixture
def mixture(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    return make_example(tmp_path)


# ------------------------------------------------------------------- 1. a replay checks what batches depend on


def test_1_a_replay_is_exact_on_its_own_mixture(mixture, tmp_path):
    log = tmp_path / "run.oms"
    recorded = record_log(mixture, log)
    assert replayed(mixture, log) == recorded


def test_1_a_replay_after_seq_len_changed_is_refused_naming_the_field(mixture, tmp_path):
    log = tmp_path / "run.oms"
    record_log(mixture, log)
    raw = yaml.safe_load(mixture.read_text())
    raw["seq_len"] = 64
    mixture.write_text(yaml.safe_dump(raw))
    with pytest.raises(ScheduleLogError, match=r"does not fit this mixture: seq_len was 128 when the log was recorded"):
        replayed(mixture, log)  # the field changed, not the sizes it changed
    # every other field made to agree: seq_len alone is still refused
    header = json.loads(log.read_bytes().split(b"\n")[1])
    header["mixture"] = {**json.loads(json.dumps(MixedDataset.from_config(mixture).identity())), "seq_len": 128}
    rewrite_header(log, header)
    with pytest.raises(ScheduleLogError, match=r"seq_len was 128 when the log was recorded, is now 64"):
        replayed(mixture, log)


def rewrite_header(log: Path, header: dict) -> None:
    """Write ``header`` into ``log`` with its checksum, as if it had been recorded so."""
    from onlinemix.mixing.schedule_log import HEADER_CRC, _header_crc

    header = {key: value for key, value in header.items() if key != HEADER_CRC}
    header[HEADER_CRC] = _header_crc(header)
    magic, _, body = log.read_bytes().split(b"\n", 2)
    log.write_bytes(magic + b"\n" + json.dumps(header, sort_keys=True).encode() + b"\n" + body)


def test_1_a_replay_after_a_jsonl_source_grew_or_changed_is_refused(mixture, tmp_path):
    log = tmp_path / "run.oms"
    record_log(mixture, log)
    prose = tmp_path / "data/prose.jsonl"
    original = prose.read_text()
    prose.write_text(original + json.dumps({"text": "one more document " * 40}) + "\n")
    with pytest.raises(ScheduleLogError, match=r"domain 'prose'"):
        replayed(mixture, log)
    # an edit that keeps the size, and so the number of windows: only the content digest tells
    prose.write_text(original.replace("lorem", "LOREM", 1))
    assert len(prose.read_text()) == len(original)
    with pytest.raises(ScheduleLogError, match=r"domain 'prose''s data \(content, tokenizer, samples\) was"):
        replayed(mixture, log)
    prose.write_text(original)
    assert replayed(mixture, log) == record_log(mixture, tmp_path / "again.oms")


def test_1_the_log_header_records_the_mixture_and_the_starting_weights(mixture, tmp_path):
    log = tmp_path / "run.oms"
    record_log(mixture, log)
    header = json.loads(log.read_bytes().split(b"\n")[1])
    dataset = MixedDataset.from_config(mixture)
    assert header["mixture"]["seq_len"] == 128
    assert header["mixture"]["tokenizer"] == dataset.tokenizer.fingerprint()
    assert header["mixture"]["sizes"] == [int(n) for n in dataset.spec.sizes]
    assert header["initial"] == pytest.approx([0.5, 0.3, 0.2])


# ----------------------------------------------------------------------------- 2, 6. a cache checks its own files


def damaged(mixture: Path, tmp_path: Path) -> Path:
    """Open the example once (building the prose cache); its cache folder."""
    MixedDataset.from_config(mixture)
    (folder,) = cache_folders(tmp_path / "cache")
    return folder


def test_2_a_truncated_tokens_bin_is_an_error_naming_the_file_and_the_fix(mixture, tmp_path):
    folder = damaged(mixture, tmp_path)
    tokens = folder / "tokens.bin"
    size = tokens.stat().st_size
    os.truncate(tokens, size // 2)
    with pytest.raises(ConfigError, match=rf"domain 'prose': token cache {folder} is damaged: tokens.bin should hold "
                       rf"{size:,} bytes, holds {size // 2:,}: delete the folder"):  # fmt: skip
        MixedDataset.from_config(mixture)
    (folder / "tokens.bin").unlink()
    with pytest.raises(ConfigError, match=r"tokens.bin should hold .* bytes, is missing: delete the folder"):
        MixedDataset.from_config(mixture)
    shutil.rmtree(folder)  # the fix it names
    assert len(MixedDataset.from_config(mixture).sources[1]) > 0


def test_6_a_truncated_documents_npy_names_the_file(mixture, tmp_path):
    folder = damaged(mixture, tmp_path)
    data = (folder / "documents.npy").read_bytes()
    (folder / "documents.npy").write_bytes(data[: len(data) - 40])
    with pytest.raises(ConfigError, match=rf"token cache {folder} is damaged: documents.npy (cannot be read|should)"):
        MixedDataset.from_config(mixture)


@pytest.mark.parametrize("content", ["{not json", '{"dtype": "uint16"}', "[]"])
def test_6_a_garbage_meta_json_names_the_file(mixture, tmp_path, content):
    folder = damaged(mixture, tmp_path)
    (folder / "meta.json").write_text(content)
    with pytest.raises(ConfigError, match=rf"token cache {folder} is damaged: meta.json (cannot be read|lacks)"):
        MixedDataset.from_config(mixture)


# ----------------------------------------------------------------------------- 3. keyed by content, not mtime


def test_3_a_same_size_edit_with_its_mtime_put_back_is_tokenized_again(mixture, tmp_path):
    prose = tmp_path / "data/prose.jsonl"
    before = MixedDataset.from_config(mixture).sources[1].record(0)
    stat = prose.stat()
    text = prose.read_text()
    prose.write_text(text.replace("document 0:", "DOCUMENT 0:", 1))
    os.utime(prose, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # cp -p, rsync -t
    assert prose.stat().st_size == stat.st_size and prose.stat().st_mtime_ns == stat.st_mtime_ns
    after = MixedDataset.from_config(mixture).sources[1].record(0)
    assert bytes(after[:11].astype(np.uint8)) == b"DOCUMENT 0:"
    assert bytes(before[:11].astype(np.uint8)) == b"document 0:"
    assert len(cache_folders(tmp_path / "cache")) == 2


def test_3_a_touched_file_keeps_its_cache(mixture, tmp_path):
    MixedDataset.from_config(mixture)
    os.utime(tmp_path / "data/prose.jsonl", ns=(1, 1))
    MixedDataset.from_config(mixture)
    assert len(cache_folders(tmp_path / "cache")) == 1


def test_3_the_content_digest_samples_large_files(tmp_path):
    big = tmp_path / "big.bin"
    data = np.random.default_rng(0).integers(0, 256, 3 << 20, dtype=np.uint8)
    data.tofile(big)
    digest = content_digest(big)
    data[0] ^= 1  # a sampled byte (the first 64 KiB)
    data.tofile(big)
    assert content_digest(big) != digest
    data[0] ^= 1
    data[1 << 20] ^= 1  # between sampled blocks: the documented blind spot, found by onlinemix verify
    data.tofile(big)
    assert content_digest(big) == digest


# ----------------------------------------------------------------------------- 4. checksums


def test_4_flipped_bytes_in_a_cache_are_found_by_verify_and_by_verify_at_open(mixture, tmp_path, capsys):
    folder = damaged(mixture, tmp_path)
    assert main(["verify", str(mixture)]) == 0
    assert "prose: ok (token cache" in capsys.readouterr().out
    tokens = folder / "tokens.bin"
    data = bytearray(tokens.read_bytes())
    data[100] ^= 0xFF
    tokens.write_bytes(bytes(data))
    MixedDataset.from_config(mixture)  # the default open checks lengths only (documented)
    assert main(["verify", str(mixture)]) == 1
    out = capsys.readouterr()
    assert f"prose: FAILED: token cache {folder} is damaged: tokens.bin fails its checksum in 16 MiB chunk 0" in out.out
    assert "1 of 3 domains failed verification" in out.err
    write_config(tmp_path, verify="sampled")
    with pytest.raises(ConfigError, match=r"tokens\.bin fails its checksum in 16 MiB chunk 0"):
        MixedDataset.from_config(mixture)


def test_4_a_token_bin_file_changed_in_place_is_found_by_verify(mixture, tmp_path, capsys):
    MixedDataset.from_config(mixture)  # the first open scans it and records its checksums
    code = tmp_path / "data/code.bin"
    big = np.arange(300_000) % 256
    write_tokens(code, big)
    MixedDataset.from_config(mixture)
    capsys.readouterr()
    stat = code.stat()
    tokens = np.fromfile(code, dtype=np.uint16)
    tokens[200_000] = 7  # between the sampled blocks of the content digest, and the mtime put back: the same stamp
    tokens.tofile(code)
    os.utime(code, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    MixedDataset.from_config(mixture)  # served: the documented blind spot of an open
    assert main(["verify", str(mixture)]) == 1
    assert f"code: FAILED: {code}: 16 MiB chunk 0 fails the checksum recorded" in capsys.readouterr().out


def test_4_a_rewritten_token_bin_file_is_scanned_again_with_a_warning(mixture, tmp_path, caplog):
    MixedDataset.from_config(mixture)
    write_tokens(tmp_path / "data/code.bin", np.arange(20_000) % 200)
    with caplog.at_level(logging.WARNING, logger="onlinemix"):
        MixedDataset.from_config(mixture)
    assert "code.bin changed since it was first scanned" in caplog.text


# ----------------------------------------------------------------------------- 5. partial caches


def test_5_a_killed_first_open_leaves_nothing_behind_after_the_next_open(mixture, tmp_path):
    root = tmp_path / "cache"
    MixedDataset.from_config(mixture)
    (folder,) = cache_folders(root)
    partial = root / f".{folder.name}.partial-abc123"
    shutil.copytree(folder, partial)  # what a SIGKILL during the build leaves
    other = root / ".jsonl-0123456789abcdef0123.partial-x"  # another entry's, killed too
    other.mkdir()
    shutil.rmtree(folder)
    MixedDataset.from_config(mixture)
    assert not partial.exists() and not other.exists()


def test_5_a_partial_folder_whose_build_is_running_is_left_alone(tmp_path):
    from filelock import FileLock

    partial = tmp_path / ".jsonl-abc.partial-1"
    partial.mkdir()
    with FileLock(tmp_path / ".jsonl-abc.lock"):
        assert remove_stale_partials(tmp_path) == []
    assert partial.exists()
    assert remove_stale_partials(tmp_path) == [partial]


# ----------------------------------------------------------------------------- 7. token ids outside the vocabulary


def test_7_a_token_bin_id_outside_the_tokenizer_is_refused(mixture, tmp_path):
    write_tokens(tmp_path / "data/web.bin", np.r_[np.arange(9_000) % 256, 65535])
    with pytest.raises(ConfigError, match=r"domain 'web': .*web.bin holds token id 65535, but byte has 258 ids"):
        MixedDataset.from_config(mixture)


def test_7_a_wrong_dtype_is_refused_with_vocab_size_and_named_without(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    write_tokens(tmp_path / "data/a.bin", np.arange(40_000) % 200)  # uint16, read as uint32 below
    domains = [{"name": "a", "source": "tokenbin", "path": "data/a.bin", "dtype": "uint32"}]
    config = write_config(tmp_path, domains=domains)
    with caplog.at_level(logging.WARNING, logger="onlinemix"):
        MixedDataset.from_config(config)
    largest = int(np.fromfile(tmp_path / "data/a.bin", dtype=np.uint32).max())
    assert largest > 1_000_000
    assert f"token ids are not checked; the largest are: a {largest:,}" in caplog.text
    write_config(tmp_path, domains=domains, vocab_size=50304)
    with pytest.raises(ConfigError, match=rf"holds token id {largest}, but vocab_size 50304 has 50304 ids .*dtype"):
        MixedDataset.from_config(config)


def test_7_vocab_size_below_the_tokenizer_is_refused(mixture, tmp_path):
    write_config(tmp_path, vocab_size=100)
    with pytest.raises(ConfigError, match=r"vocab_size 100 is smaller than the tokenizer's 258 ids"):
        MixedDataset.from_config(mixture)


# ----------------------------------------------------------------------------- 8. transforms


def test_8_inspect_refuses_an_unimportable_transform(mixture, tmp_path, capsys):
    write_config(tmp_path, transform="no_such_module:shout")
    assert main(["inspect", str(mixture)]) == 1
    assert "error: domain 'code': cannot import 'no_such_module:shout'" in capsys.readouterr().err
    config = MixtureConfig.load(mixture)
    assert config.transform == "no_such_module:shout"


# ----------------------------------------------------------------------------- 9. the controller's starting weights


def test_9_resuming_after_the_files_weights_changed_is_refused(mixture, tmp_path):
    dataset = MixedDataset.from_config(mixture, num_batches=STEPS)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    mixer = OnlineMixer(ODMController(initial, warmup=100), dataset, lag=1)
    state = mixer.state_dict()
    raw = yaml.safe_load(mixture.read_text())
    for domain, weight in zip(raw["domains"], (0.2, 0.3, 0.5)):
        domain["weight"] = weight
    mixture.write_text(yaml.safe_dump(raw))
    dataset = MixedDataset.from_config(mixture, num_batches=STEPS)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    fresh = OnlineMixer(ODMController(initial, warmup=100), dataset, lag=1)
    with pytest.raises(ValueError, match=r"starting weights were \[0.5, 0.3.*, 0.2.*\] when saved, are now \[0.2"):
        fresh.load_state_dict(state)


def test_9_a_resumed_log_refuses_other_starting_weights(mixture, tmp_path):
    log = tmp_path / "run.oms"
    dataset = MixedDataset.from_config(mixture, num_batches=STEPS)
    mixer = OnlineMixer(ODMController(torch.tensor([0.5, 0.3, 0.2])), dataset, lag=1, log=log)
    for batch in MixedLoader(dataset):
        mixer.observe(torch.ones(len(batch["domain"])), batch["domain"])
        mixer.step()
        break
    state = mixer.state_dict()
    mixer.close()
    state["controller"].pop("initial")  # as from an older checkpoint: the log's header still tells
    dataset = MixedDataset.from_config(mixture, num_batches=STEPS)
    other = OnlineMixer(ODMController(torch.tensor([0.2, 0.3, 0.5])), dataset, lag=1, log=log)
    with pytest.raises(ScheduleLogError, match=r"initial is \[0.5.*\] in the log, \[0.2"):
        other.load_state_dict(resealed(state))


# ----------------------------------------------------------------------------- 10. controllers recover from NaN


def test_10_dga_drops_a_nan_alignment_and_moves_again_on_the_next_good_one(mixture):
    dataset = MixedDataset.from_config(mixture, num_batches=40)
    dga = DGAController(torch.tensor([0.5, 0.3, 0.2]), eta=1.0, ema=0.0, trust_region=None)  # by hand: unbounded
    mixer = OnlineMixer(dga, dataset, lag=1)
    expected = torch.tensor([0.5, 0.3, 0.2])
    with pytest.warns(UserWarning, match="rejected"):
        for step, batch in enumerate(MixedLoader(dataset)):
            mixer.observe(torch.ones(len(batch["domain"])), batch["domain"])
            alignment = torch.tensor([1.0, 0.0, -1.0])
            if step == 3:
                alignment = torch.tensor([float("nan"), 0.0, 1.0])
            dga.observe_alignment(alignment)
            weights = mixer.step()
            if step != 3:  # by hand: w <- softmax(log w + a)
                expected = torch.softmax(torch.log(expected) + alignment, 0)
            assert torch.allclose(weights, expected, atol=1e-6), step
            assert torch.isfinite(dga.mixture).all()
            if step == 8:
                break
    assert int(dga.stats.problems[2]) == 1  # one rejected update, counted


def test_10_odm_rolls_back_an_overflowing_reward(mixture):
    odm = ODMController(torch.tensor([0.5, 0.3, 0.2]), reward_scale=1.0)
    for _ in range(5):  # past the steps whose exploration rate is 1/k (uniform weights)
        odm.observe(torch.tensor([1.0, 2.0]), torch.tensor([0, 1]))
        odm.step()
    rewards, weights = odm.rewards.clone(), odm.weights.clone()
    odm.observe(torch.tensor([3e38, 3e38]), torch.tensor([0, 0]))  # finite losses whose reward overflows
    assert torch.equal(odm.step(), weights)
    assert torch.equal(odm.rewards, rewards)
    assert int(odm.stats.problems[2]) == 1
    odm.observe(torch.tensor([1.0]), torch.tensor([2]))
    assert not torch.equal(odm.step(), weights)
    assert torch.isfinite(odm.rewards).all()


def test_10_a_controller_state_rolled_back_is_the_one_before_the_bad_step():
    sizes = [0.25, 0.25, 0.5]
    dga = DGAController(torch.tensor(sizes), eta=2.0, ema=0.5)
    dga.observe_alignment(torch.tensor([0.1, 0.2, 0.3]))
    dga.step()
    mixture = dga.mixture.clone()
    dga.observe_alignment(torch.tensor([float("inf"), 0.0, 0.0]))
    dga.step()
    assert torch.equal(dga.mixture, mixture)


def test_jsonl_documents_tokenized_in_a_verified_cache_are_the_texts(mixture, tmp_path):
    write_jsonl(tmp_path / "data/prose.jsonl", ["abc " * 50, "xyz " * 50])
    write_config(tmp_path, verify="full")
    source = MixedDataset.from_config(mixture).sources[1]
    assert bytes(source.record(0)[:8].astype(np.uint8)) == b"abc abc "


def test_a_bad_verify_or_vocab_size_is_a_config_error_naming_the_key(mixture, tmp_path):
    write_config(tmp_path, verify="always")
    with pytest.raises(ConfigError, match=r"verify must be one of lengths, sampled, full, got 'always'"):
        MixtureConfig.load(mixture)
    write_config(tmp_path, vocab_size=0)
    with pytest.raises(ConfigError, match=r"vocab_size must be >= 1, got 0"):
        MixtureConfig.load(mixture)
