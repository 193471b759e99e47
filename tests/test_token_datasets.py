"""Pretraining corpora read as their tools wrote them: Megatron indexed datasets (written here by megatron-core's own
``IndexedDatasetBuilder``), LitData optimized datasets (``litdata.optimize``, local and in a bucket on a loopback S3
server) and OLMo-core's raw numpy token files."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_jsonl
from s3server import S3Server, set_environment

from onlinemix import ConfigError, MixedDataset, MixedLoader
from onlinemix.loaders.sources import SourceError
from onlinemix.loaders.sources.megatron import MegatronSource

SEQ_LEN = 15
EOD = 256  # the end-of-text id Megatron's --append-eod puts after each document (the byte tokenizer's)


def write_config(root: Path, domains: list[dict], **top) -> Path:
    config = {"seed": 5, "global_batch_size": 4, "seq_len": SEQ_LEN, "domains": domains, **top}
    path = root / "mixture.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


# -- Megatron indexed datasets ------------------------------------------------------------------------


def megatron_pair(prefix: Path, seed: int, documents: int = 30, dtype=np.uint16, top: int = 256) -> None:
    """A ``.bin``/``.idx`` pair as Megatron's preprocessing writes it: documents of one or more sequences (as with
    ``--split-sentences``), each document ending in the end-of-text id."""
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    rng = np.random.default_rng(seed)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=dtype)
    for _ in range(documents):
        lengths = rng.integers(1, 25, rng.integers(1, 4)).tolist()  # the sentences of a document
        tokens = rng.integers(0, top, sum(lengths))
        tokens[-1] = EOD
        builder.add_document(torch.from_numpy(tokens.astype(np.int64)), lengths)
    builder.finalize(f"{prefix}.idx")


def megatron_documents(prefix: Path) -> list[np.ndarray]:
    """megatron-core's own reading of a pair: each document's sequences, in order."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(str(prefix))
    bounds = dataset.document_indices
    documents = [np.concatenate([dataset[j] for j in range(bounds[i], bounds[i + 1])]) for i in range(len(bounds) - 1)]
    del dataset
    return documents


def packed(documents: list[np.ndarray], stride: int = SEQ_LEN) -> np.ndarray:
    """The windows of ``seq_len + 1`` tokens every ``stride`` of the documents concatenated, by hand."""
    flat = np.concatenate(documents).astype(np.int64)
    count = (len(flat) - SEQ_LEN - 1) // stride + 1
    return np.stack([flat[i * stride : i * stride + SEQ_LEN + 1] for i in range(count)])


@pytest.fixture(scope="module")
def megatron(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("megatron")
    (root / "parts").mkdir()
    for part in range(3):
        megatron_pair(root / "parts" / f"web_{part}_text_document", seed=part)
    megatron_pair(root / "wide_text_document", seed=9, dtype=np.int32, top=100_000)
    return root


def test_a_megatron_domains_windows_are_megatron_cores_documents_concatenated_in_order(megatron):
    prefix = megatron / "parts/web_0_text_document"
    source = MegatronSource(prefix, seq_len=SEQ_LEN)
    documents = megatron_documents(prefix)
    expected = packed(documents)
    assert source.documents == len(documents) == 30 and source.dtype == np.uint16
    assert np.array_equal(source.windows(np.arange(len(source))), expected)
    # the compiled gather of the loader's batches reads the same
    out = {key: np.zeros((len(source), SEQ_LEN), np.int64) for key in ("input_ids", "labels")}
    source.read_into(np.arange(len(source))[::-1].copy(), out, slice(None))
    assert np.array_equal(out["input_ids"], expected[::-1, :-1]) and np.array_equal(out["labels"], expected[::-1, 1:])
    assert "30 documents" in source.summary()


def test_several_pairs_are_one_domain_their_documents_one_after_the_other(megatron):
    prefixes = [megatron / f"parts/web_{part}_text_document" for part in range(3)]
    expected = packed([doc for prefix in prefixes for doc in megatron_documents(prefix)], stride=7)
    listed = MegatronSource([str(p) for p in prefixes], seq_len=SEQ_LEN, stride=7)
    folder = MegatronSource(megatron / "parts", seq_len=SEQ_LEN, stride=7)  # a folder: its .idx files, sorted
    for source in (listed, folder):
        assert source.documents == 90
        assert np.array_equal(source.windows(np.arange(len(source))), expected)  # windows across files included
    reversed_ = MegatronSource([str(p) for p in prefixes[::-1]], seq_len=SEQ_LEN)
    assert not np.array_equal(reversed_.windows(np.arange(5)), listed.windows(np.arange(5)))  # the order given


def test_the_dtype_comes_from_the_index(megatron):
    prefix = megatron / "wide_text_document"
    source = MegatronSource(prefix, seq_len=SEQ_LEN)
    assert source.dtype == np.int32 and source.max_token() >= 65_536
    assert np.array_equal(source.windows(np.arange(len(source))), packed(megatron_documents(prefix)))


def test_a_mixture_of_megatron_litdata_and_jsonl_domains_iterates(megatron, tmp_path):
    litdata_tokens(tmp_path / "lit")
    write_jsonl(tmp_path / "prose.jsonl", [f"prose document {i} " * (i % 4 + 1) for i in range(60)])
    config = write_config(
        tmp_path,
        [
            {"name": "web", "source": "megatron", "path": str(megatron / "parts/web_0_text_document")},
            {"name": "lit", "source": "litdata", "path": "lit"},
            {"name": "prose", "source": "jsonl", "path": "prose.jsonl"},
        ],
        cache_dir=str(tmp_path / "cache"),
    )
    dataset = MixedDataset.from_config(config, num_batches=12)
    assert [type(s).__name__ for s in dataset.sources] == ["MegatronSource", "LitDataTokens", "TokenizedSource"]
    web = packed(megatron_documents(megatron / "parts/web_0_text_document"))
    drawn = set()
    for batch in MixedLoader(dataset, num_workers=2):
        for domain, index, ids in zip(batch["domain"].tolist(), batch["index"].tolist(), batch["input_ids"]):
            expected = dataset.sources[domain].read_batch(np.array([index]))["input_ids"][0]
            assert np.array_equal(ids.numpy(), expected)
            if domain == 0:
                assert np.array_equal(ids.numpy(), web[index, :-1])
            drawn.add(domain)
    assert drawn == {0, 1, 2}


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (lambda idx: idx.write_bytes(idx.read_bytes()[:-5]), "truncated or corrupt"),
        (lambda idx: idx.write_bytes(b"NOTANIDX" + idx.read_bytes()[8:]), "not a Megatron index"),
        (lambda idx: idx.write_bytes(idx.read_bytes()[:20]), "not a Megatron index"),
    ],
    ids=["truncated", "header", "cut-in-the-header"],
)
def test_a_damaged_index_is_one_line_naming_the_file(megatron, tmp_path, damage, problem):
    for suffix in (".bin", ".idx"):
        (tmp_path / f"web{suffix}").write_bytes((megatron / f"parts/web_0_text_document{suffix}").read_bytes())
    damage(tmp_path / "web.idx")
    config = write_config(tmp_path, [{"name": "web", "source": "megatron", "path": "web"}], vocab_size=258)
    with pytest.raises(ConfigError) as error:
        MixedDataset.from_config(config)
    message = str(error.value)
    assert "\n" not in message and str(tmp_path / "web.idx") in message and problem in message


def test_a_bin_shorter_than_its_index_and_a_missing_prefix_are_named(megatron, tmp_path):
    for suffix in (".bin", ".idx"):
        (tmp_path / f"web{suffix}").write_bytes((megatron / f"parts/web_0_text_document{suffix}").read_bytes())
    (tmp_path / "web.bin").write_bytes((tmp_path / "web.bin").read_bytes()[:-4])
    with pytest.raises(SourceError, match=r"web\.bin: .* tokens, its index says"):
        MegatronSource(tmp_path / "web", seq_len=SEQ_LEN)
    config = write_config(tmp_path, [{"name": "web", "source": "megatron", "path": "nothing_here"}])
    with pytest.raises(ConfigError, match=r"no Megatron index .*nothing_here\.idx \(a path is a prefix"):
        MixedDataset.from_config(config)


def test_megatron_windows_take_no_document_samples(megatron, tmp_path):
    path = str(megatron / "parts/web_0_text_document")
    config = write_config(tmp_path, [{"name": "web", "source": "megatron", "path": path, "samples": "documents"}])
    with pytest.raises(ConfigError, match="samples: documents needs a document source; a megatron source has windows"):
        MixedDataset.from_config(config)


def test_verify_finds_a_changed_byte_of_a_megatron_bin_that_an_open_does_not(tmp_path):
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(str(tmp_path / "web.bin"), dtype=np.uint16)
    builder.add_document(torch.arange(300_000) % 256, [300_000])  # large: its content digest is sampled
    builder.finalize(str(tmp_path / "web.idx"))
    config = write_config(tmp_path, [{"name": "web", "source": "megatron", "path": "web"}], vocab_size=258)
    MixedDataset.from_config(config)  # the first open scans the .bin and records its checksums
    binary = tmp_path / "web.bin"
    stat = binary.stat()
    tokens = np.fromfile(binary, dtype=np.uint16)
    tokens[200_000] = 7  # between the digest's sampled blocks, the mtime put back: the same stamp
    tokens.tofile(binary)
    os.utime(binary, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    MixedDataset.from_config(config)  # an open does not read the whole file (verify: lengths)
    with pytest.raises(SourceError, match=r"web\.bin: 16 MiB chunk 0 fails the checksum recorded"):
        MegatronSource(tmp_path / "web", seq_len=SEQ_LEN).verify("full", None)


# -- LitData optimized datasets ----------------------------------------------------------------------------


def token_stream(i: int):
    """``litdata.optimize``'s function for token chunks: each input yields its token ids."""
    yield torch.arange(i * 10, i * 10 + 37, dtype=torch.int32) % 250


def document(i: int) -> dict:
    return {"text": f"document {i} " * (i % 5 + 1)}


def litdata_tokens(out: Path) -> Path:
    litdata = pytest.importorskip("litdata")
    litdata.optimize(fn=token_stream, inputs=list(range(6)), output_dir=str(out), chunk_bytes="300B",
                     item_loader=litdata.TokensLoader(), num_workers=1)  # fmt: skip
    return out


def litdata_documents(out: Path) -> Path:
    litdata = pytest.importorskip("litdata")
    litdata.optimize(fn=document, inputs=list(range(40)), output_dir=str(out), chunk_bytes="400B", num_workers=1)
    return out


def test_litdata_token_chunks_are_litdatas_own_blocks(tmp_path):
    import litdata

    folder = litdata_tokens(tmp_path / "lit")
    config = write_config(tmp_path, [{"name": "lit", "source": "litdata", "path": "lit"}], vocab_size=258)
    dataset = MixedDataset.from_config(config, num_batches=4)
    (source,) = dataset.sources
    blocks = litdata.StreamingDataset(str(folder), item_loader=litdata.TokensLoader(block_size=SEQ_LEN + 1))
    assert len(source) == len(blocks) > 0
    expected = np.stack([np.asarray(blocks[i], dtype=np.int64) for i in range(len(blocks))])
    assert np.array_equal(source.read_batch(np.arange(len(source)))["input_ids"], expected[:, :-1])
    chunks = json.loads((folder / "index.json").read_text())["chunks"]
    dropped = sum(chunk["dim"] % (SEQ_LEN + 1) for chunk in chunks)
    assert f"{dropped:,} tokens after chunks' last whole blocks are not read" in source.summary()
    for batch in MixedLoader(dataset, num_workers=0):
        assert np.array_equal(batch["input_ids"].numpy(), expected[batch["index"].numpy(), :-1])


def test_litdata_documents_are_tokenized_and_packed_like_the_same_jsonl(tmp_path):
    litdata_documents(tmp_path / "lit")
    write_jsonl(tmp_path / "same.jsonl", [document(i)["text"] for i in range(40)])
    domains = [
        {"name": "lit", "source": "litdata", "path": "lit"},
        {"name": "same", "source": "jsonl", "path": "same.jsonl"},
    ]
    dataset = MixedDataset.from_config(write_config(tmp_path, domains, cache_dir=str(tmp_path / "cache")))
    lit, same = dataset.sources
    assert len(lit) == len(same) > 0
    everything = np.arange(len(lit))
    assert np.array_equal(lit.read_batch(everything)["input_ids"], same.read_batch(everything)["input_ids"])


def test_litdata_damaged_or_missing_index_is_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    config = write_config(tmp_path, [{"name": "lit", "source": "litdata", "path": "empty"}])
    with pytest.raises(ConfigError, match=r"empty: no index\.json: not a dataset litdata\.optimize wrote"):
        MixedDataset.from_config(config)
    folder = litdata_tokens(tmp_path / "lit")
    (folder / "index.json").write_text('{"chunks": [')
    config = write_config(tmp_path, [{"name": "lit", "source": "litdata", "path": "lit"}])
    with pytest.raises(ConfigError, match=r"index\.json: damaged") as error:
        MixedDataset.from_config(config)
    assert "\n" not in str(error.value)


def test_a_litdata_dataset_in_a_bucket_reads_as_the_local_one(tmp_path, monkeypatch):
    pytest.importorskip("s3fs")
    from litdata.streaming import downloader

    local = litdata_tokens(tmp_path / "lit")
    server = S3Server().start()
    try:
        for name, value in server.environment.items():
            monkeypatch.setenv(name, value)
        set_environment(server)
        server.upload(local, "corpus")
        domains = [{"name": "lit", "source": "litdata", "path": "s3://corpus"}]
        here = MixedDataset.from_config(write_config(tmp_path / "lit", [{**domains[0], "path": str(local)}],
                                                     vocab_size=258), num_batches=4)  # fmt: skip
        # with boto3 (litdata's client in its forked workers, and where obstore is missing) it reads the bucket
        with monkeypatch.context() as patched:
            patched.setattr(downloader, "_OBSTORE_AVAILABLE", False)
            config = write_config(tmp_path, domains, vocab_size=258, cache_dir=str(tmp_path / "cache-boto3"))
            remote = MixedDataset.from_config(config, num_batches=4)
            assert len(remote.sources[0]) == len(here.sources[0])
            for ours, theirs in zip(MixedLoader(remote, num_workers=0), MixedLoader(here, num_workers=0)):
                assert torch.equal(ours["input_ids"], theirs["input_ids"]) and torch.equal(ours["index"],
                                                                                           theirs["index"])  # fmt: skip
        # with obstore (its default client), which refuses the test server's plain http: one line naming it
        config = write_config(tmp_path, domains, vocab_size=258, cache_dir=str(tmp_path / "cache-obstore"))
        refused = r"s3://corpus: litdata could not read block 0 \(RuntimeError: .*Original error: GenericError"
        with pytest.raises(SourceError, match=refused) as error:
            MixedDataset.from_config(config)
        assert "\n" not in str(error.value)
    finally:
        server.kill()


# -- OLMo-core's numpy token files ---------------------------------------------------------------------------


def test_olmo_cores_numpy_token_files_read_as_token_bin_with_their_dtype(tmp_path):
    """OLMo-core (and Dolma's tokenizer) writes each file as a raw ``np.memmap`` of ``uint32`` ids (``uint16`` for
    vocabularies under 65,536), documents separated by the tokenizer's end-of-text id, no header: a token-bin
    file with ``dtype: uint32``."""
    eos, rng = 100_257, np.random.default_rng(3)  # dolma2's (cl100k) end-of-text id
    documents = [np.append(rng.integers(0, 100_000, rng.integers(5, 60)), eos) for _ in range(40)]
    flat = np.concatenate(documents)
    memmap = np.memmap(tmp_path / "part-0-00000.npy", dtype=np.uint32, mode="w+", shape=(len(flat),))
    memmap[:] = flat
    memmap.flush()
    del memmap
    domain = {"name": "olmo", "source": "tokenbin", "path": "part-0-00000.npy", "dtype": "uint32"}
    dataset = MixedDataset.from_config(write_config(tmp_path, [domain], vocab_size=100_278))
    (source,) = dataset.sources
    assert np.array_equal(source.read_batch(np.arange(len(source)))["input_ids"], packed(documents)[:, :-1])

    np.save(tmp_path / "saved.npy", flat.astype(np.uint32))  # numpy's own format: a header before the ids
    domain = {**domain, "path": "saved.npy"}
    with pytest.raises(ConfigError, match=r"saved\.npy: a \.npy file with a header \(numpy\.save\)"):
        MixedDataset.from_config(write_config(tmp_path, [domain], vocab_size=100_278))
