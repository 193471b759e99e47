"""Small hermetic mixtures built in ``tmp_path``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

# The mixture from the core issue, verbatim except that data lives in tmp_path.
EXAMPLE_CONFIG = """\
seed: 1234
global_batch_size: 32
seq_len: 128
weighting: {temperature: 1.0}   # used only when no domain gives a weight: p ∝ size^(1/T)
domains:
  - {name: code,  source: tokenbin, path: data/code.bin, dtype: uint16, weight: 0.5}
  - {name: prose, source: jsonl,    path: data/prose.jsonl, field: text, weight: 0.3, max_epochs: 2}
  - {name: web,   source: tokenbin, path: data/web.bin, dtype: uint16, weight: 0.2}
"""


def write_tokens(path: Path, tokens: np.ndarray, dtype: str = "uint16") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    np.asarray(tokens, dtype=dtype).tofile(path)
    return path


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({field: text}) + "\n" for text in texts))
    return path


def make_example(root: Path, code_tokens: int = 20_000, web_tokens: int = 9_000, documents: int = 150) -> Path:
    """The example config's three domains; token values encode (domain, position) for checking reads."""
    write_tokens(root / "data/code.bin", np.arange(code_tokens) % 50_000)
    write_tokens(root / "data/web.bin", 60_000 + np.arange(web_tokens) % 5_000)
    write_jsonl(root / "data/prose.jsonl", [f"document {i}: " + "lorem ipsum " * (i % 7) for i in range(documents)])
    config = root / "mixture.yaml"
    config.write_text(EXAMPLE_CONFIG)
    return config


def write_config(root: Path, **overrides) -> Path:
    """The example config with top-level keys replaced (``domains`` included)."""
    raw = yaml.safe_load(EXAMPLE_CONFIG)
    raw.update(overrides)
    path = root / "mixture.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


@pytest.fixture
def example(tmp_path: Path) -> Path:
    return make_example(tmp_path)


def shout(record: dict) -> dict:
    """A config-named transform (``conftest:shout``): upper-case the text, then byte-tokenize."""
    from onlinemix.loaders.transforms import ByteTokenizer

    return ByteTokenizer(128)(record["text"].upper())


def ids_only(record: dict) -> dict:
    """A transform whose fields differ from the token-bin domains' (``conftest:ids_only``)."""
    return {"input_ids": np.zeros(128, dtype=np.int64)}
