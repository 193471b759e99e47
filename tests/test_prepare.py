"""``onlinemix prepare``: the caches a first open builds, built beforehand, the same whatever the workers."""

from __future__ import annotations

import gzip
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import make_example, write_jsonl

from onlinemix.cli import main
from onlinemix.loaders import MixedDataset
from onlinemix.loaders.cache import tokens as tokenized
from onlinemix.loaders.prepare import prepare


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
    config = make_example(tmp_path)
    assert main(["prepare", str(config), "--workers", workers]) != 0
    assert "--workers must be >= " in capsys.readouterr().err
    with pytest.raises(ValueError, match=f"workers must be >= 1, got {workers}"):
        prepare(config, workers=int(workers))


def test_a_prepared_cache_holds_the_documents_in_order(tmp_path, monkeypatch):
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    config = make_example(tmp_path)
    prepare(config, workers=1, domains=["prose"])
    entry = next(p for p in (tmp_path / "cache").iterdir() if p.name.startswith("jsonl-"))
    starts = np.load(entry / "documents.npy")
    tokens = np.fromfile(entry / "tokens.bin", dtype=np.uint16)
    first = bytes(tokens[starts[0] : starts[1]][tokens[starts[0] : starts[1]] < 256].astype(np.uint8)).decode()
    assert first.startswith("document 0: ")


def open_mixture(rank: int, world: int, config: str, cache: str) -> dict:
    """One gloo rank opening the mixture (module level: spawned): did it build the token cache, and what is in it."""
    import hashlib
    import os

    import torch.distributed as dist

    os.environ["ONLINEMIX_CACHE_DIR"] = cache  # a spawned rank imports conftest, which sets a cache of its own

    dataset = MixedDataset.from_config(config, num_batches=2)
    cache = dataset.sources[dataset.names.index("prose")].cache
    dist.barrier()  # every rank has opened it before any reports
    return {"built": cache.built, "tokens": hashlib.sha256(cache.tokens_path.read_bytes()).hexdigest()}


def test_ranks_opening_an_unprepared_mixture_at_once_tokenize_it_once(tmp_path):
    from conftest import run_ranks

    config = make_example(tmp_path)
    records = run_ranks(4, tmp_path / "ranks", open_mixture, config=str(config), cache=str(tmp_path / "shared"))
    assert sorted(r["built"] for r in records) == [False, False, False, True]  # one builds, the others wait and open it
    assert len({r["tokens"] for r in records}) == 1


def make_split_example(root: Path) -> Path:
    """The example mixture plus a domain of four JSONL files (one gzipped), which prepare tokenizes file by file."""
    config = make_example(root)
    for number in range(4):
        texts = [f"file {number} document {i}: " + "sed ut perspiciatis " * (i % 5) for i in range(40 + number)]
        write_jsonl(root / f"data/books/{number}.jsonl", texts)
    gzipped = root / "data/books/3.jsonl"
    gzipped.with_suffix(".jsonl.gz").write_bytes(gzip.compress(gzipped.read_bytes()))
    gzipped.unlink()
    raw = yaml.safe_load(config.read_text())
    raw["domains"].append({"name": "books", "source": "jsonl", "path": "data/books", "weight": 0.1})
    raw["domains"][0]["weight"] = 0.4
    config.write_text(yaml.safe_dump(raw, sort_keys=False))
    return config


def jsonl_entries(root: Path) -> dict[str, dict[str, bytes]]:
    return {p.name: cache_files(p) for p in sorted(root.iterdir()) if p.name.startswith("jsonl-")}


def test_a_domain_of_many_files_is_tokenized_file_by_file_into_the_cache_one_process_writes(tmp_path, monkeypatch):
    config = make_split_example(tmp_path)
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "first-open"))
    MixedDataset.from_config(config)  # no prepare: each domain tokenized whole by its first open
    expected = jsonl_entries(tmp_path / "first-open")
    assert len(expected) == 2  # prose and books, nothing else
    for workers in (1, 2):
        monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / f"prepared{workers}"))
        results = prepare(config, workers=workers)
        assert [r.status for r in results] == ["scanned", "built", "scanned", "built"]
        assert results[3].detail.endswith("(from 4 parts)")
        assert jsonl_entries(tmp_path / f"prepared{workers}") == expected  # the parts are gone, the caches equal


def test_a_killed_or_failed_prepare_keeps_the_files_it_finished(tmp_path, monkeypatch):
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    config = make_split_example(tmp_path)
    broken = tmp_path / "data/books/2.jsonl"
    good = broken.read_bytes()
    broken.write_bytes(good + b"{not json\n")
    books = prepare(config, workers=1, domains=["books"])[0]
    assert books.status == "failed" and books.detail.startswith(f"{broken}: line 43 is not valid JSON")
    assert len(jsonl_entries(tmp_path / "cache")) == 3  # the parts of the three good files, kept

    tokenized_now = []
    build = tokenized._build
    monkeypatch.setattr(tokenized, "_build", lambda documents, *args: tokenized_now.append(documents.path) or build(
        documents, *args))  # fmt: skip
    broken.write_bytes(good)
    assert prepare(config, workers=1, domains=["books"])[0].status == "built"
    assert tokenized_now == [str(broken)]  # the repaired file alone; the domain is assembled from its parts


def test_ray_writes_the_same_caches_as_local_processes(tmp_path, monkeypatch):
    pytest.importorskip("ray")
    config = make_split_example(tmp_path)
    built = {}
    for engine in ("local", "ray"):
        monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / engine))
        results = prepare(config, workers=2, engine=engine)
        assert [r.status for r in results] == ["scanned", "built", "scanned", "built"], engine
        built[engine] = jsonl_entries(tmp_path / engine)
    assert built["ray"] == built["local"] and len(built["ray"]) == 2
    with pytest.raises(ValueError, match="engine must be one of local, ray"):
        prepare(config, engine="spark")


def test_each_worker_gets_its_share_of_the_cores_for_its_tokenizer(monkeypatch):
    from onlinemix.loaders.engines import thread_shares

    monkeypatch.setattr("os.cpu_count", lambda: 8)
    monkeypatch.delenv("RAYON_NUM_THREADS", raising=False)
    monkeypatch.delenv("RAYON_RS_NUM_CPUS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert thread_shares(2) == {"RAYON_NUM_THREADS": "4", "RAYON_RS_NUM_CPUS": "4", "OMP_NUM_THREADS": "4"}
    assert thread_shares(16)["RAYON_NUM_THREADS"] == "1"
    monkeypatch.setenv("RAYON_NUM_THREADS", "3")  # the user's choice stands
    assert thread_shares(2)["RAYON_NUM_THREADS"] == "3"


PARENT = """
import os, sys, time
from tqdm import tqdm
from onlinemix.loaders.engines import engine_runner
with engine_runner("local", 2, time.sleep) as run:
    print(os.getpid(), flush=True)
    run([(60,), (60,)], tqdm(disable=True))
"""


def test_local_workers_end_when_their_parent_is_killed(tmp_path):
    parent = subprocess.Popen([sys.executable, "-c", PARENT], stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())

    def workers() -> list[int]:
        children = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout.split()
        return [int(child) for child in children]

    deadline = time.monotonic() + 60
    while len(workers()) < 2 and time.monotonic() < deadline:  # the two workers (and the resource tracker)
        time.sleep(0.2)
    spawned = workers()
    assert len(spawned) >= 2
    os.kill(pid, signal.SIGKILL)  # as a job scheduler ends a job: no cleanup runs
    parent.wait()
    deadline = time.monotonic() + 20
    while any(_alive(child) for child in spawned) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not any(_alive(child) for child in spawned), "a worker outlived its killed parent"


def _alive(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/stat").read_text().split()[2]
    except OSError:
        return False
    return status != "Z"  # a zombie has exited; only its entry waits to be collected


def test_where_the_file_resamples_by_dsir_prepare_writes_the_sidecars_importance_score_writes(tmp_path, monkeypatch):
    from conftest import write_jsonl

    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    words = {True: "matrix vector tensor gradient", False: "river meadow orchard harvest"}
    write_jsonl(tmp_path / "science.jsonl", [f"{words[i % 3 == 0]} item {i}" for i in range(120)])
    write_jsonl(tmp_path / "garden.jsonl", [f"{words[i % 4 == 0]} item {i}" for i in range(80)])
    write_jsonl(tmp_path / "target.jsonl", [f"{words[True]} item {i}" for i in range(20)])
    domains = [
        {"name": name, "source": "jsonl", "path": f"{name}.jsonl", "samples": "documents"}
        for name in ("science", "garden")
    ]
    base = {"seed": 7, "global_batch_size": 8, "seq_len": 32, "domains": domains}
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(base))
    assert main(["importance", "fit", "--target", str(tmp_path / "target.jsonl"), "--config",
                 str(tmp_path / "base.yaml"), "-o", str(tmp_path / "est.npz"), "--min-words", "2"]) == 0  # fmt: skip
    assert main(["importance", "score", str(tmp_path / "est.npz"), "--config", str(tmp_path / "base.yaml"),
                 "--out", str(tmp_path / "by-score")]) == 0  # fmt: skip
    (tmp_path / "scores").mkdir()
    config = tmp_path / "mixture.yaml"
    config.write_text(yaml.safe_dump({**base, "importance": {"estimator": "est.npz", "sidecars": "scores"}}))
    results = prepare(config, workers=2)  # the token caches: built when `importance score` opened the domains
    assert [r.status for r in results] == ["kept", "kept"]
    assert [r.detail.split("; ")[1] for r in results] == [f"DSIR scores of {n} documents in {tmp_path / 'scores'}"
                                                          for n in (120, 80)]  # fmt: skip
    for name in ("science", "garden"):
        ours = np.load(tmp_path / "scores" / f"{name}.importance.npy")
        assert np.array_equal(ours, np.load(tmp_path / "by-score" / f"{name}.importance.npy"))
    written = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "scores").iterdir()}
    assert [r.status for r in prepare(config, workers=1)] == ["kept", "kept"]
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "scores").iterdir()} == written  # complete: not rewritten
    assert len(list(MixedDataset.from_config(config, num_batches=2))) == 2  # resampled by the sidecars


# -- one large file, in parts --------------------------------------------------------------------------------

MIB = 1 << 20


def large_jsonl(path: Path, megabytes: float) -> Path:
    """Lines of varied length (some blank, some long), about ``megabytes`` of them, no newline at the end."""
    rng = np.random.default_rng(4)
    lines, size = [], 0
    while size < megabytes * MIB:
        words = " ".join(f"w{int(x)}" for x in rng.integers(0, 5000, int(rng.integers(1, 400))))
        line = "" if rng.random() < 0.02 else json.dumps({"text": f"{len(lines)} {words}", "n": len(lines)})
        lines.append(line)
        size += len(line) + 1
    path.write_text("\n".join(lines))
    return path


def one_file_mixture(root: Path, source: str, path: str, **extra) -> Path:
    config = {"seed": 0, "global_batch_size": 4, "seq_len": 64,
              "domains": [{"name": "big", "source": source, "path": path, **extra}]}  # fmt: skip
    (root / "mixture.yaml").write_text(yaml.safe_dump(config))
    return root / "mixture.yaml"


def test_line_pieces_cut_a_file_at_line_starts_and_cover_it(tmp_path):
    from onlinemix.loaders.paths import line_pieces

    path = large_jsonl(tmp_path / "big.jsonl", 3)
    data = path.read_bytes()
    pieces = line_pieces(path, MIB)
    assert pieces[0][0] == 0 and pieces[-1][1] == len(data) and len(pieces) in (3, 4)
    assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(pieces))  # contiguous
    assert all(data[start - 1 : start] == b"\n" for start, _ in pieces[1:])  # each after a newline
    long_line = tmp_path / "long.jsonl"
    long_line.write_bytes(b"a" * (3 * MIB) + b"\nb\n")  # a line longer than a piece: one piece holds it whole
    assert line_pieces(long_line, MIB) == [(0, 3 * MIB + 1), (3 * MIB + 1, 3 * MIB + 3)]


def test_one_large_jsonl_file_is_prepared_in_parts_into_the_cache_a_first_open_writes(tmp_path, monkeypatch):
    large_jsonl(tmp_path / "big.jsonl", 3.5)
    config = one_file_mixture(tmp_path, "jsonl", "big.jsonl")
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "first-open"))
    MixedDataset.from_config(config)
    expected = jsonl_entries(tmp_path / "first-open")
    engines = [("local", 1), ("local", 2), ("local", 4)]
    try:
        import ray  # noqa: F401

        engines.append(("ray", 2))
    except ImportError:
        pass
    for engine, workers in engines:
        monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / f"{engine}{workers}"))
        (result,) = prepare(config, workers=workers, engine=engine, part_size=MIB)
        assert result.status == "built" and result.detail.endswith("(from 4 parts)"), (engine, workers)
        assert jsonl_entries(tmp_path / f"{engine}{workers}") == expected, (engine, workers)  # meta.json included


def test_a_part_is_never_cut_again_whatever_part_size_its_build_sees(tmp_path, monkeypatch):
    from onlinemix.loaders.cache.tokens import file_parts, parts_of

    large_jsonl(tmp_path / "big.jsonl", 2.5)
    config = one_file_mixture(tmp_path, "jsonl", "big.jsonl")
    (source,) = MixedDataset.from_config(config).sources
    parts = file_parts(source.documents, MIB)
    assert len(parts) == 3 and all(file_parts(part, MIB) == [] for part in parts)
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    with parts_of(MIB):  # in this process (one worker), each part's build sees the size it was cut by
        (result,) = prepare(config, workers=1, part_size=MIB)
    assert result.status == "built" and result.detail.endswith("(from 3 parts)")


def test_a_large_file_is_cut_once_to_plan_and_once_to_assemble_not_again_by_every_part(tmp_path, monkeypatch):
    from onlinemix.loaders.sources import JsonlSource

    large_jsonl(tmp_path / "big.jsonl", 3.5)
    cuts, pieces = [], JsonlSource.pieces
    monkeypatch.setattr(JsonlSource, "pieces", lambda self, file, size: cuts.append(size) or pieces(self, file, size))
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    (result,) = prepare(one_file_mixture(tmp_path, "jsonl", "big.jsonl"), workers=1, part_size=MIB)
    assert result.detail.endswith("(from 4 parts)") and cuts == [MIB, MIB]  # each part's task is given its cut


def test_a_bad_line_in_a_later_part_is_named_by_file_line_and_byte(tmp_path, monkeypatch):
    path = large_jsonl(tmp_path / "big.jsonl", 2.5)
    data = path.read_bytes()
    cut = data.index(b"\n", 2 * MIB) + 1
    path.write_bytes(data[:cut] + b"{broken\n" + data[cut:])
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    (result,) = prepare(one_file_mixture(tmp_path, "jsonl", "big.jsonl"), workers=1, part_size=MIB)
    assert result.status == "failed"
    assert re.match(rf"{re.escape(str(path))}: line \d+ after byte [\d,]+ is not valid JSON", result.detail)


def test_a_parquet_file_is_prepared_by_row_groups_into_the_cache_a_first_open_writes(tmp_path, monkeypatch):
    pyarrow = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    rows = [json.loads(line)["text"] for line in large_jsonl(tmp_path / "rows.jsonl", 3).read_text().splitlines()
            if line]  # fmt: skip
    pq.write_table(pyarrow.table({"text": rows}), tmp_path / "big.parquet", row_group_size=len(rows) // 9)
    assert pq.ParquetFile(tmp_path / "big.parquet").num_row_groups >= 9
    config = one_file_mixture(tmp_path, "parquet", "big.parquet")
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "first-open"))
    MixedDataset.from_config(config)
    expected = {p.name: cache_files(p) for p in (tmp_path / "first-open").iterdir() if p.name.startswith("parquet-")}
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "prepared"))
    (result,) = prepare(config, workers=2, part_size=MIB)
    parts = int(re.search(r"from (\d+) parts", result.detail)[1])
    assert result.status == "built" and parts >= 2
    found = {p.name: cache_files(p) for p in (tmp_path / "prepared").iterdir() if p.name.startswith("parquet-")}
    assert found == expected


def test_a_compressed_file_is_one_part(tmp_path, monkeypatch):
    path = large_jsonl(tmp_path / "big.jsonl", 2.5)
    with gzip.open(tmp_path / "big.jsonl.gz", "wb") as packed:
        packed.write(path.read_bytes())
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "cache"))
    (result,) = prepare(one_file_mixture(tmp_path, "jsonl", "big.jsonl.gz"), workers=2, part_size=MIB)
    assert result.status == "built" and "parts" not in result.detail


def test_the_part_size_must_be_a_size(tmp_path, capsys):
    config = one_file_mixture(tmp_path, "jsonl", "big.jsonl")
    large_jsonl(tmp_path / "big.jsonl", 0.1)
    assert main(["prepare", str(config), "--part-size", "32"]) == 1
    assert "a size must be a number and a unit" in capsys.readouterr().err
    with pytest.raises(ValueError, match="part_size must be at least 1 MiB"):
        prepare(config, part_size=1000)
