"""``onlinemix convert INPUT... -o OUT --to FORMAT``: text or JSONL to a token-bin file, MDS or WebDataset shards."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from onlinemix.cli.common import Commands, command
from onlinemix.loaders.convert import FORMATS, convert, parse_size

# each command's (or action's) one-line help and its description, as --help shows them
ABOUT = {
    "convert": (
        "tokenize text or JSONL into a token-bin file, MDS shards or WebDataset shards",
        "Tokenize documents into a format a mixture domain can read. A .jsonl input gives one document per line "
        "(its --field), any other file is one document, a folder gives its files matching --glob. The output "
        "appears only when complete (written beside it, then renamed).",
    ),
}


def run(args: argparse.Namespace) -> None:
    """Convert and print what was written."""
    started = time.perf_counter()
    summary = convert(
        args.inputs,
        args.output,
        args.to,
        text_field=args.field,
        glob=args.glob,
        tokenizer=args.tokenizer,
        eot=args.eot,
        pack=args.pack,
        shard_bytes=parse_size(args.shard_size),
        compression=args.compression,
        keep_text=args.keep_text,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(summary.describe(Path(args.output), args.to, time.perf_counter() - started))


def add(commands: Commands) -> None:
    """The ``convert`` parser."""
    parser = command(commands, "convert", *ABOUT["convert"], run)
    parser.add_argument("inputs", nargs="+", type=Path, help="files or folders to read")
    parser.add_argument("-o", "--output", type=Path, required=True, help="the .bin file or the shard folder to write")
    parser.add_argument("--to", choices=FORMATS, required=True, help="output format")
    parser.add_argument("--field", default="text", help="the text field of JSONL records")
    parser.add_argument("--glob", default="*", help="which files of an input folder to read (recursively)")
    parser.add_argument(
        "--tokenizer",
        default="byte",
        help="'byte' (UTF-8 bytes + end-of-text 256, what the loader's ByteTokenizer reads) or the path of a "
        "Hugging Face tokenizer.json",
    )
    parser.add_argument(
        "--eot",
        help="a tokenizer file's end-of-text token, appended to every document (default: the first of "
        "<|endoftext|>, <|end_of_text|>, </s>, <eos>, ... its vocabulary has)",
    )
    parser.add_argument(
        "--pack",
        type=int,
        metavar="SEQ_LEN",
        help="shard formats: write windows of SEQ_LEN + 1 tokens of the concatenated documents instead of one "
        "sample per document (use the mixture's seq_len)",
    )
    parser.add_argument("--shard-size", default="64MB", help="shard formats: start a new shard after this much data")
    parser.add_argument("--compression", help="mds only: shard compression, e.g. zstd (mosaicml-streaming's names)")
    parser.add_argument("--keep-text", action="store_true", help="shard formats: store each document's text too")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
