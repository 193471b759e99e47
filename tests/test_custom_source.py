"""Sources of a user's own, from examples/custom_source.py: named in a mixture file, they mix, pack, resume and
replay exactly like the built-in ones."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl

from onlinemix import ConfigError, MixedDataset, MixedLoader, OnlineMixing, replay_schedule

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
custom_source = pytest.importorskip("custom_source")

TEXTS = [f"document {i}: " + "lorem ipsum dolor " * (i % 7 + 1) for i in range(300)]


def write_mixture(root: Path, **options) -> Path:
    database = root / "docs.sqlite"
    with sqlite3.connect(database) as db:
        db.execute("CREATE TABLE documents (text TEXT)")
        db.executemany("INSERT INTO documents VALUES (?)", [(text,) for text in TEXTS])
    domains = [
        {"name": "sql", "source": "custom_source:SQLiteDocuments", "path": str(database), "weight": 0.7},
        {"name": "sums", "source": "custom_source:Arithmetic", "size": 5000, "weight": 0.3},
    ]
    config = {"seed": 5, "global_batch_size": 10, "seq_len": 24, "cache_dir": str(root / "cache"), **options}
    (root / "mixture.yaml").write_text(yaml.safe_dump({**config, "domains": domains}, sort_keys=False))
    return root / "mixture.yaml"


def pairs(loader) -> list[list[list[int]]]:
    return [torch.stack([b["domain"], b["index"]], 1).tolist() for b in loader]


def test_a_document_source_of_yours_is_packed_bit_for_bit_like_jsonl(tmp_path):
    mixture = write_mixture(tmp_path)
    ours = MixedDataset.from_config(mixture).sources[0]
    write_jsonl(tmp_path / "same.jsonl", TEXTS)
    config = yaml.safe_load(mixture.read_text())
    config["domains"] = [{"name": "jsonl", "source": "jsonl", "path": str(tmp_path / "same.jsonl")}]
    (tmp_path / "jsonl.yaml").write_text(yaml.safe_dump(config))
    theirs = MixedDataset.from_config(tmp_path / "jsonl.yaml").sources[0]
    assert len(ours) == len(theirs) > 300
    everything = np.arange(len(ours))
    for key, values in ours.read_batch(everything).items():
        assert np.array_equal(values, theirs.read_batch(everything)[key]), key


def test_sources_of_yours_mix_and_resume_exactly_across_workers(tmp_path):
    mixture = write_mixture(tmp_path)
    whole = pairs(MixedLoader(MixedDataset.from_config(mixture, num_batches=20), num_workers=2))
    domains = np.array([pair[0] for batch in whole for pair in batch])
    assert abs((domains == 0).mean() - 0.7) < 0.05  # systematic sampling: within a sample per batch
    loader = MixedLoader(MixedDataset.from_config(mixture, num_batches=20), num_workers=2)
    first = [batch for _, batch in zip(range(8), pairs(loader))]
    resumed = MixedLoader(MixedDataset.from_config(mixture, num_batches=20), num_workers=1)
    resumed.load_state_dict(loader.state_dict(8))
    assert first + pairs(resumed) == whole
    sums = MixedDataset.from_config(mixture).sources[1]
    window = sums.read_batch(np.array([42]))["input_ids"][0]
    assert bytes(window.tolist()).decode().split("\n")[1].count("+") == 1  # a+b=c lines


def test_an_online_run_over_sources_of_yours_replays_from_its_log(tmp_path):
    mixture = write_mixture(tmp_path)
    mixing = OnlineMixing.from_config(
        mixture, controller="odm", warmup=1, lag=1, log=tmp_path / "run.oms", dataset_options={"num_batches": 12}
    )
    trained = []
    for batch in mixing:
        losses = torch.where(batch["domain"] == 1, 3.0, 1.0)  # the sums look hard: ODM moves towards them
        mixing.observe(losses, batch)
        mixing.step()
        trained.append(torch.stack([batch["domain"], batch["index"]], 1).tolist())
    mixing.close()
    assert mixing.weights[1] > 0.3
    dataset = MixedDataset.from_config(mixture, num_batches=12)
    dataset.schedule = replay_schedule(tmp_path / "run.oms", dataset)
    assert pairs(MixedLoader(dataset, num_workers=2)) == trained


def test_a_changed_table_is_a_new_cache_and_refuses_an_old_checkpoint(tmp_path):
    mixture = write_mixture(tmp_path)
    loader = MixedLoader(MixedDataset.from_config(mixture, num_batches=4), num_workers=0)
    next(iter(loader))
    state = loader.state_dict()
    with sqlite3.connect(tmp_path / "docs.sqlite") as db:
        db.execute("INSERT INTO documents VALUES ('one more document, and a longer one than most of the others')")
    changed = MixedLoader(MixedDataset.from_config(mixture, num_batches=4), num_workers=0)
    with pytest.raises(ValueError, match="checkpoint does not match this mixture: domain 'sql'"):
        changed.load_state_dict(state)


def test_a_class_that_is_not_a_source_is_refused_by_name(tmp_path):
    mixture = write_mixture(tmp_path)
    mixture.write_text(mixture.read_text().replace("custom_source:Arithmetic", "custom_source:write_data"))
    with pytest.raises(ConfigError, match="domain 'sums': source 'custom_source:write_data' is not a subclass"):
        MixedDataset.from_config(mixture)


def test_a_class_that_cannot_be_imported_says_why(tmp_path):
    mixture = write_mixture(tmp_path)
    mixture.write_text(mixture.read_text().replace("custom_source:Arithmetic", "custom_source:Arithmetics"))
    with pytest.raises(ConfigError, match="domain 'sums': source: cannot import 'custom_source:Arithmetics'"):
        MixedDataset.from_config(mixture)
