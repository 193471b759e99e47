"""Domains and token caches in object storage, against a real S3 API server on loopback (moto's server mode, in
a process of its own that the tests kill): the batches are those of the same files on disk, always."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from conftest import write_jsonl, write_tokens
from s3server import S3Server, filesystem, set_environment

from onlinemix.loaders import MixedDataset
from onlinemix.loaders.cache import tokens as tokenized
from onlinemix.loaders.checksums import content_digest
from onlinemix.loaders.config import ConfigError
from onlinemix.loaders.paths import InputError
from onlinemix.loaders.prepare import prepare
from onlinemix.loaders.storage import (
    BACKOFF_ENV,
    RETRIES_ENV,
    TIMEOUT_ENV,
    RemotePath,
    RemoteWindows,
    StorageError,
    remote,
    retrying,
)


@pytest.fixture
def s3(monkeypatch):
    server = S3Server().start()
    for name, value in server.environment.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv(RETRIES_ENV, "2")
    monkeypatch.setenv(BACKOFF_ENV, "0.05")
    set_environment(server)
    yield server
    server.kill()


def make_corpus(root: Path) -> Path:
    """A token-bin file, a folder of JSONL files (one gzipped) and two Parquet files: the three kinds of reads
    (range requests of windows, a streamed decompression, Parquet's own seeks)."""
    data = root / "data"
    write_tokens(data / "web.bin", (np.arange(40_000) * 7 + 3) % 256)
    write_jsonl(data / "prose/a.jsonl", [f"prose {i}: " + "lorem ipsum " * (i % 9) for i in range(120)])
    lines = "".join(json.dumps({"text": f"more prose {i} " * (i % 5 + 1)}) + "\n" for i in range(80))
    (data / "prose/b.jsonl.gz").write_bytes(gzip.compress(lines.encode()))
    for part in range(2):
        texts = [f"wiki {part}.{i}: " + "dolor sit amet " * (i % 6) for i in range(100)]
        (data / "wiki").mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": texts}), data / f"wiki/part-{part}.parquet", row_group_size=37)
    return data


def mixture(root: Path, where: str, name: str, **extra) -> Path:
    """The mixture over ``where`` (the local folder, or a bucket URL), as a file in ``root``."""
    raw = {
        "seed": 7,
        "global_batch_size": 12,
        "seq_len": 32,
        "domains": [
            {"name": "web", "source": "tokenbin", "path": f"{where}/web.bin", "weight": 0.4},
            {"name": "prose", "source": "jsonl", "path": f"{where}/prose", "weight": 0.3},
            {"name": "wiki", "source": "parquet", "path": f"{where}/wiki/*.parquet", "weight": 0.3},
        ],
        **extra,
    }
    path = root / name
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def batches(config: Path, count: int, state: dict | None = None) -> list[dict]:
    dataset = MixedDataset.from_config(config, num_batches=count)
    if state is not None:
        dataset.load_state_dict(state)
    return [{name: values.numpy().copy() for name, values in batch.items()} for batch in dataset]


def assert_same(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for a, b in zip(left, right):
        assert a.keys() == b.keys()
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_a_mixture_in_a_bucket_gives_exactly_the_batches_of_the_same_files_on_disk(s3, tmp_path, monkeypatch):
    data = make_corpus(tmp_path)
    s3.upload(data, "corpus")
    local = batches(mixture(tmp_path, str(data), "local.yaml"), 30)
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "other-cache"))  # nothing of the local run's is reused
    remote_config = mixture(tmp_path, "s3://corpus", "remote.yaml")
    assert_same(batches(remote_config, 30), local)
    # the same bytes are the same data: the sources' identities (content digests) agree, so a checkpoint
    # taken on the local copy resumes on the bucket's
    local_identity = MixedDataset.from_config(mixture(tmp_path, str(data), "local.yaml")).identity()
    assert MixedDataset.from_config(remote_config).identity() == local_identity
    assert content_digest(RemotePath("s3://corpus/web.bin")) == content_digest(data / "web.bin")


def test_token_caches_in_a_bucket_are_prepared_once_and_read_by_every_other_process(s3, tmp_path, monkeypatch):
    data = make_corpus(tmp_path)
    s3.upload(data, "corpus")
    local = batches(mixture(tmp_path, str(data), "local.yaml"), 20)
    config = mixture(tmp_path, "s3://corpus", "shared.yaml", cache_dir="s3://caches/onlinemix")
    filesystem().mkdir("caches")
    results = prepare(config, workers=1)
    assert [(r.domain, r.status) for r in results] == [("web", "scanned"), ("prose", "built"), ("wiki", "built")], [
        r.detail for r in results
    ]
    entries = filesystem().ls("caches/onlinemix")
    assert len(entries) == 2 and all(
        {name.rpartition("/")[2] for name in filesystem().ls(entry)} == {"tokens.bin", "documents.npy", "meta.json"}
        for entry in entries
    )

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("a prepared mixture was tokenized again")

    monkeypatch.setattr(tokenized, "_build", no_tokenizing)
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "another-node"))  # a node with an empty local cache
    assert [r.status for r in prepare(config, workers=1)] == ["scanned", "kept", "kept"]
    assert_same(batches(config, 20), local)  # read from the bucket's caches, window by window


def test_ray_tasks_prepare_into_the_bucket_what_a_local_process_would(s3, tmp_path, monkeypatch):
    pytest.importorskip("ray")
    data = make_corpus(tmp_path)
    s3.upload(data, "corpus")
    filesystem().mkdir("caches")
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "local"))
    MixedDataset.from_config(mixture(tmp_path, str(data), "local.yaml"))  # local caches, by first opens
    local = sorted(p.parent.name for p in (tmp_path / "local").glob("*/meta.json"))
    config = mixture(tmp_path, "s3://corpus", "shared.yaml", cache_dir="s3://caches/onlinemix")
    results = prepare(config, workers=2, engine="ray")  # the cluster's tasks inherit the S3 endpoint from here
    assert [r.status for r in results] == ["scanned", "built", "built"], [r.detail for r in results]
    in_bucket = sorted(entry.rpartition("/")[2] for entry in filesystem().ls("caches/onlinemix"))
    assert in_bucket == local and len(local) == 2  # the same keys (content, not place), the parts gone
    for entry in in_bucket:  # byte for byte what a local first open wrote (meta.json names the files' places)
        for name in ("tokens.bin", "documents.npy"):
            remote = filesystem().cat_file(f"caches/onlinemix/{entry}/{name}")
            assert remote == (tmp_path / "local" / entry / name).read_bytes()


def read_rank(rank: int, world: int, config: str, cache: str) -> list:
    """One gloo rank, a node of its own (an empty local cache folder), reading its slices of 4 batches."""
    import os

    os.environ["ONLINEMIX_CACHE_DIR"] = cache  # a spawned rank imports conftest, which sets a cache of its own
    dataset = MixedDataset.from_config(config, num_batches=4, rank=rank, world_size=world)
    return [batch["input_ids"].tolist() for batch in dataset]


def test_ranks_on_several_nodes_read_the_caches_prepared_in_the_bucket(s3, tmp_path):
    from conftest import run_ranks

    data = make_corpus(tmp_path)
    s3.upload(data, "corpus")
    filesystem().mkdir("caches")
    config = mixture(tmp_path, "s3://corpus", "shared.yaml", cache_dir="s3://caches/onlinemix")
    prepare(config, workers=1)
    slices = run_ranks(2, tmp_path / "ranks", read_rank, config=str(config), cache=str(tmp_path / "node"))
    local = mixture(tmp_path, str(data), "local.yaml")
    for rank, got in enumerate(slices):
        expected = MixedDataset.from_config(local, num_batches=4, rank=rank, world_size=2)
        assert got == [batch["input_ids"].tolist() for batch in expected]
    assert not list(tmp_path.glob("node/*jsonl-*"))  # no node tokenized anything: the bucket had it all


def test_a_dead_server_is_one_error_naming_the_object_and_the_run_resumes_exactly(s3, tmp_path, monkeypatch):
    data = make_corpus(tmp_path)
    local = batches(mixture(tmp_path, str(data), "local.yaml"), 40)
    s3.upload(data, "corpus")
    config = mixture(tmp_path, "s3://corpus", "remote.yaml")
    dataset = MixedDataset.from_config(config, num_batches=40)
    iterator = iter(dataset)
    read = [next(iterator) for _ in range(10)]
    state = iterator.state_dict()
    s3.kill()
    with pytest.raises(StorageError) as failure:  # the batches fetched ahead come first, then the error
        for batch in iterator:
            read.append(batch)
    message = str(failure.value)
    assert message.startswith("s3://corpus/web.bin (") and "failed 3 times" in message and "\n" not in message
    assert_same([{k: v.numpy() for k, v in batch.items()} for batch in read], local[: len(read)])

    s3.start()  # back, empty (moto keeps objects in memory): the data is uploaded again
    s3.upload(data, "corpus")
    resumed = MixedDataset.from_config(config, num_batches=40)
    iterator = iter(resumed)
    iterator.load_state_dict(state)
    assert_same([{k: v.numpy() for k, v in batch.items()} for batch in iterator], local[10:])


def test_windows_fetched_ahead_are_read_without_the_server(s3, tmp_path):
    tokens = write_tokens(tmp_path / "t.bin", np.arange(5_000) % 1000)
    s3.upload(tmp_path, "bucket")
    windows = RemoteWindows(RemotePath("s3://bucket/t.bin"), np.dtype("uint16"), width=9, stride=8)
    ahead = np.array([500, 3, 77, 3])
    windows.prefetch(ahead)
    np.testing.assert_array_equal(windows.read(np.array([10])), [(np.arange(80, 89) % 1000)])  # its own request
    deadline = time.monotonic() + 30
    while windows.in_flight() and time.monotonic() < deadline:
        time.sleep(0.01)
    s3.kill()
    expected = np.fromfile(tokens, dtype=np.uint16)
    got = windows.read(ahead[:3])
    np.testing.assert_array_equal(got, np.stack([expected[i * 8 : i * 8 + 9] for i in (500, 3, 77)]))
    with pytest.raises(StorageError, match=r"^s3://bucket/t.bin \(1 ranges from byte 48\): "):
        windows.read(np.array([3]))  # read once already: fetched again, and the server is gone


def test_paths_that_name_nothing_are_errors_naming_them(s3, tmp_path):
    make_corpus(tmp_path)
    s3.upload(tmp_path / "data", "corpus")
    config = mixture(tmp_path, "s3://corpus", "m.yaml")
    raw = yaml.safe_load(config.read_text())
    for path, message in [
        ("s3://corpus/nothing/*.jsonl", "no object matches s3://corpus/nothing/\\*.jsonl"),
        ("s3://corpus/absent.jsonl", "no object at s3://corpus/absent.jsonl"),
        ("s3://corpus/wiki", "s3://corpus/wiki is a folder with no .jsonl / .jsonl.gz"),
    ]:
        raw["domains"][1]["path"] = path
        config.write_text(yaml.safe_dump(raw))
        with pytest.raises(ConfigError, match=f"domain 'prose': {message}"):
            MixedDataset.from_config(config)
    with pytest.raises(ImportError, match=r"reading nosuch://x/y\.bin needs fsspec's nosuch:// backend \(.*nosuch\)$"):
        RemotePath("nosuch://x/y.bin").stat()
    with pytest.raises(ImportError, match=r"gs:// backend \(.*\): pip install 'onlinemix\[gcs\]'$"):
        RemotePath("gs://bucket/web.bin").stat()  # gcsfs is not installed here
    with pytest.raises(InputError, match="no object at s3://corpus/absent"):
        from onlinemix.loaders.paths import expand_paths

        expand_paths("s3://corpus/absent", Path("."), (".jsonl",))


def test_records_through_a_transform_are_read_from_the_bucket_by_offset(s3, tmp_path):
    data = make_corpus(tmp_path)
    (data / "prose/b.jsonl.gz").unlink()  # records by index need an uncompressed file, on disk as in a bucket
    s3.upload(data, "corpus")
    shouted = []
    for where in (str(data), "s3://corpus"):
        config = mixture(tmp_path, where, "t.yaml")
        raw = yaml.safe_load(config.read_text())
        raw["seq_len"] = 128
        raw["domains"] = [{**raw["domains"][1], "transform": "conftest:shout", "weight": 1.0}]
        config.write_text(yaml.safe_dump(raw))
        shouted.append(batches(config, 8))
    assert_same(shouted[1], shouted[0])
    assert bytes(shouted[0][0]["input_ids"][0][:6].astype(np.uint8)).decode() == "PROSE "


def test_file_urls_are_local_paths(tmp_path):
    data = make_corpus(tmp_path)
    assert_same(
        batches(mixture(tmp_path, f"file://{data}", "file.yaml"), 5), batches(mixture(tmp_path, str(data), "l.yaml"), 5)
    )


def test_retries_back_off_and_give_up_in_one_line(monkeypatch):
    monkeypatch.setenv(RETRIES_ENV, "3")
    monkeypatch.setenv(BACKOFF_ENV, "0.01")
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionResetError("reset by peer")
        return "data"

    assert retrying("s3://b/k", flaky) == "data" and len(calls) == 3

    def down():
        raise TimeoutError("timed out\nsecond line")

    with pytest.raises(StorageError, match=r"^s3://b/k: TimeoutError: timed out \(failed 4 times in 0 s; the retries"):
        retrying("s3://b/k", down)

    def refused():
        calls.append(1)
        raise PermissionError("access denied")

    calls.clear()
    with pytest.raises(PermissionError, match="s3://b/k: access denied"):
        retrying("s3://b/k", refused)
    assert len(calls) == 1  # a refused permission is not retried


REMOTE_READER = """
import sys, time
from onlinemix import MixedDataset, MixedLoader
dataset = MixedDataset.from_config(sys.argv[1], num_batches=6)
BEFORE_READING
started = time.monotonic()
try:
    batches = len(list(MixedLoader(dataset)))
    print(f"read {batches} batches", flush=True)
except Exception as error:
    print(f"{type(error).__name__} after {time.monotonic() - started:.1f} s: {error}", flush=True)
"""


def run_remote_reader(config: Path, environment: dict, before_reading: str = "") -> subprocess.CompletedProcess:
    """``REMOTE_READER`` in a process of its own (a fresh client, an interpreter exit of its own), running
    ``before_reading`` between opening the mixture and reading it."""
    script = REMOTE_READER.replace("BEFORE_READING", before_reading)
    return subprocess.run([sys.executable, "-c", script, str(config)], env=environment, capture_output=True,
                          text=True, timeout=240)  # fmt: skip


def test_a_dead_endpoint_is_one_line_within_the_time_allowed_and_no_warning_before_it(s3, tmp_path):
    data = make_corpus(tmp_path)
    s3.upload(data, "corpus")
    config = mixture(tmp_path, "s3://corpus", "remote.yaml")
    MixedDataset.from_config(config)  # the caches, built while the server is up
    environment = {key: value for key, value in os.environ.items() if key != "AWS_MAX_ATTEMPTS"}  # the client's
    environment.update({RETRIES_ENV: "20", BACKOFF_ENV: "0.5", TIMEOUT_ENV: "3"})  # the budget decides
    stop = f"import os, signal; os.kill({s3.process.pid}, signal.SIGKILL); time.sleep(0.5)"  # the server dies
    done = run_remote_reader(config, environment, stop)
    line = done.stdout.strip()
    assert line.startswith("StorageError after "), (line, done.stderr[-2000:])
    seconds = float(line.split()[2])
    assert seconds < 3 + remote.CONNECT_TIMEOUT + 2, line  # the time allowed, and the one request under way
    assert "failed" in line and f"the time allowed {TIMEOUT_ENV}" in line and "\n" not in line
    assert "retrying" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_missing_credentials_are_said_at_once_not_retried(s3, tmp_path):
    data = make_corpus(tmp_path)
    s3.upload(data, "corpus")
    config = mixture(tmp_path, "s3://corpus", "remote.yaml")
    environment = {key: value for key, value in os.environ.items() if not key.startswith("AWS_ACCESS")
                   and not key.startswith("AWS_SECRET")}  # fmt: skip
    nowhere = str(tmp_path / "none")
    environment.update({"AWS_SHARED_CREDENTIALS_FILE": nowhere, "AWS_CONFIG_FILE": nowhere,
                        "AWS_EC2_METADATA_DISABLED": "true", TIMEOUT_ENV: "60"})  # fmt: skip
    done = subprocess.run([sys.executable, "-m", "onlinemix", "inspect", str(config), "--steps", "2"],
                          env=environment, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    error = done.stderr.strip().splitlines()[-1]
    assert error.startswith("onlinemix: error: ") and "NoCredentialsError" in error and "not retried" in error, error


def test_a_clean_exit_after_reading_from_a_bucket_prints_nothing(s3, tmp_path):
    data = make_corpus(tmp_path)
    s3.upload(data, "corpus")
    config = mixture(tmp_path, "s3://corpus", "remote.yaml")
    done = run_remote_reader(config, dict(os.environ))
    assert done.stdout.strip() == "read 6 batches" and done.stderr == "", done.stderr[-2000:]
