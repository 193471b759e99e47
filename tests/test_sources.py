"""Sources: token-bin windows, and every document format tokenized, packed and cached (bit for bit token-bin)."""

import gzip
import json
import os
import pickle

import numpy as np
import pytest
from conftest import write_jsonl, write_tokens

from onlinemix.loaders.paths import InputError
from onlinemix.loaders.sources import (
    HFDatasetSource,
    JsonlSource,
    ParquetSource,
    SourceError,
    TextSource,
    TokenBinSource,
    TokenizedSource,
)
from onlinemix.loaders.tokenizers import ByteTokenizer, HFTokenizer
from onlinemix.loaders.transforms import IGNORE_INDEX

TEXTS = [f"document {i}: " + "lorem ipsum dolor " * (i % 5) + "ünïcode ✓" * (i % 2) for i in range(40)]


def test_tokenbin_windows_overlap_by_the_target_token(tmp_path):
    path = write_tokens(tmp_path / "t.bin", np.arange(1000))
    source = TokenBinSource(path, seq_len=8)
    assert len(source) == (1000 - 9) // 8 + 1
    assert source.record(3).tolist() == list(range(24, 33))
    batch = source.read_batch(np.array([0, 5]))
    assert batch["input_ids"].tolist() == [list(range(0, 8)), list(range(40, 48))]
    assert batch["labels"].tolist() == [list(range(1, 9)), list(range(41, 49))]
    assert batch["input_ids"].dtype == np.int64


def test_tokenbin_stride_and_uint32(tmp_path):
    path = write_tokens(tmp_path / "t.bin", np.arange(100_000, 100_050), dtype="uint32")
    source = TokenBinSource(path, seq_len=4, dtype="uint32", stride=3)
    assert len(source) == (50 - 5) // 3 + 1
    assert source.record(2).tolist() == list(range(100_006, 100_011))


@pytest.mark.parametrize("dtype", ["uint16", "uint32", "int32", "int64"])
def test_tokenbin_read_into_fills_scattered_rows_with_each_window_and_its_shift(tmp_path, dtype):
    tokens = np.arange(7, 7 + 400) * (3 if dtype != "uint16" else 1)
    source = TokenBinSource(write_tokens(tmp_path / "t.bin", tokens, dtype=dtype), seq_len=6, dtype=dtype, stride=5)
    out = {"input_ids": np.full((5, 6), -1, np.int64), "labels": np.full((5, 6), -1, np.int64)}
    source.read_into(np.array([3, 0, len(source) - 1]), out, np.array([4, 1, 2]))
    for row, index in [(4, 3), (1, 0), (2, len(source) - 1)]:
        start = 5 * index
        assert out["input_ids"][row].tolist() == tokens[start : start + 6].tolist()
        assert out["labels"][row].tolist() == tokens[start + 1 : start + 7].tolist()
    assert (out["input_ids"][[0, 3]] == -1).all() and (out["labels"][[0, 3]] == -1).all()  # untouched rows
    source.read_into(np.array([1, 2]), out, slice(3, 5))
    assert out["input_ids"][3:, 0].tolist() == [tokens[5], tokens[10]]
    with pytest.raises(ValueError, match="2 windows for 1 rows"):
        source.read_into(np.array([1, 2]), out, slice(0, 1))


def test_tokenbin_bad_inputs(tmp_path):
    path = tmp_path / "odd.bin"
    path.write_bytes(b"\x00" * 7)
    with pytest.raises(SourceError, match="not a whole number of uint16 tokens"):
        TokenBinSource(path, seq_len=2)
    with pytest.raises(ValueError, match="dtype must be one of"):
        TokenBinSource(write_tokens(tmp_path / "t.bin", np.arange(10)), seq_len=2, dtype="float32")
    source = TokenBinSource(tmp_path / "t.bin", seq_len=2)
    with pytest.raises(SourceError, match="out of range"):
        source.read_batch(np.array([len(source)]))
    with pytest.raises(SourceError, match="is a folder: a tokenbin domain is one file"):
        TokenBinSource(tmp_path, seq_len=2)


def test_a_token_bin_truncated_under_a_reader_is_an_error_naming_it(tmp_path):
    path = write_tokens(tmp_path / "t.bin", np.arange(5000))
    source = TokenBinSource(path, seq_len=8)
    source.read_batch(np.array([0]))
    os.truncate(path, 2000)  # an in-place rewrite, seen by the open memory map
    out = {"input_ids": np.zeros((1, 8), np.int64), "labels": np.zeros((1, 8), np.int64)}
    with pytest.raises(SourceError, match=r"t\.bin shrank from 10,000 to 2,000 bytes while it was being read"):
        source.read_into(np.array([500]), out, slice(0, 1))


def test_sources_pickle_without_open_handles_and_read_the_same(tmp_path):
    source = TokenBinSource(write_tokens(tmp_path / "t.bin", np.arange(500)), seq_len=16)
    before = source.read_batch(np.array([1, 2]))
    assert "_open_tokens" in source.__dict__
    clone = pickle.loads(pickle.dumps(source))
    assert "_open_tokens" not in clone.__dict__
    assert np.array_equal(clone.read_batch(np.array([1, 2]))["labels"], before["labels"])

    records = JsonlSource(write_jsonl(tmp_path / "d.jsonl", ["a", "b"]), cache_dir=tmp_path / "cache")
    records.record(0)
    clone = pickle.loads(pickle.dumps(records))
    assert clone.record(1) == {"text": "b"}


def test_byte_tokenizer_hand_example():
    tokenizer = ByteTokenizer()
    assert tokenizer.encode("hi").tolist() == [104, 105, 256]
    assert tokenizer.decode(tokenizer.encode("héllo")) == "héllo"
    assert (tokenizer.vocab_size, tokenizer.eot_id, tokenizer.pad_id) == (258, 256, 257)


# ----------------------------------------------------------------------------- packing


@pytest.fixture(scope="module")
def bpe(tmp_path_factory):
    """A small BPE tokenizer trained in memory (no download), saved as tokenizer.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(TEXTS * 3, trainer)
    path = tmp_path_factory.mktemp("tokenizer") / "tokenizer.json"
    tokenizer.save(str(path))
    return HFTokenizer(path)


def token_bin_of(tmp_path, texts, tokenizer, seq_len, dtype="uint16"):
    """What ``onlinemix convert --to tokenbin`` writes for ``texts``: the reference packing."""
    ids = np.concatenate(tokenizer.encode_batch(texts))
    return TokenBinSource(write_tokens(tmp_path / "reference.bin", ids, dtype), seq_len, dtype=dtype)


def assert_same_windows(packed, reference):
    assert len(packed) == len(reference) > 0
    every = np.arange(len(reference))
    for field in ("input_ids", "labels"):
        assert np.array_equal(packed.read_batch(every)[field], reference.read_batch(every)[field])


@pytest.mark.parametrize("tokenizer_name", ["byte", "bpe"])
def test_packed_jsonl_equals_the_token_bin_of_the_same_text(tmp_path, bpe, tokenizer_name):
    tokenizer = ByteTokenizer() if tokenizer_name == "byte" else bpe
    source = JsonlSource(write_jsonl(tmp_path / "d.jsonl", TEXTS))
    packed = TokenizedSource(source, tokenizer, seq_len=16, cache_dir=tmp_path / "cache")
    assert_same_windows(packed, token_bin_of(tmp_path, TEXTS, tokenizer, 16))
    assert packed.cache.meta["documents"] == len(TEXTS)
    assert packed.text(0).startswith("document 0: ")
    if tokenizer_name == "bpe":
        assert bpe.eot == "<|endoftext|>" and len(packed) < len(token_bin_of(tmp_path, TEXTS, ByteTokenizer(), 16))


def test_every_input_form_packs_the_same_documents(tmp_path):
    """Plain, .gz and .zst JSONL, a folder, a glob, a list; text files; Parquet; a saved HF dataset."""
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    half = len(TEXTS) // 2
    plain = write_jsonl(tmp_path / "in/a.jsonl", TEXTS[:half])
    with gzip.open(tmp_path / "in/b.jsonl.gz", "wt") as file:
        file.writelines(json.dumps({"text": text}) + "\n" for text in TEXTS[half:])
    zst = "".join(json.dumps({"text": text}) + "\n" for text in TEXTS[half:]).encode()
    (tmp_path / "z.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(zst))
    (tmp_path / "txt").mkdir()
    for i, text in enumerate(TEXTS):
        (tmp_path / "txt" / f"{i:03d}.txt").write_text(text)
    (tmp_path / "pq").mkdir()
    pq.write_table(pa.table({"text": TEXTS[:half]}), tmp_path / "pq/0.parquet", row_group_size=7)
    pq.write_table(pa.table({"text": TEXTS[half:]}), tmp_path / "pq/1.parquet")
    datasets.Dataset.from_dict({"text": TEXTS, "n": list(range(len(TEXTS)))}).save_to_disk(str(tmp_path / "hf"))

    reference = token_bin_of(tmp_path, TEXTS, ByteTokenizer(), 16)
    forms = [
        JsonlSource(tmp_path / "in"),  # a folder: a.jsonl, b.jsonl.gz
        JsonlSource(str(tmp_path / "in" / "*.jsonl*")),  # a glob
        JsonlSource([plain, tmp_path / "z.jsonl.zst"]),  # a list, zstd
        TextSource(tmp_path / "txt"),
        ParquetSource(tmp_path / "pq"),
        HFDatasetSource(tmp_path / "hf"),
    ]
    for form in forms:
        assert_same_windows(TokenizedSource(form, ByteTokenizer(), 16, cache_dir=tmp_path / "cache"), reference)


def test_per_document_samples_are_cut_or_padded_and_the_cut_tokens_counted(tmp_path):
    texts = ["ab", "0123456789", "xyz"]
    source = TokenizedSource(
        JsonlSource(write_jsonl(tmp_path / "d.jsonl", texts)), ByteTokenizer(), 4, "documents", cache_dir=tmp_path
    )
    assert len(source) == 3
    assert source.dropped_tokens == 11 - 5  # "0123456789" + EOT is 11 tokens, a sample holds 5
    assert source.padded_samples == 2
    batch = source.read_batch(np.array([0, 1]))
    assert batch["input_ids"].tolist() == [[97, 98, 256, 257], [48, 49, 50, 51]]
    assert batch["labels"].tolist() == [[98, 256, IGNORE_INDEX, IGNORE_INDEX], [49, 50, 51, 52]]
    assert source.text(1) == "0123456789"  # the whole document (what importance estimates score)


def test_the_cache_is_built_once_reused_and_rebuilt_when_a_file_or_the_tokenizer_changes(tmp_path, bpe, monkeypatch):
    import onlinemix.loaders.cache.tokens as tokenized

    builds = []
    original = tokenized._build
    monkeypatch.setattr(tokenized, "_build", lambda *args: builds.append(args[2]) or original(*args))
    path = write_jsonl(tmp_path / "d.jsonl", TEXTS)
    first = TokenizedSource(JsonlSource(path), ByteTokenizer(), 8, cache_dir=tmp_path / "c")
    again = TokenizedSource(JsonlSource(path), ByteTokenizer(), 8, cache_dir=tmp_path / "c")
    assert len(builds) == 1 and again.cache.folder == first.cache.folder
    TokenizedSource(JsonlSource(path), bpe, 8, cache_dir=tmp_path / "c")
    assert len(builds) == 2  # another tokenizer: another cache
    with open(path, "a") as file:
        file.write(json.dumps({"text": "one more"}) + "\n")
    changed = TokenizedSource(JsonlSource(path), ByteTokenizer(), 8, cache_dir=tmp_path / "c")
    assert len(builds) == 3 and changed.cache.meta["documents"] == len(TEXTS) + 1
    assert not list((tmp_path / "c").glob(".*partial*"))  # temporaries renamed into place


def test_nothing_is_written_beside_the_data_and_the_cache_folder_comes_from_the_environment(tmp_path, monkeypatch):
    data = tmp_path / "data"
    write_jsonl(data / "d.jsonl", TEXTS)
    os.chmod(data, 0o555)  # read-only (for a user other than root)
    monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / "env-cache"))
    try:
        source = TokenizedSource(JsonlSource(data), ByteTokenizer(), 8)
    finally:
        os.chmod(data, 0o755)
    assert source.cache.folder.parent == tmp_path / "env-cache"
    assert sorted(p.name for p in data.iterdir()) == ["d.jsonl"]


def test_a_cache_folder_that_cannot_be_written_is_one_clear_error(tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    source = JsonlSource(write_jsonl(tmp_path / "d.jsonl", TEXTS))
    with pytest.raises(InputError, match=r"cannot write to the cache folder .*a-file/cache .*set cache_dir"):
        TokenizedSource(source, ByteTokenizer(), 8, cache_dir=tmp_path / "a-file/cache")


def test_bad_inputs_name_the_file_and_say_what_was_expected(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"empty is a folder with no \.jsonl / \.jsonl\.gz"):
        JsonlSource(tmp_path / "empty")
    with pytest.raises(InputError, match=r"no file matches .*nothing-\*\.jsonl"):
        JsonlSource(str(tmp_path / "nothing-*.jsonl"))
    with pytest.raises(InputError, match=r"file not found: .*missing\.jsonl"):
        JsonlSource(tmp_path / "missing.jsonl")
    (tmp_path / "fake.jsonl.gz").write_text('{"text": "not compressed"}\n')
    with pytest.raises(InputError, match=r"fake\.jsonl\.gz: cannot read it after line 0: Not a gzipped file"):
        list(JsonlSource(tmp_path / "fake.jsonl.gz").documents())
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin1\.txt: not UTF-8 text"):
        list(TextSource(tmp_path / "latin1.txt").documents())
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n\n{"text": broken\n')
    with pytest.raises(SourceError, match=r"bad\.jsonl: line 3 is not valid JSON"):
        list(JsonlSource(tmp_path / "bad.jsonl").documents())
    (tmp_path / "field.jsonl").write_text('{"body": "x"}\n')
    with pytest.raises(SourceError, match=r"field\.jsonl: line 1 has no field 'text' \(its fields: \['body'\]\)"):
        list(JsonlSource(tmp_path / "field.jsonl").documents())
    ids = write_jsonl(tmp_path / "ids.jsonl", ["x"])
    with pytest.raises(SourceError, match="holds token id 300, outside the vocabulary of byte"):
        bad = JsonlSource(ids)
        bad.documents = lambda progress=None: iter([np.array([1, 300])])
        TokenizedSource(bad, ByteTokenizer(), 4, cache_dir=tmp_path / "c")


# ----------------------------------------------------------------------------- records (with a transform)


def test_jsonl_records_are_indexed_once_in_the_cache_folder_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    import onlinemix.loaders.sources.jsonl as jsonl_module

    path = write_jsonl(tmp_path / "data" / "d.jsonl", [f"doc {i}" for i in range(10)])
    assert len(JsonlSource(path, cache_dir=tmp_path / "cache")) == 10
    assert sorted(p.name for p in path.parent.iterdir()) == ["d.jsonl"]  # nothing written beside the data
    scans = []
    original = jsonl_module.scan_line_starts
    monkeypatch.setattr(jsonl_module, "scan_line_starts", lambda p: scans.append(p) or original(p))
    assert len(JsonlSource(path, cache_dir=tmp_path / "cache")) == 10 and scans == []  # served from the cache
    with open(path, "a") as file:
        file.write('{"text": "doc 10"}\n')
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    source = JsonlSource(path, cache_dir=tmp_path / "cache")
    assert len(source) == 11 and len(scans) == 1
    assert source.record(10) == {"text": "doc 10"}


def test_jsonl_records_skip_empty_lines_span_files_and_handle_a_missing_final_newline(tmp_path, monkeypatch):
    import onlinemix.loaders.sources.jsonl as jsonl_module

    monkeypatch.setattr(jsonl_module, "_CHUNK", 64)  # many chunk boundaries
    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two"}\n\n\n{"text": "three"}')
    texts = [("x" * (i % 13)) for i in range(300)]
    write_jsonl(tmp_path / "b.jsonl", texts)
    source = JsonlSource(tmp_path, cache_dir=tmp_path / "cache")
    assert [source.record(i)["text"] for i in range(len(source))] == ["one", "two", "three", *texts]


def test_jsonl_record_errors_name_the_file_and_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken\n{"body": "no text"}\n')
    source = JsonlSource(path, cache_dir=tmp_path / "cache", transform=lambda record: {"n": np.array(len(record))})
    with pytest.raises(SourceError, match=r"d.jsonl: line 3 \(document 1\) is not valid JSON"):
        source.read_batch(np.array([1]))
    assert source.read_batch(np.array([0, 2]))["n"].tolist() == [1, 1]
    with pytest.raises(InputError, match="a transform reads records by index, which a compressed file cannot give"):
        gz = tmp_path / "c.jsonl.gz"
        gz.write_bytes(gzip.compress(b'{"text": "x"}\n'))
        len(JsonlSource(gz, cache_dir=tmp_path / "cache", transform=lambda record: record))
