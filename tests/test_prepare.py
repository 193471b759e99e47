"""``onlinemix prepare``: the caches a first open builds, built beforehand, the same whatever the workers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_example

from onlinemix.cli import main
from onlinemix.loaders import MixedDataset
from onlinemix.loaders.prepare import prepare
from onlinemix.loaders.sources import tokenized


def cache_files(root: Path) -> dict[str, bytes]:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob("*")) if path.is_file()}


def test_one_or_two_workers_write_the_same_caches_and_training_then_tokenizes_nothing(tmp_path, monkeypatch):
    config = make_example(tmp_path)
    built = {}
    for workers in (1, 2):
        monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / f"cache{workers}"))
        results = prepare(config, workers=workers)
        assert [(r.domain, r.status) for r in results] == [("code", "scanned"), ("prose", "built"), ("web", "scanned")]
        entries = [p for p in (tmp_path / f"cache{workers}").iterdir() if p.name.startswith("jsonl-")]
        assert len(entries) == 1
        built[workers] = cache_files(entries[0])
    assert built[1] == built[2] and {"tokens.bin", "documents.npy", "meta.json"} <= set(built[1])
    assert [r.status for r in prepare(config, workers=2)] == ["scanned", "kept", "scanned"]  # a second run keeps it

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a prepared mixture was tokenized again")

    monkeypatch.setattr(tokenized, "_build", no_tokenizing)
    batches = MixedDataset.from_config(config, num_batches=2)
    assert len(list(batches)) == 2


def test_the_command_prints_each_domain_and_fails_naming_the_broken_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    config = make_example(tmp_path)
    assert main(["prepare", str(config), "--workers", "1", "--domains", "prose"]) == 0
    assert capsys.readouterr().out.startswith("prose: built (7,468 tokens in ")
    raw = yaml.safe_load(config.read_text())
    raw["domains"][2]["path"] = "data/nowhere.bin"
    config.write_text(yaml.safe_dump(raw))
    assert main(["prepare", str(config), "--workers", "2"]) == 1
    captured = capsys.readouterr()
    assert "prose: kept (7,468 tokens" in captured.out and "web: failed (" in captured.out
    assert "1 of 3 domains failed to prepare: web" in captured.err
    assert main(["prepare", str(config), "--domains", "books"]) == 1
    assert "'books' is not a domain of" in capsys.readouterr().err


@pytest.mark.parametrize("workers", ["0", "-1"])
def test_workers_must_be_positive(tmp_path, workers, capsys):
    assert main(["prepare", str(make_example(tmp_path)), "--workers", workers]) != 0
    assert "--workers must be >= " in capsys.readouterr().err


def test_a_prepared_cache_holds_the_documents_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    config = make_example(tmp_path)
    prepare(config, workers=1, domains=["prose"])
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("jsonl-"))
    starts = np.load(entry / "documents.npy")
    tokens = np.fromfile(entry / "tokens.bin", dtype=np.uint16)
    first = bytes(tokens[starts[0] : starts[1]][tokens[starts[0] : starts[1]] < 256].astype(np.uint8)).decode()
    assert first.startswith("document 0: ")
