"""The token cache as a whole: listing its entries, finding the stale ones, pruning and clearing them, the size
limit, and the command line over it."""

from __future__ import annotations

import logging
import os
import time

import pytest
from conftest import lock_held_elsewhere, make_example, write_jsonl

from onlinemix.cli import main as onlinemix
from onlinemix.loaders import MixedDataset
from onlinemix.loaders.cache import entries as cache
from onlinemix.loaders.cache.folder import cache_root

DAY = 86400


@pytest.fixture
def example(tmp_path, monkeypatch):
    """The example mixture (one JSONL domain), its cache in ``tmp_path / "cache"``, opened once."""
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    config = make_example(tmp_path)
    MixedDataset.from_config(config)
    return config, tmp_path / "cache"


def edit_and_reopen(config, documents: int) -> None:
    """Rewrite the JSONL domain with another number of documents and open the mixture: a new cache entry."""
    write_jsonl(config.parent / "data/prose.jsonl", [f"document {i}: edited" for i in range(documents)])
    MixedDataset.from_config(config)


def test_an_edited_input_leaves_a_stale_entry_that_prune_removes_with_its_lock(example):
    config, root = example
    (first,) = cache.entries(root)
    assert first.stale is None and first.tokens > 0 and first.inputs == [str(config.parent / "data/prose.jsonl")]
    edit_and_reopen(config, 40)
    old, new = sorted(cache.entries(root), key=lambda entry: entry.stale is None)
    assert old.folder == first.folder and old.stale == f"input changed: {config.parent / 'data/prose.jsonl'}"
    lock = root / f".{old.folder.name}.lock"
    assert new.stale is None and lock.exists() and cache.leftovers(root) == 0  # an entry's lock is not a leftover
    assert cache.prune(root, dry_run=True) == [old] and len(cache.entries(root)) == 2  # a dry run removes nothing
    assert [entry.folder for entry in cache.prune(root)] == [old.folder]
    assert [entry.folder for entry in cache.entries(root)] == [new.folder] and not lock.exists()


def test_prune_by_age_and_by_size_removes_the_least_recently_used_first(example):
    config, root = example
    edit_and_reopen(config, 40)
    edit_and_reopen(config, 60)  # three entries; make their last uses 30, 20 and 10 days ago
    entries = cache.entries(root)
    for age, entry in zip((30, 20, 10), entries):
        os.utime(entry.folder / "meta.json", (time.time() - age * DAY,) * 2)
    assert [e.folder for e in cache.prune(root, older_than_days=25, dry_run=True)] == [
        entries[0].folder,
        entries[1].folder,
    ]
    newest = cache.entries(root)[-1]
    removed = cache.prune(root, max_size=newest.size)  # only the most recently used fits
    assert {e.folder for e in removed} == {entries[0].folder, entries[1].folder}
    assert [e.folder for e in cache.entries(root)] == [newest.folder]


def test_opening_an_entry_marks_it_used(example):
    config, root = example
    (entry,) = cache.entries(root)
    os.utime(entry.folder / "meta.json", (time.time() - 5 * DAY,) * 2)
    MixedDataset.from_config(config)
    assert time.time() - cache.entries(root)[0].last_used < 60


def test_the_size_limit_removes_the_least_recently_used_after_a_build(example, monkeypatch, caplog):
    config, root = example
    (old,) = cache.entries(root)
    monkeypatch.setenv("ONLINEMIX_CACHE_LIMIT", f"{old.size + 10}B")  # room for one entry
    with caplog.at_level(logging.INFO, logger="onlinemix"):
        edit_and_reopen(config, 40)
    (kept,) = cache.entries(root)
    assert kept.folder != old.folder and not old.folder.exists()
    assert f"removed token cache {old.folder.name}" in caplog.text and "ONLINEMIX_CACHE_LIMIT" in caplog.text
    assert "million characters of text" in caplog.text  # the text's own size, not the input files'


def test_an_entry_being_built_is_never_removed(example):
    _, root = example
    (entry,) = cache.entries(root)
    with lock_held_elsewhere(root / f".{entry.folder.name}.lock"):
        assert cache.clear(root) == [] and entry.folder.exists()
    assert [e.folder for e in cache.clear(root)] == [entry.folder] and cache.entries(root) == []


def test_sizes_parse_with_their_units_and_a_bad_one_is_an_error():
    assert cache.parse_size("50GB") == 50 * 10**9
    assert cache.parse_size("1.5 GiB") == int(1.5 * 2**30)
    assert cache.parse_size("800B") == 800
    with pytest.raises(ValueError, match=r"a size must be a number and a unit .*got '800'"):
        cache.parse_size("800")  # 800 bytes, or 800 GB? Said, not guessed
    with pytest.raises(ValueError, match=r"a size must be a number and a unit .*got '5 parsecs'"):
        cache.parse_size("5 parsecs")


def test_the_cache_commands(example, capsys):
    config, root = example
    edit_and_reopen(config, 40)
    assert onlinemix(["cache", "list", "--cache-dir", str(root)]) == 0
    listing = capsys.readouterr().out
    assert listing.startswith(f"{root}: 2 entries") and "lock files" not in listing  # the entries' own locks
    assert listing.count("STALE (input changed") == 1 and listing.count(" ok\n") == 1
    assert onlinemix(["cache", "prune", "--dry-run"]) == 0  # the default folder: $ONLINEMIX_CACHE_DIR
    assert "would remove 1 entries" in capsys.readouterr().out and len(cache.entries(cache_root())) == 2
    assert onlinemix(["cache", "prune", "--max-size", "2 parsecs"]) == 1
    assert "a size must be a number and a unit" in capsys.readouterr().err
    assert onlinemix(["cache", "clear"]) == 0
    assert "removed 2 entries" in capsys.readouterr().out and cache.entries(root) == []
