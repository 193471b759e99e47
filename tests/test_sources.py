import os
import pickle

import numpy as np
import pytest
from conftest import write_jsonl, write_tokens
from onlinemix.loaders.sources import JsonlSource, SourceError, TokenBinSource
from onlinemix.loaders.sources.jsonl import index_path
from onlinemix.loaders.transforms import IGNORE_INDEX, ByteTokenizer


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


def test_sources_pickle_without_open_handles_and_read_the_same(tmp_path):
    source = TokenBinSource(write_tokens(tmp_path / "t.bin", np.arange(500)), seq_len=16)
    before = source.read_batch(np.array([1, 2]))
    assert "_open_tokens" in source.__dict__
    clone = pickle.loads(pickle.dumps(source))
    assert "_open_tokens" not in clone.__dict__
    assert np.array_equal(clone.read_batch(np.array([1, 2]))["labels"], before["labels"])

    texts = write_jsonl(tmp_path / "d.jsonl", ["a", "b"])
    jsonl = JsonlSource(texts, seq_len=4)
    jsonl.record(0)
    clone = pickle.loads(pickle.dumps(jsonl))
    assert clone.record(1) == {"text": "b"}


def test_byte_tokenizer_hand_example():
    sample = ByteTokenizer(seq_len=4)("hi")
    assert sample["input_ids"].tolist() == [104, 105, ByteTokenizer.EOT, ByteTokenizer.PAD]
    assert sample["labels"].tolist() == [105, ByteTokenizer.EOT, IGNORE_INDEX, IGNORE_INDEX]
    full = ByteTokenizer(seq_len=2, field="t")({"t": "abc"})
    assert full["input_ids"].tolist() == [97, 98] and full["labels"].tolist() == [98, 99]
    assert ByteTokenizer(8).decode(ByteTokenizer(8).encode("héllo")) == "héllo"


def test_jsonl_index_skips_empty_lines_and_handles_a_missing_final_newline(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "one"}\n\n{"text": "two"}\n\n\n{"text": "three"}')
    source = JsonlSource(path, seq_len=8)
    assert len(source) == 3
    assert [source.record(i)["text"] for i in range(3)] == ["one", "two", "three"]
    assert index_path(path).exists()


def test_jsonl_index_is_cached_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    path = write_jsonl(tmp_path / "d.jsonl", [f"doc {i}" for i in range(10)])
    assert len(JsonlSource(path, seq_len=8)) == 10
    scans = []
    import onlinemix.loaders.sources.jsonl as jsonl_module

    original = jsonl_module._scan_line_starts
    monkeypatch.setattr(jsonl_module, "_scan_line_starts", lambda p: scans.append(p) or original(p))
    assert len(JsonlSource(path, seq_len=8)) == 10 and scans == []  # served from the cache
    with open(path, "a") as file:
        file.write('{"text": "doc 10"}\n')
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))
    source = JsonlSource(path, seq_len=8)
    assert len(source) == 11 and len(scans) == 1
    assert source.record(10) == {"text": "doc 10"}


def test_jsonl_large_chunked_scan_matches_a_line_split(tmp_path, monkeypatch):
    import onlinemix.loaders.sources.jsonl as jsonl_module

    monkeypatch.setattr(jsonl_module, "_CHUNK", 64)  # many chunk boundaries
    texts = [("x" * (i % 13)) for i in range(300)]
    path = write_jsonl(tmp_path / "d.jsonl", texts)
    source = JsonlSource(path, seq_len=8)
    assert [source.record(i)["text"] for i in range(300)] == texts


def test_jsonl_corrupt_line_and_missing_field_name_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n\n{"text": broken\n{"body": "no text"}\n')
    source = JsonlSource(path, seq_len=8)
    with pytest.raises(SourceError, match=r"d.jsonl: line 3 \(document 1\) is not valid JSON"):
        source.read_batch(np.array([1]))
    with pytest.raises(SourceError, match=r"d.jsonl: line 4 \(document 2\) has no field 'text'"):
        source.read_batch(np.array([0, 2]))
