"""MDS and WebDataset shards, written by the libraries' own writers, read back through onlinemix."""

from __future__ import annotations

import io
import json
import pickle
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import webdataset
import yaml
from conftest import write_tokens
from streaming import MDSWriter

from onlinemix.loaders import MixedDataset, MixedLoader
from onlinemix.loaders.config import ConfigError, MixtureConfig
from onlinemix.loaders.plan import shard_order
from onlinemix.loaders.sources import MdsSource, SourceError, TokenizedSource, WebDatasetSource
from onlinemix.loaders.sources.wds import ShardIndex, decode_npy
from onlinemix.loaders.tokenizers import ByteTokenizer

SEQ_LEN = 16


def documents(n: int, seed: int = 0) -> list[np.ndarray]:
    """Token-id documents of varied length, in the byte tokenizer's vocabulary; each starts at its own id."""
    lengths = np.random.default_rng(seed).integers(1, 40, size=n)
    return [((7 * i + np.arange(length)) % 256).astype(np.uint16) for i, length in enumerate(lengths)]


def write_wds(folder: Path, docs: list[np.ndarray], per_shard: int = 7) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    with webdataset.ShardWriter(str(folder / "part-%04d.tar"), maxcount=per_shard, verbose=0) as sink:
        for i, doc in enumerate(docs):
            sink.write({"__key__": f"doc{i:05d}", "npy": doc, "txt": f"text of {i}", "json": {"text": f"j{i}"}})
    return folder


def write_mds(folder: Path, docs: list[np.ndarray], size_limit: int = 600, compression: str | None = None) -> Path:
    columns = {"tokens": "ndarray:uint16", "text": "str", "id": "int"}
    with MDSWriter(out=str(folder), columns=columns, size_limit=size_limit, compression=compression) as sink:
        for i, doc in enumerate(docs):
            sink.write({"tokens": doc, "text": f"text of {i}", "id": i})
    return folder


def window(doc: np.ndarray) -> np.ndarray:
    """A token-id document as a per-document sample: its first SEQ_LEN ids, padded with 257."""
    out = np.full(SEQ_LEN, 257, dtype=np.int64)
    head = doc[:SEQ_LEN].astype(np.int64)
    out[: len(head)] = head
    return out


def per_document(source, tmp_path: Path) -> TokenizedSource:
    """One sample per document of a shard source (the byte tokenizer: token-id documents are taken as they are)."""
    return TokenizedSource(source, ByteTokenizer(), SEQ_LEN, "documents", cache_dir=tmp_path / "cache")


def ids_window(record: dict) -> dict:
    """A config-named transform (``test_shards:ids_window``): a record's token-id document as one sample."""
    ids = window(np.asarray(record["document"]))
    return {"input_ids": ids, "labels": ids}


# ----------------------------------------------------------------------------- WebDataset


def test_webdataset_shards_read_back_exactly(tmp_path):
    docs = documents(40)
    source = WebDatasetSource(write_wds(tmp_path / "wds", docs))
    assert len(source) == 40 and source.shard_sizes.tolist() == [7, 7, 7, 7, 7, 5]
    assert source.field == "npy"  # the token ids win over the text by default
    for i in (0, 6, 7, 39):
        record = source.record(i)
        assert (
            record["__key__"] == f"doc{i:05d}"
            and record["txt"] == f"text of {i}"
            and record["json"] == {"text": f"j{i}"}
        )
        np.testing.assert_array_equal(record["npy"], docs[i])
    batch = per_document(source, tmp_path).read_batch(np.array([5, 33, 0]))
    np.testing.assert_array_equal(batch["input_ids"], [window(docs[5]), window(docs[33]), window(docs[0])])
    assert per_document(WebDatasetSource(tmp_path / "wds", field="txt"), tmp_path).text(12) == "text of 12"
    assert WebDatasetSource(tmp_path / "wds", field="json").record(3)["document"] == "j3"
    packed = TokenizedSource(source, ByteTokenizer(), SEQ_LEN, cache_dir=tmp_path / "cache")
    stream = np.concatenate(docs).astype(np.int64)  # token-id documents are concatenated as they are
    np.testing.assert_array_equal(packed.record(2), stream[2 * SEQ_LEN : 3 * SEQ_LEN + 1])


def test_webdataset_index_is_cached_and_rebuilt_when_a_shard_changes(tmp_path, monkeypatch):
    folder = write_wds(tmp_path / "wds", documents(10), per_shard=10)
    WebDatasetSource(folder)
    scanned = []
    real_scan = ShardIndex.scan
    monkeypatch.setattr(ShardIndex, "scan", classmethod(lambda cls, shard: scanned.append(shard) or real_scan(shard)))
    assert sorted(p.name for p in folder.iterdir()) == ["part-0000.tar"]  # the index lives in the cache folder
    assert len(WebDatasetSource(folder)) == 10 and scanned == []  # from the cache
    shutil.rmtree(folder)
    write_wds(folder, documents(4, seed=1), per_shard=10)  # same name, other content
    source = WebDatasetSource(folder)
    assert len(source) == 4 and len(scanned) == 1
    np.testing.assert_array_equal(source.record(3)["npy"], documents(4, seed=1)[3])


def test_webdataset_brace_pattern_and_missing_shard(tmp_path):
    write_wds(tmp_path / "wds", documents(30))  # 5 shards
    assert len(WebDatasetSource(tmp_path / "wds" / "part-{0000..0002}.tar")) == 21
    with pytest.raises(SourceError, match=r"shard not found: .*part-0005\.tar \(and 3 more\)"):
        WebDatasetSource(tmp_path / "wds" / "part-{0000..0008}.tar")


def truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


def test_truncated_tar_is_an_error_or_a_reported_skip(tmp_path):
    folder = write_wds(tmp_path / "wds", documents(14), per_shard=7)
    shard = folder / "part-0001.tar"
    with tarfile.open(shard) as tar:
        members = tar.getmembers()
    # Cut inside the data of sample 4's second member: samples 0-3 are whole, 4 is partial.
    cut_member = members[4 * 3 + 1]
    truncate(shard, cut_member.offset_data + 3)
    with pytest.raises(SourceError, match=r"part-0001\.tar: truncated tar, cut in member 'doc00011\.."):
        WebDatasetSource(folder)
    with pytest.warns(UserWarning, match=r"1 truncated shard\(s\)"):
        source = WebDatasetSource(folder, on_bad="skip")
    assert source.shard_sizes.tolist() == [7, 4]  # the partial sample 4 is dropped, 0-3 kept
    assert list(source.skipped) == [str(shard)]
    np.testing.assert_array_equal(source.record(10)["npy"], documents(14)[10])
    # A cut exactly between members is caught too.
    truncate(shard, members[3 * 3].offset_data - 512)
    with pytest.raises(SourceError, match=r"truncated tar, cut after byte \d+"):
        WebDatasetSource(folder)


def test_webdataset_sample_without_the_field_names_shard_and_key(tmp_path):
    folder = tmp_path / "wds"
    folder.mkdir()
    with webdataset.TarWriter(str(folder / "a.tar")) as sink:
        sink.write({"__key__": "good", "txt": "hello"})
        sink.write({"__key__": "odd", "json": {"text": "x"}})
    source = WebDatasetSource(folder)
    assert source.field == "txt"
    with pytest.raises(SourceError, match=r"a\.tar, sample 'odd' \(#1\) has no 'txt' member \(it has \['json'\]\)"):
        per_document(source, tmp_path)


def test_webdataset_samples_are_the_ones_webdatasets_own_reader_yields(tmp_path):
    """Grouping by key, extensions and ``__`` members as webdataset does: every sample, read at random, equals the
    one its own front-to-back iteration yields at that position."""
    folder = tmp_path / "wds"
    folder.mkdir()
    with webdataset.TarWriter(str(folder / "a.tar")) as sink:
        for i in range(12):
            sink.write({"__key__": f"dir/doc{i:02d}", "txt": f"text {i}", "json": {"i": i}, "tar.gz": b"x" * i})
    ours = WebDatasetSource(folder)
    theirs = list(webdataset.WebDataset(str(folder / "a.tar"), shardshuffle=False))
    assert len(ours) == len(theirs) == 12
    for i in (11, 0, 5):
        record, sample = ours.record(i), theirs[i]
        members = sorted(k for k in record if k not in ("__key__", "document"))  # "document": the field's, decoded
        assert record["__key__"] == sample["__key__"] and members == sorted(k for k in sample if not k.startswith("__"))
        assert record["txt"] == sample["txt"].decode() and record["json"] == json.loads(sample["json"])
        assert record["tar.gz"] == sample["tar.gz"]


def test_not_a_tar_file(tmp_path):
    (tmp_path / "bad.tar").write_bytes(b"definitely not a tar archive" * 40)
    with pytest.raises(SourceError, match=r"bad\.tar: not a tar file"):
        WebDatasetSource(tmp_path / "bad.tar")


# ----------------------------------------------------------------------------- MDS


@pytest.mark.parametrize("compression", [None, "zstd"])
def test_mds_shards_read_back_exactly(tmp_path, compression):
    docs = documents(30)
    folder = write_mds(tmp_path / "mds", docs, compression=compression)
    source = MdsSource(folder, cache_dir=tmp_path / "cache")
    assert source.column == "tokens" and len(source) == 30 and len(source.shard_sizes) > 3
    for i in (0, 13, 29):
        record = source.record(i)
        assert record["text"] == f"text of {i}" and record["id"] == i
        np.testing.assert_array_equal(record["tokens"], docs[i])
    batch = per_document(source, tmp_path).read_batch(np.array([29, 2]))
    np.testing.assert_array_equal(batch["input_ids"], [window(docs[29]), window(docs[2])])
    text = per_document(MdsSource(folder, column="text", cache_dir=tmp_path / "cache"), tmp_path)
    assert text.text(7) == "text of 7"
    if compression:  # decompressed into the cache folder: the dataset is left as it was written
        assert not list(folder.glob("*.mds")) and list((tmp_path / "cache").glob("mds-shards-*/*.mds"))


def test_mds_remote_downloads_into_the_local_cache_on_first_read(tmp_path):
    docs = documents(30)
    remote = write_mds(tmp_path / "remote", docs, compression="zstd")
    cache = tmp_path / "cache"
    source = MdsSource(cache, remote=str(remote))
    assert len(source) == 30
    assert sorted(p.name for p in cache.iterdir()) == ["index.json"]  # no shard fetched yet
    np.testing.assert_array_equal(source.record(29)["tokens"], docs[29])
    assert len(list(cache.glob("*.mds"))) == 1  # just the shard that was read


def test_mds_bad_data(tmp_path):
    docs = documents(30)
    folder = write_mds(tmp_path / "mds", docs)
    with pytest.raises(SourceError, match="no column 'label'"):
        MdsSource(folder, column="label")
    with pytest.raises(SourceError, match="column 'id' is int"):
        MdsSource(folder, column="id")
    sizes = MdsSource(folder).shard_sizes
    shards = sorted(folder.glob("*.mds"))
    shard_1 = shards[1].read_bytes()
    shards[1].unlink()
    with pytest.raises(SourceError, match=r"shard shard\.00001\.mds is missing"):
        MdsSource(folder)
    shards[1].write_bytes(shard_1)
    data = bytearray(shards[2].read_bytes())
    data[0] += 1  # the sample count in the shard's header
    shards[2].write_bytes(bytes(data))
    with pytest.raises(SourceError, match=r"shard\.00002\.mds is corrupt or replaced: it holds \d+ samples, index"):
        MdsSource(folder)
    truncate(shards[3], 40)
    with pytest.warns(UserWarning, match="left out 2 bad shard"):
        source = MdsSource(folder, on_bad="skip")
    assert sorted(source.skipped) == ["shard.00002.mds", "shard.00003.mds"]
    assert re.fullmatch(
        r"corrupt: its sample offsets end at byte \d+, the file has 40", source.skipped["shard.00003.mds"]
    )
    assert source.shard_sizes.tolist() == np.delete(sizes, [2, 3]).tolist()
    np.testing.assert_array_equal(source.record(len(source) - 1)["tokens"], docs[-1])
    with pytest.raises(SourceError, match=r"no index\.json"):
        MdsSource(tmp_path)


# ----------------------------------------------------------------------------- mixtures


def shard_mixture(root: Path, order: str = "samples") -> Path:
    docs = documents(60)
    write_wds(root / "wds", docs[:35])
    write_mds(root / "mds", docs[35:])
    write_tokens(root / "code.bin", np.arange(5_000) % 256)
    # Shard order reads records front to back: it needs records, made into samples by a transform.
    records = {"order": "shards", "transform": "test_shards:ids_window"} if order == "shards" else {}
    config = {
        "seed": 7,
        "global_batch_size": 8,
        "seq_len": SEQ_LEN,
        "cache_dir": "cache",
        "domains": [
            {"name": "code", "source": "tokenbin", "path": "code.bin", "weight": 0.4},
            {"name": "web", "source": "webdataset", "path": "wds", "weight": 0.3, **records},
            {"name": "books", "source": "mds", "path": "mds", "weight": 0.3, **records},
        ],
    }
    path = root / "mixture.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def batches(config: Path, n: int, workers: int = 0, state: dict | None = None) -> list[dict]:
    loader = MixedLoader(MixedDataset.from_config(config, num_batches=n), num_workers=workers)
    if state is not None:
        loader.load_state_dict(state)
    return [{name: values.numpy().copy() for name, values in batch.items()} for batch in loader]


@pytest.mark.parametrize("order", ["samples", "shards"])
def test_shard_domains_mix_with_token_bins_exactly(tmp_path, order):
    config = shard_mixture(tmp_path, order)
    dataset = MixedDataset.from_config(config)
    reference = batches(config, 12)
    assert {d for batch in reference for d in batch["domain"].tolist()} == {0, 1, 2}
    for batch in reference:  # every slot holds exactly the sample its (domain, index) names
        for slot, (domain, index) in enumerate(zip(batch["domain"], batch["index"])):
            expected = dataset.sources[domain].read_batch(np.array([index]))["input_ids"][0]
            np.testing.assert_array_equal(batch["input_ids"][slot], expected)
    for other in (batches(config, 12, workers=2), batches(config, 12, workers=3)):
        for mine, theirs in zip(reference, other, strict=True):
            for name in mine:
                np.testing.assert_array_equal(mine[name], theirs[name])
    # Stop after 5 batches, resume in a fresh loader with another worker count.
    loader = MixedLoader(MixedDataset.from_config(config, num_batches=12), num_workers=2)
    for _ in zip(range(5), loader):
        pass
    resumed = batches(config, 12, workers=1, state=loader.state_dict())
    for mine, theirs in zip(reference[5:], resumed, strict=True):
        np.testing.assert_array_equal(mine["input_ids"], theirs["input_ids"])


def test_shard_order_reads_each_shard_front_to_back(tmp_path):
    config = shard_mixture(tmp_path, order="shards")
    dataset = MixedDataset.from_config(config)
    web, spec = dataset.sources[1], dataset.spec
    epochs = [shard_order(spec, 1, epoch)[0] for epoch in range(6)]
    for order in epochs:
        assert sorted(order.tolist()) == list(range(len(web.shard_sizes)))  # a permutation of the shards
    assert not all(np.array_equal(epochs[0], other) for other in epochs[1:])  # reshuffled per epoch
    # The domain's stream: epoch by epoch, its shards in that epoch's order, each one front to back.
    expected = [
        i
        for order in epochs
        for shard in order
        for i in range(web.shard_starts[shard], web.shard_starts[shard] + web.shard_sizes[shard])
    ]
    position = 0
    for batch in batches(config, 60):
        taken = batch["index"][batch["domain"] == 1]  # a batch's slots are shuffled: compare as a set
        assert sorted(taken.tolist()) == sorted(expected[position : position + len(taken)])
        position += len(taken)
    assert position > 2 * len(web)


def test_order_shards_needs_a_sharded_source(tmp_path):
    config = shard_mixture(tmp_path)
    raw = yaml.safe_load(config.read_text())
    raw["domains"][0]["order"] = "shards"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="domain 'code': order: shards needs a sharded source, not tokenbin"):
        MixedDataset.from_config(config)
    raw["domains"][0]["order"] = "samples"
    raw["domains"][1]["order"] = "shards"  # a tokenized domain reads its local token cache: no shard order
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"domain 'web': order: shards .* applies only with a transform"):
        MixedDataset.from_config(config)
    raw["domains"][0]["order"] = "random"
    config.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match="order must be one of"):
        MixtureConfig.load(config)


def test_mds_remote_in_a_config(tmp_path):
    remote = write_mds(tmp_path / "remote", documents(20))
    write_tokens(tmp_path / "code.bin", np.arange(2_000) % 256)
    config = tmp_path / "mixture.yaml"
    config.write_text(
        json.dumps(
            {
                "global_batch_size": 4,
                "seq_len": SEQ_LEN,
                "domains": [
                    {"name": "code", "source": "tokenbin", "path": "code.bin"},
                    {"name": "books", "source": "mds", "path": "cache", "remote": str(remote)},
                ],
            }
        )
    )
    assert len(batches(config, 3)) == 3 and (tmp_path / "cache" / "index.json").exists()


@pytest.mark.parametrize(
    "array",
    [
        np.arange(5, dtype=np.uint16),
        np.zeros((2, 3), dtype=">i4"),
        np.array(3.5),
        np.arange(8, dtype=np.int64)[::2],
        np.asfortranarray(np.ones((2, 3))),  # not matched by the fast path: np.load reads it
        np.array(["a", "bc"]),
    ],
)
def test_npy_members_decode_like_np_load(array):
    buffer = io.BytesIO()
    np.save(buffer, array)
    decoded = decode_npy(buffer.getvalue())
    assert decoded.dtype == array.dtype and decoded.shape == array.shape
    np.testing.assert_array_equal(decoded, array)


def test_shard_sources_travel_to_workers_without_their_open_files(tmp_path):
    docs = documents(30)
    for source in (
        MdsSource(write_mds(tmp_path / "mds", docs), transform=ids_window),
        WebDatasetSource(write_wds(tmp_path / "wds", docs), transform=ids_window),
    ):
        before = source.read_batch(np.arange(30))["input_ids"]  # opens files and memory maps
        state = pickle.dumps(source)
        assert len(state) < 20_000  # indexes and names, no mapped data
        np.testing.assert_array_equal(pickle.loads(state).read_batch(np.arange(30))["input_ids"], before)


def test_inspect_reports_the_shards_left_out(tmp_path, capsys):
    from onlinemix.cli import main

    write_mds(tmp_path / "mds", documents(30))
    (tmp_path / "mds" / "shard.00001.mds").unlink()
    config = tmp_path / "mixture.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "global_batch_size": 4,
                "seq_len": SEQ_LEN,
                "domains": [{"name": "books", "source": "mds", "path": "mds", "on_bad": "skip"}],
            }
        )
    )
    with pytest.warns(UserWarning, match="left out 1 bad shard"):
        assert main(["inspect", str(config), "--steps", "3"]) == 0
    assert "domain 'books' leaves out shard.00001.mds: missing" in capsys.readouterr().out
