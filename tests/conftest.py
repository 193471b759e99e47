"""Small hermetic mixtures built in ``tmp_path``."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import yaml

# Token caches of the tests go to a folder of their own, never the user's ~/.cache/onlinemix (workers and
# spawned ranks inherit it).
os.environ["ONLINEMIX_CACHE_DIR"] = tempfile.mkdtemp(prefix="onlinemix-test-cache-")

# The mixture from the core issue, verbatim except that data lives in tmp_path.
EXAMPLE_CONFIG = """\
seed: 1234
global_batch_size: 32
seq_len: 128
weighting: {temperature: 1.0}   # used only when no domain gives a weight: p ∝ size^(1/T)
domains:
  - {name: code,  source: tokenbin, path: data/code.bin, dtype: uint16, weight: 0.5}
  - {name: prose, source: jsonl,    path: data/prose.jsonl, field: text, weight: 0.3, max_epochs: 2}
  - {name: web,   source: tokenbin, path: data/web.bin, dtype: uint16, weight: 0.2}
"""


def write_tokens(path: Path, tokens: np.ndarray, dtype: str = "uint16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(tokens, dtype=dtype).tofile(path)
    return path


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return path


def make_example(root: Path, code_tokens: int = 20_000, web_tokens: int = 9_000, documents: int = 150) -> Path:
    """The example config's three domains: two token-bin files of byte-tokenizer ids (the vocabulary of the JSONL
    domain's default tokenizer) and a JSONL file of short documents, packed into windows."""
    write_tokens(root / "data/code.bin", np.arange(code_tokens) % 256)
    write_tokens(root / "data/web.bin", (7 * np.arange(web_tokens) + 3) % 256)
    write_jsonl(root / "data/prose.jsonl", [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(documents)])
    config = root / "mixture.yaml"
    config.write_text(EXAMPLE_CONFIG)
    return config


def write_config(root: Path, **overrides) -> Path:
    """The example config with top-level keys replaced (``domains`` included)."""
    raw = yaml.safe_load(EXAMPLE_CONFIG)
    raw.update(overrides)
    path = root / "mixture.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def example(tmp_path: Path) -> Path:
    return make_example(tmp_path)


@contextmanager
def lock_held_elsewhere(lock: Path) -> Iterator[None]:
    """A cache entry's lock (``.<entry>.lock``) held exclusively by another process, as a builder holds it, for
    the duration of the block."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "from onlinemix.loaders.cache.folder import EntryLock; from pathlib import Path; "
         f"import time; held = EntryLock(Path({str(lock)!r})); held.acquire(); print('held', flush=True); "
         "time.sleep(60)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def byte_window(text: str, seq_len: int = 128) -> dict:
    """A document's first ``seq_len + 1`` byte tokens as an input/label pair, padded (label -100 past its end)."""
    from onlinemix.loaders.tokenizers import ByteTokenizer

    ids = ByteTokenizer().encode(text)[: seq_len + 1]
    window = np.full(seq_len + 1, ByteTokenizer.PAD, dtype=np.int64)
    window[: len(ids)] = ids
    labels = window[1:].copy()
    labels[max(len(ids) - 1, 0) :] = -100
    return {"input_ids": window[:-1], "labels": labels}


def shout(record: dict) -> dict:
    """A config-named transform (``conftest:shout``): upper-case the text, then byte-tokenize."""
    return byte_window(record["text"].upper())


def ids_only(record: dict) -> dict:
    """A transform whose fields differ from the token-bin domains' (``conftest:ids_only``)."""
    return {"input_ids": np.zeros(128, dtype=np.int64)}


def resealed(state: dict) -> dict:
    """A state dict changed on purpose (a checkpoint of another mixture, say) sealed again with its new digest, as
    if it had been saved so: what a test of the checks behind the digest needs."""
    from onlinemix.loaders.state_digest import DIGEST, seal

    return seal({key: value for key, value in state.items() if key != DIGEST})


def _rank_entry(rank: int, world: int, folder: Path, target: Callable, kwargs: dict) -> None:
    import torch.distributed as dist

    try:
        dist.init_process_group("gloo", init_method=f"file://{folder / 'rendezvous'}", rank=rank, world_size=world)
        result = target(rank=rank, world=world, **kwargs)
        (folder / f"rank{rank}.json").write_text(json.dumps(result))
        dist.destroy_process_group()
    except BaseException:
        (folder / f"rank{rank}.failed").write_text(traceback.format_exc())
        raise


def run_ranks(world: int, folder: Path, target: Callable, **kwargs) -> list:
    """``target(rank=r, world=world, **kwargs)`` on ``world`` spawned processes joined by ``torch.distributed`` (gloo,
    a file rendezvous: loopback only); each rank's JSON-able return value, in rank order. A rank that raises
    fails the test with its traceback. ``target`` must be a module-level function (spawn pickles it)."""
    folder.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    processes = [
        context.Process(target=_rank_entry, args=(rank, world, folder, target, kwargs)) for rank in range(world)
    ]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=300)
    failures = [path.read_text() for path in sorted(folder.glob("*.failed"))]
    assert not failures, failures[0]
    assert all(process.exitcode == 0 for process in processes), [p.exitcode for p in processes]
    return [json.loads((folder / f"rank{rank}.json").read_text()) for rank in range(world)]
