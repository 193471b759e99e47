"""Token datasets of other tools, read as they are: a Megatron indexed dataset, a LitData optimized dataset and an
OLMo-core numpy token file, mixed with a JSONL domain.

    python examples/token_datasets.py --out runs/token_datasets

Each is written here by its own tool (megatron-core's ``IndexedDatasetBuilder``, ``litdata.optimize``, a raw
``np.memmap`` as OLMo-core writes) from real text (Python's standard library: its modules' docstrings, one document
each), tokenized to bytes (``ByteTokenizer``: ids 0-255, 256 ends a document). Then one mixture file names them all,
and a few batches are drawn. Needs ``megatron-core`` and ``litdata`` (``pip install -r requirements.txt``).
"""

from __future__ import annotations

import argparse
import ast
import json
import sysconfig
from pathlib import Path

import numpy as np

from onlinemix import ByteTokenizer, MixedDataset, MixedLoader

TOKENIZER = ByteTokenizer()


def stdlib_documents(count: int) -> list[str]:
    """The docstrings of the standard library's first ``count`` modules that have one: real text, no download."""
    documents = []
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        try:
            docstring = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if docstring:
            documents.append(docstring)
        if len(documents) == count:
            break
    return documents


def token_ids(text: str) -> np.ndarray:
    """A document's ids, ended by the end-of-text id (as Megatron's ``--append-eod`` and OLMo-core do)."""
    return np.array([*TOKENIZER.encode(text), TOKENIZER.eot_id], dtype=np.int64)


# --8<-- [start:megatron]
def write_megatron(prefix: Path, documents: list[str]) -> None:
    """A ``.bin``/``.idx`` pair, as Megatron-LM's ``preprocess_data.py`` writes one (``source: megatron``)."""
    import torch
    from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=np.uint16)
    for text in documents:
        ids = token_ids(text)
        builder.add_document(torch.from_numpy(ids), [len(ids)])
    builder.finalize(f"{prefix}.idx")


# --8<-- [end:megatron]


# --8<-- [start:litdata]
def tokens_of(text: str):
    """``litdata.optimize``'s function for a token dataset: each input yields its ids."""
    import torch

    yield torch.from_numpy(token_ids(text).astype(np.int32))


def write_litdata(folder: Path, documents: list[str]) -> None:
    """Token chunks, as LitData's pretraining recipes write them (``source: litdata``)."""
    import litdata

    litdata.optimize(fn=tokens_of, inputs=documents, output_dir=str(folder), chunk_bytes="64KB",
                     item_loader=litdata.TokensLoader(), num_workers=1)  # fmt: skip


# --8<-- [end:litdata]


# --8<-- [start:olmo]
def write_olmo(path: Path, documents: list[str]) -> None:
    """A raw memory map of ids, no header, as OLMo-core's (and Dolma's) tokenizer writes one: ``source: tokenbin``
    with its ``dtype`` (``uint32`` for OLMo's 100k vocabulary; ``uint16`` fits these byte ids)."""
    ids = np.concatenate([token_ids(text) for text in documents])
    memmap = np.memmap(path, dtype=np.uint16, mode="w+", shape=(len(ids),))
    memmap[:] = ids
    memmap.flush()


# --8<-- [end:olmo]

# --8<-- [start:mixture]
MIXTURE = """\
seed: 0
global_batch_size: 8
seq_len: 64
tokenizer: byte                # the ids of every domain: UTF-8 bytes, 256 ends a document
domains:
  - {name: megatron, source: megatron, path: megatron/docs_text_document}   # the prefix: .bin and .idx
  - {name: litdata,  source: litdata,  path: litdata}                       # a folder, or s3://bucket/dataset
  - {name: olmo,     source: tokenbin, path: olmo/part-0-00000.npy, dtype: uint16}
  - {name: prose,    source: jsonl,    path: prose.jsonl}
"""
# --8<-- [end:mixture]


def main(argv: list[str] | None = None) -> MixedDataset:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/token_datasets"), help="where the datasets go")
    args = parser.parse_args(argv)
    documents = stdlib_documents(200)
    quarters = [documents[i::4] for i in range(4)]
    for folder in ("megatron", "olmo"):
        (args.out / folder).mkdir(parents=True, exist_ok=True)
    write_megatron(args.out / "megatron/docs_text_document", quarters[0])
    write_litdata(args.out / "litdata", quarters[1])
    write_olmo(args.out / "olmo/part-0-00000.npy", quarters[2])
    with open(args.out / "prose.jsonl", "w") as file:
        file.writelines(json.dumps({"text": text}) + "\n" for text in quarters[3])
    (args.out / "mixture.yaml").write_text(MIXTURE)

    dataset = MixedDataset.from_config(args.out / "mixture.yaml", num_batches=4)
    for name, source in zip(dataset.names, dataset.sources):
        print(f"{name}: {len(source):,} windows; {source.summary() or 'token ids as they are'}")
    for batch in MixedLoader(dataset, num_workers=0):
        print("batch:", " ".join(f"{dataset.names[d]}:{i}" for d, i in zip(batch["domain"].tolist(),
                                                                          batch["index"].tolist())))  # fmt: skip
    first = batch["input_ids"][0].tolist()
    print("its first window:", repr(TOKENIZER.decode(first)[:60]))
    return dataset


if __name__ == "__main__":
    main()
