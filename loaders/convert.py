"""``onlinemix convert``: text or JSONL to token-bin, MDS or WebDataset shards.

Documents come from the inputs in order: a ``.jsonl`` file gives one
document per non-empty line (its ``field``), any other file is one document,
a folder gives its files matching ``glob`` (recursively, sorted by path).
Inputs may be compressed (``.gz``, ``.zst``). Each document is tokenized —
by default with the byte tokenizer the loader uses (UTF-8 bytes, then
end-of-text 256), or with a Hugging Face ``tokenizers`` file
(``tokenizer.json``), followed by its end-of-text token (``eot``, or the
first of ``tokenizers.EOT_NAMES`` it has) — and written as:

- ``tokenbin``: one flat file of token ids (every document after the other);
- ``mds``: mosaicml-streaming shards (``MDSWriter``), a ``tokens`` column
  (``ndarray``) and, with ``keep_text``, a ``text`` column;
- ``webdataset``: ``.tar`` shards (``ShardWriter``), ``<key>.npy`` token ids
  and, with ``keep_text``, ``<key>.txt``.

For the shard formats, ``pack=SEQ_LEN`` concatenates the documents and
writes windows of ``SEQ_LEN + 1`` tokens (neighbours share their boundary
token, as token-bin windows do) instead of one sample per document; the
tokens after the last whole window are counted in the summary.

The output is written beside its final name and renamed into place when
complete: an interrupted conversion leaves no output that looks complete.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from onlinemix.loaders.atomic import atomic_output
from onlinemix.loaders.extras import require
from onlinemix.loaders.paths import stripped_name
from onlinemix.loaders.sources.jsonl import JsonlSource
from onlinemix.loaders.sources.text import TextSource
from onlinemix.loaders.tokenizers import ByteTokenizer, Tokenizer, load_tokenizer, token_dtype

FORMATS = ("tokenbin", "mds", "webdataset")
_TEXT_BATCH = 256  # documents tokenized per call (HF tokenizers encode a batch in parallel)


class ConvertError(ValueError):
    """An input or option that cannot be converted; the message names the file."""


@dataclass
class Summary:
    documents: int = 0
    tokens: int = 0
    samples: int = 0
    dropped_tokens: int = 0  # after the last whole window, when packing
    dtype: str = "uint16"
    files: list[Path] = field(default_factory=list)

    def describe(self, output: Path, fmt: str, seconds: float) -> str:
        """What was written, and a mixture-file line that reads it."""
        dtype = self.dtype
        size = sum(path.stat().st_size for path in self.files)
        lines = [
            f"wrote {output} ({fmt}, {dtype}): {self.documents:,} documents, {self.tokens:,} tokens, "
            f"{self.samples:,} samples in {len(self.files)} file(s), {size / 2**20:.1f} MiB, {seconds:.1f} s",
        ]
        if self.dropped_tokens:
            lines.append(f"  {self.dropped_tokens:,} tokens after the last whole window were not written")
        source = {"tokenbin": f"tokenbin, dtype: {dtype}", "mds": "mds", "webdataset": "webdataset"}[fmt]
        lines.append(f"  config: - {{name: {output.stem}, source: {source}, path: {output}}}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------- reading


def input_files(inputs: Sequence[Path], glob: str) -> list[Path]:
    """The files ``inputs`` stand for (folders: their files matching ``pattern``), in order."""
    files: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(p for p in path.rglob(glob) if p.is_file())
            if not found:
                raise ConvertError(f"{path}: no files match {glob!r}")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise ConvertError(f"input not found: {path}")
    return files


def read_documents(files: Sequence[Path], text_field: str, progress: tqdm) -> Iterator[str]:
    """The documents of ``files`` in order: a ``.jsonl`` (or ``.ndjson``, plain or ``.gz`` / ``.zst``) file gives
    one per line (its ``text_field``), any other file is one document."""
    for path in files:
        if stripped_name(path).endswith((".jsonl", ".ndjson")):
            yield from JsonlSource([path], field=text_field).documents(progress=progress.update)
        else:
            yield from TextSource([path]).documents(progress=progress.update)


# ----------------------------------------------------------------------------- tokenizing


def tokenizer_for(spec: str, eot: str | None) -> Tokenizer:
    """The byte tokenizer, or a ``tokenizer.json`` with its end-of-text token (``eot``, or found in it)."""
    if spec == "byte":
        if eot is not None:
            raise ConvertError("--eot is for tokenizer files; the byte tokenizer always ends documents with 256")
        return ByteTokenizer()
    try:
        return load_tokenizer({"path": spec, **({"eot": eot} if eot else {})})
    except (ValueError, ImportError) as error:
        raise ConvertError(str(error)) from None


def _batched(documents: Iterator[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for document in documents:
        batch.append(document)
        if len(batch) == _TEXT_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


# ----------------------------------------------------------------------------- writing


class _Packer:
    """Cuts a stream of documents' ids into windows of ``seq_len + 1`` tokens, sharing boundary tokens."""

    def __init__(self, seq_len: int):
        self.seq_len = seq_len
        self.pending = np.empty(0, dtype=np.int64)

    def windows(self, ids: np.ndarray) -> Iterator[np.ndarray]:
        self.pending = np.concatenate([self.pending, ids])
        whole = (len(self.pending) - 1) // self.seq_len if len(self.pending) > self.seq_len else 0
        for i in range(whole):
            yield self.pending[i * self.seq_len : (i + 1) * self.seq_len + 1]
        self.pending = self.pending[whole * self.seq_len :]

    @property
    def left_over(self) -> int:
        return max(len(self.pending) - 1, 0)  # the first pending token ended the last window


def _open_writer(fmt: str, folder_or_file: Path, dtype: str, options: dict[str, Any]):
    if fmt == "tokenbin":
        return open(folder_or_file, "wb")
    if fmt == "mds":
        MDSWriter = require("streaming", "writing mds shards").MDSWriter

        columns = {"tokens": f"ndarray:{dtype}", **({"text": "str"} if options["keep_text"] else {})}
        return MDSWriter(
            out=str(folder_or_file),
            columns=columns,
            size_limit=options["shard_bytes"],
            compression=options["compression"],
            progress_bar=False,
        )
    webdataset = require("webdataset", "writing webdataset shards")

    folder_or_file.mkdir(parents=True)
    return webdataset.ShardWriter(
        str(folder_or_file / "shard-%06d.tar"), maxsize=options["shard_bytes"], maxcount=10**9, verbose=0
    )


def convert(
    inputs: Sequence[str | Path],
    output: str | Path,
    fmt: str,
    *,
    text_field: str = "text",
    glob: str = "*",
    tokenizer: str = "byte",
    eot: str | None = None,
    pack: int | None = None,
    shard_bytes: int = 64 << 20,
    compression: str | None = None,
    keep_text: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> Summary:
    """Convert ``inputs`` to ``output`` in format ``fmt``; see the module docstring."""
    if fmt not in FORMATS:
        raise ConvertError(f"format must be one of {FORMATS}, got {fmt!r}")
    if fmt == "tokenbin" and (pack or keep_text or compression):
        raise ConvertError("--pack, --keep-text and --compression are for the shard formats (mds, webdataset)")
    if pack is not None and pack < 1:
        raise ConvertError(f"--pack must be >= 1, got {pack}")
    if keep_text and pack:
        raise ConvertError("--keep-text keeps one text per document; packed windows have none")
    output = Path(output)
    if output.exists() and not overwrite:
        raise ConvertError(f"{output} exists (use --overwrite to replace it)")
    files = input_files([Path(p) for p in inputs], glob)
    encoder = tokenizer_for(tokenizer, eot)
    dtype = token_dtype(encoder.vocab_size).name
    options = {"shard_bytes": shard_bytes, "compression": compression, "keep_text": keep_text}
    summary = Summary(dtype=dtype)
    packer = _Packer(pack) if pack else None
    bar = tqdm(
        total=sum(p.stat().st_size for p in files),
        unit="B",
        unit_scale=True,
        desc=f"-> {output.name}",
        disable=not progress,
    )

    with atomic_output(output) as temporary, bar:
        writer = _open_writer(fmt, temporary, dtype, options)
        with writer:
            for texts in _batched(read_documents(files, text_field, bar)):
                for text, ids in zip(texts, encoder.encode_batch(texts)):
                    summary.documents += 1
                    summary.tokens += len(ids)
                    if fmt == "tokenbin":
                        writer.write(ids.astype(dtype).tobytes())
                        continue
                    samples = packer.windows(ids) if packer else [ids]
                    for sample in samples:
                        _write_sample(writer, fmt, summary.samples, sample.astype(dtype), text if keep_text else None)
                        summary.samples += 1
        if fmt == "tokenbin":
            summary.samples = summary.documents
        summary.dropped_tokens = packer.left_over if packer else 0
        if summary.documents == 0:
            raise ConvertError(f"no documents in {', '.join(map(str, inputs))}")
    summary.files = [output] if output.is_file() else sorted(p for p in output.iterdir() if p.is_file())
    return summary


def _write_sample(writer: Any, fmt: str, number: int, tokens: np.ndarray, text: str | None) -> None:
    if fmt == "mds":
        writer.write({"tokens": tokens, **({"text": text} if text is not None else {})})
    else:
        writer.write({"__key__": f"{number:010d}", "npy": tokens, **({"txt": text} if text is not None else {})})


def parse_size(text: str) -> int:
    """``"64MB"``, ``"512k"``, ``"1G"`` or a plain byte count, as bytes."""
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    cleaned = text.strip().lower().removesuffix("b").removesuffix("i")
    scale = units.get(cleaned[-1:], 1)
    number = cleaned[:-1] if cleaned[-1:] in units else cleaned
    try:
        value = int(float(number) * scale)
    except ValueError:
        raise ConvertError(f"cannot read size {text!r} (e.g. 64MB, 512k, 1G)") from None
    if value < 1:
        raise ConvertError(f"size must be positive, got {text!r}")
    return value
