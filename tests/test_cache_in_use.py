"""Nothing in use is removed: a token cache entry that a live process has open (its DataLoader workers too) or is
building survives ``cache clear``, ``cache prune`` and ``$ONLINEMIX_CACHE_LIMIT``; each case runs two real
processes, the one holding the mixture open and the one removing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import pytest
import yaml
from conftest import lock_held_elsewhere, make_example, write_jsonl

from onlinemix import MixedDataset
from onlinemix.cli import main as onlinemix
from onlinemix.loaders.cache import entries
from onlinemix.loaders.cache.folder import EntryLock
from onlinemix.loaders.prepare import prepare

HOLDER = textwrap.dedent("""\
    import sys
    from onlinemix import MixedDataset, MixedLoader
    dataset = MixedDataset.from_config(sys.argv[1], num_batches=4)
    print("open", flush=True)
    sys.stdin.readline()  # the other process removes what it can now
    for workers in (0, 2):  # in process, then a fresh iteration with worker processes
        batches = list(MixedLoader(dataset, num_workers=workers))
        print(f"read {len(batches)} batches with {workers} workers", flush=True)
""")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(root))
    return root


def hold_open(config, env=None) -> subprocess.Popen:
    """A process that opens ``config`` and waits for a line on its standard input before reading it."""
    process = subprocess.Popen([sys.executable, "-c", HOLDER, str(config)], stdin=subprocess.PIPE,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert process.stdout.readline().strip() == "open", process.stderr.read()
    return process


def finish(process: subprocess.Popen) -> str:
    out, err = process.communicate("go\n", timeout=120)
    assert process.returncode == 0, err[-2000:]
    return out


@pytest.mark.parametrize("command", [["clear"], ["prune", "--max-size", "1B"]])
def test_an_entry_a_live_process_has_open_is_kept_and_read(tmp_path, cache, capsys, command):
    config = make_example(tmp_path)
    holder = hold_open(config)
    try:
        (entry,) = entries.entries(cache)
        assert onlinemix(["cache", *command]) == 0
        out = capsys.readouterr().out
        assert f"kept {entry.folder.name}" in out and "in use" in out and entry.folder.exists()
    finally:
        printed = finish(holder)
    assert "read 4 batches with 0 workers" in printed and "read 4 batches with 2 workers" in printed
    assert onlinemix(["cache", *command]) == 0  # the process is gone: nothing holds it now
    assert not entry.folder.exists() and "kept" not in capsys.readouterr().out


def test_clearing_again_and_again_while_another_process_opens_the_mixture(tmp_path, cache):
    config = make_example(tmp_path)
    opener = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""\
        from onlinemix import MixedDataset
        for _ in range(40):  # each open finds the entry, or builds it again if it was removed in between
            dataset = MixedDataset.from_config({str(config)!r}, num_batches=1)
            next(iter(dataset))
        print("opened 40 times", flush=True)
    """)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    cleared, deadline = 0, time.time() + 120
    while opener.poll() is None and time.time() < deadline:
        entries.clear(cache)
        cleared += 1
        time.sleep(0.02)
    out, err = opener.communicate(timeout=60)
    assert opener.returncode == 0 and "opened 40 times" in out, err[-2000:]
    assert cleared > 3


def test_a_build_in_progress_keeps_its_partial_folder(tmp_path, cache):
    config = make_example(tmp_path)
    MixedDataset.from_config(config)
    (entry,) = entries.entries(cache)
    partial = cache / f".{entry.folder.name}.partial-build"
    partial.mkdir()
    with lock_held_elsewhere(cache / f".{entry.folder.name}.lock"):  # a builder at work
        assert entries.clear(cache) == [] and entries.prune(cache, max_size=0) == []
        assert partial.exists() and entry.folder.exists()
    assert [e.folder for e in entries.clear(cache)] == [entry.folder] and not partial.exists()


def three_domains(tmp_path):
    """Three JSONL domains of about 40 KB each, in a mixture."""
    domains = []
    for name in ("a", "b", "c"):
        write_jsonl(tmp_path / f"{name}.jsonl", [f"{name} document {i} " + "word " * 80 for i in range(100)])
        domains.append({"name": name, "source": "jsonl", "path": f"{name}.jsonl", "weight": 1 / 3})
    config = tmp_path / "mixture.yaml"
    config.write_text(yaml.safe_dump({"seed": 0, "global_batch_size": 8, "seq_len": 32, "domains": domains}))
    return config


def test_a_tiny_cache_limit_never_removes_what_this_process_has_open(tmp_path, cache, monkeypatch):
    config = three_domains(tmp_path)
    monkeypatch.setenv("ONLINEMIX_CACHE_LIMIT", "1B")
    dataset = MixedDataset.from_config(config, num_batches=2)  # the last build's limit must spare the other two
    assert len(entries.entries(cache)) == 3
    assert len(list(dataset)) == 2
    again = MixedDataset.from_config(config, num_batches=2)  # all three are still there: nothing tokenized again
    assert [source.cache.built for source in again.sources] == [False] * 3


def test_prepare_on_two_workers_under_a_tiny_cache_limit(tmp_path, cache, monkeypatch):
    config = three_domains(tmp_path)
    monkeypatch.setenv("ONLINEMIX_CACHE_LIMIT", "1B")
    for _ in range(3):
        results = prepare(config, workers=2)
        assert [result.status for result in results if result.status == "failed"] == [], results


def test_sizes_need_a_unit_and_a_bad_limit_names_its_variable_before_any_work(tmp_path, cache, capsys, monkeypatch):
    config = make_example(tmp_path)
    assert onlinemix(["cache", "prune", "--max-size", "2"]) == 1
    assert "a size must be a number and a unit" in capsys.readouterr().err
    monkeypatch.setenv("ONLINEMIX_CACHE_LIMIT", "50")
    with pytest.raises(ValueError, match=r"\$ONLINEMIX_CACHE_LIMIT=50: a size must be a number and a unit"):
        MixedDataset.from_config(config)
    assert not cache.exists() or entries.entries(cache) == []  # refused before anything was tokenized


def test_the_cache_commands_find_the_folder_a_mixture_names(tmp_path, cache, capsys):
    own = tmp_path / "own-cache"
    config = make_example(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["cache_dir"] = str(own)
    config.write_text(yaml.safe_dump(raw))
    MixedDataset.from_config(config)
    assert len(entries.entries(own)) == 1
    assert onlinemix(["cache", "clear"]) == 0  # the default folder: not the mixture's
    assert len(entries.entries(own)) == 1 and str(cache) in capsys.readouterr().out
    assert onlinemix(["cache", "clear", "--config", str(config)]) == 0
    assert entries.entries(own) == [] and f"removed 1 entries, 0.0 MB from {own}" in capsys.readouterr().out


def test_an_entry_lock_file_removed_under_a_waiting_process_is_not_shared_by_two_holders(tmp_path):
    path = tmp_path / ".entry.lock"
    first = EntryLock(path)
    assert first.acquire()
    second = EntryLock(path)
    assert not second.acquire(wait=False)
    first.release(remove=True)  # as a remover does: the lock file goes with its entry
    assert second.acquire(wait=False) and path.exists()
    third = EntryLock(path)
    assert not third.acquire(wait=False)  # the new file is the one locked, not a second one
    second.release()
    assert os.path.exists(path)
