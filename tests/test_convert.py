"""``onlinemix convert``: what it writes reads back exactly through the sources, and never half-written."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest

from onlinemix.cli import main
from onlinemix.loaders import convert as convert_module
from onlinemix.loaders.convert import ConvertError, convert, parse_size
from onlinemix.loaders.sources import MdsSource, SourceError, TokenBinSource, TokenizedSource, WebDatasetSource
from onlinemix.loaders.tokenizers import ByteTokenizer

TEXTS = [f"document number {i}: " + "words and more words " * (i % 9) + "é ✓" for i in range(40)]


def corpus(root: Path) -> Path:
    """Half the documents as JSONL lines, half as text files in a sub-folder (read after the JSONL)."""
    (root / "corpus" / "sub").mkdir(parents=True)
    (root / "corpus" / "a.jsonl").write_text("".join(json.dumps({"body": t}) + "\n\n" for t in TEXTS[:20]))
    for i, text in enumerate(TEXTS[20:]):
        (root / "corpus" / "sub" / f"doc{i:02d}.txt").write_text(text)
    return root / "corpus"


def byte_ids(text: str) -> np.ndarray:
    return ByteTokenizer().encode(text)


def test_tokenbin_is_every_document_in_order(tmp_path):
    summary = convert([corpus(tmp_path)], tmp_path / "out.bin", "tokenbin", text_field="body", progress=False)
    expected = np.concatenate([byte_ids(t) for t in TEXTS])
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out.bin", dtype=np.uint16), expected)
    assert (summary.documents, summary.tokens, summary.dtype) == (40, len(expected), "uint16")


@pytest.mark.parametrize("fmt, source", [("mds", MdsSource), ("webdataset", WebDatasetSource)])
def test_shards_hold_one_document_each(tmp_path, fmt, source):
    out = tmp_path / "shards"
    summary = convert([corpus(tmp_path)], out, fmt, text_field="body", shard_bytes=1000, keep_text=True, progress=False)
    assert summary.samples == 40 and len(summary.files) > 3
    read = source(out)
    assert len(read) == 40
    for i in (0, 19, 20, 39):
        record = read.record(i)
        np.testing.assert_array_equal(record["document"], byte_ids(TEXTS[i]))
        assert record["text" if fmt == "mds" else "txt"] == TEXTS[i]


@pytest.mark.parametrize("fmt, source", [("mds", MdsSource), ("webdataset", WebDatasetSource)])
def test_packed_shards_equal_token_bin_windows(tmp_path, fmt, source):
    convert([corpus(tmp_path)], tmp_path / "all.bin", "tokenbin", text_field="body", progress=False)
    summary = convert([tmp_path / "corpus"], tmp_path / "packed", fmt, text_field="body", pack=32, progress=False)
    windows = TokenBinSource(tmp_path / "all.bin", seq_len=32)
    # each stored sample is one whole window: one sample per document, nothing cut or padded
    packed = TokenizedSource(source(tmp_path / "packed"), ByteTokenizer(), 32, "documents", cache_dir=tmp_path / "c")
    assert packed.dropped_tokens == packed.padded_samples == 0
    assert len(packed) == len(windows) == summary.samples
    everything = np.arange(len(windows))
    for name in ("input_ids", "labels"):
        np.testing.assert_array_equal(packed.read_batch(everything)[name], windows.read_batch(everything)[name])
    assert summary.dropped_tokens == windows.num_tokens - 1 - 32 * len(windows)


def test_hf_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator(TEXTS, trainers.WordLevelTrainer(special_tokens=["[UNK]", "<eot>"]))
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    convert(
        [corpus(tmp_path)],
        tmp_path / "out.bin",
        "tokenbin",
        text_field="body",
        tokenizer=str(tmp_path / "tokenizer.json"),
        eot="<eot>",
        progress=False,
    )
    eot = tokenizer.token_to_id("<eot>")
    expected = np.concatenate([[*tokenizer.encode(t).ids, eot] for t in TEXTS])
    np.testing.assert_array_equal(np.fromfile(tmp_path / "out.bin", dtype=np.uint16), expected)
    with pytest.raises(ConvertError, match="the end-of-text token '<end>' is not in its vocabulary"):
        convert(
            [tmp_path / "corpus"],
            tmp_path / "x.bin",
            "tokenbin",
            tokenizer=str(tmp_path / "tokenizer.json"),
            eot="<end>",
            progress=False,
        )


@pytest.mark.parametrize("fmt", ["tokenbin", "mds", "webdataset"])
def test_an_interrupted_conversion_leaves_nothing_that_looks_complete(tmp_path, monkeypatch, fmt):
    corpus(tmp_path)
    out = tmp_path / "out"
    real_read = convert_module.read_documents

    def interrupted(*args):  # the user presses Ctrl-C after 25 documents
        for number, document in enumerate(real_read(*args)):
            if number == 25:
                partial = [p for p in tmp_path.iterdir() if p.name.startswith(".out.partial")]
                assert partial and (partial[0].is_file() or any(partial[0].iterdir()))  # half-written by now
                raise KeyboardInterrupt
            yield document

    monkeypatch.setattr(convert_module, "read_documents", interrupted)
    monkeypatch.setattr(convert_module, "_TEXT_BATCH", 4)  # so that samples are written before the interrupt
    with pytest.raises(KeyboardInterrupt):
        convert([tmp_path / "corpus"], out, fmt, text_field="body", shard_bytes=500, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]  # no output, no temporary left behind
    # A finished earlier output survives a failed overwrite untouched.
    monkeypatch.undo()
    convert([tmp_path / "corpus"], out, fmt, text_field="body", progress=False)
    before = sorted(p.name for p in tmp_path.iterdir())
    with pytest.raises(SourceError, match="line 1 has no field 'missing'"):
        convert([tmp_path / "corpus"], out, fmt, text_field="missing", overwrite=True, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_bad_inputs_and_options(tmp_path):
    corpus(tmp_path)
    with pytest.raises(ConvertError, match="input not found"):
        convert([tmp_path / "nope"], tmp_path / "o", "mds", progress=False)
    with pytest.raises(ConvertError, match=r"no files match '\*\.md'"):
        convert([tmp_path / "corpus"], tmp_path / "o", "mds", glob="*.md", progress=False)
    with pytest.raises(ConvertError, match="--pack, --keep-text and --compression are for the shard formats"):
        convert([tmp_path / "corpus"], tmp_path / "o", "tokenbin", pack=8, progress=False)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(SourceError, match=r"latin1\.txt: not UTF-8 text"):
        convert([tmp_path / "latin1.txt"], tmp_path / "o", "tokenbin", progress=False)
    gz = tmp_path / "docs.jsonl.gz"  # compressed inputs are read decompressed
    gz.write_bytes(gzip.compress(b'{"text": "compressed"}\n'))
    convert([gz], tmp_path / "gz.bin", "tokenbin", progress=False)
    assert np.fromfile(tmp_path / "gz.bin", dtype=np.uint16).tolist() == byte_ids("compressed").tolist()
    assert parse_size("64MB") == 64 << 20 and parse_size("512k") == 512 << 10 and parse_size("1000") == 1000
    with pytest.raises(ConvertError, match="cannot read size"):
        parse_size("lots")


def test_cli_convert_prints_a_summary_and_a_config_line(tmp_path, capsys):
    corpus(tmp_path)
    out = tmp_path / "books"
    assert (
        main(["convert", str(tmp_path / "corpus"), "-o", str(out), "--to", "webdataset", "--field", "body", "-q"]) == 0
    )
    printed = capsys.readouterr().out
    assert f"wrote {out} (webdataset, uint16): 40 documents" in printed
    assert f"config: - {{name: books, source: webdataset, path: {out}}}" in printed
    assert main(["convert", str(tmp_path / "corpus"), "-o", str(out), "--to", "webdataset", "-q"]) == 1
    assert "exists (use --overwrite to replace it)" in capsys.readouterr().err
