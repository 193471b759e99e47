"""A ``tokenizer.json`` encoded by fastokens gives tokenizers' ids, token for token: over text that stresses a BPE, for
a byte-level and two non-byte-level tokenizers; a file fastokens cannot load, or a batch it refuses, is encoded by
tokenizers (said once); a token cache is the same bytes whichever backend made it, and says which did."""

from __future__ import annotations

import logging
import sysconfig
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_jsonl

from onlinemix import MixedDataset
from onlinemix.cli import main as onlinemix
from onlinemix.loaders.tokenizers import BACKEND_ENV, HFTokenizer, split_flat

tokenizers = pytest.importorskip("tokenizers")
pytest.importorskip("fastokens")
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers  # noqa: E402

STRESS = [
    "",
    " ",
    "\n\n\n",
    "héllo wörld, Ünïcödé façade",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "Здравствуй, мир! Γειά σου κόσμε",
    "مرحبا بالعالم שלום עולם",
    "emoji 🎉🔥 a family 👩‍👩‍👧‍👦 flags 🇩🇪🇯🇵 skin 👍🏽",
    "tabs\t\t\tand    many      spaces" + " " * 700 + "then text",
    "x" * 20_000,
    "supercalifragilisticexpialidocious" * 60,
    "text <|endoftext|> more text </s> and <unk> inside",
    "<|endoftext|>",
    "\x00\x01 control characters \u200b zero width \ufeff",
    "ﬁ ligature ½ ² ＦＵＬＬＷＩＤＴＨ",
    "def f(x):\n    return x ** 2  # ∑ ∫ √\n",
]


def stdlib_text(count: int = 120) -> list[str]:
    files = sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))[:count]
    return [path.read_text(errors="replace")[:4000] for path in files]


def train(kind: str, path: Path) -> Path:
    """A small tokenizer.json of one of three designs, trained on stdlib source (no download)."""
    if kind == "byte-level":  # GPT-2's design: every byte a token, BPE merges over a regex split
        tokenizer = tokenizers.Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<|endoftext|>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
    elif kind == "byte-fallback":  # Llama 2's design: SentencePiece-style BPE over characters, bytes for the rest
        tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        specials = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)]
        trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=specials, show_progress=False)
    else:  # characters, an unknown token for the rest, words split by a regex
        tokenizer = tokenizers.Tokenizer(models.BPE(unk_token="<unk>"))
        tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"\w+|[^\w\s]+|\s+"), behavior="isolated")
        trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=["<unk>", "</s>"], show_progress=False)
    tokenizer.train_from_iterator(stdlib_text(), trainer)
    tokenizer.save(str(path))
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("tokenizers")
    return {kind: train(kind, folder / f"{kind}.json") for kind in ("byte-level", "byte-fallback", "unknown-token")}


def reference_ids(path: Path, texts: list[str], eot: int) -> list[list[int]]:
    plain = tokenizers.Tokenizer.from_file(str(path))
    return [[*e.ids, eot] for e in plain.encode_batch(texts, add_special_tokens=False)]


@pytest.mark.parametrize("kind", ["byte-level", "byte-fallback", "unknown-token"])
def test_fastokens_gives_tokenizers_ids_on_text_that_stresses_a_bpe(trained, kind, monkeypatch):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    tokenizer = HFTokenizer(trained[kind])
    texts = STRESS + stdlib_text(40)
    flat, lengths = tokenizer.encode_flat(texts)
    assert tokenizer.backend.startswith("fastokens ")
    assert flat.dtype == np.uint32 and len(lengths) == len(texts)
    assert [ids.tolist() for ids in split_flat(flat, lengths)] == reference_ids(trained[kind], texts, tokenizer.eot_id)
    tokenizer.check_backend(texts, "stress")  # agrees: no error
    batch = tokenizer.encode_batch(texts[:3])  # one int64 array a text, the empty one just its end
    assert [ids.tolist() for ids in batch] == reference_ids(trained[kind], texts[:3], tokenizer.eot_id)
    assert batch[0].tolist() == [tokenizer.eot_id] and batch[0].dtype == np.int64


def test_tokenizers_can_be_forced(trained, monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "tokenizers")
    tokenizer = HFTokenizer(trained["byte-level"])
    flat, lengths = tokenizer.encode_flat(STRESS)
    assert tokenizer.backend.startswith("tokenizers ")
    assert [ids.tolist() for ids in split_flat(flat, lengths)] == reference_ids(
        trained["byte-level"], STRESS, tokenizer.eot_id
    )
    monkeypatch.setenv(BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match=rf"\${BACKEND_ENV} must be one of auto, tokenizers, fastokens, got 'fast'"):
        HFTokenizer(trained["byte-level"]).encode_flat(["x"])


def test_a_tokenizer_fastokens_cannot_load_is_encoded_by_tokenizers_said_in_one_line(tmp_path, monkeypatch, caplog):
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    tokenizer = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer()  # a normaliser fastokens does not implement
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.train_from_iterator(stdlib_text(30), trainers.WordPieceTrainer(vocab_size=800, special_tokens=["[UNK]",
                                  "[SEP]"], show_progress=False))  # fmt: skip
    tokenizer.save(str(tmp_path / "wordpiece.json"))
    ours = HFTokenizer(tmp_path / "wordpiece.json")
    with caplog.at_level(logging.WARNING, logger="onlinemix"):
        flat, lengths = ours.encode_flat(STRESS)
        ours.encode_flat(STRESS)
    assert ours.backend.startswith("tokenizers ")
    (line,) = [r.getMessage() for r in caplog.records]
    assert "fastokens cannot load it" in line and "encoding with tokenizers" in line and "\n" not in line
    expected = reference_ids(tmp_path / "wordpiece.json", STRESS, ours.eot_id)
    assert [ids.tolist() for ids in split_flat(flat, lengths)] == expected


def test_a_batch_fastokens_refuses_is_encoded_by_tokenizers(tmp_path, monkeypatch, caplog):
    """A byte-level BPE trained without every byte: tokenizers drops a byte it has no token for, fastokens refuses
    the text; the batch is tokenizers' then, said once."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    tokenizer = tokenizers.Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    ascii_only = [text.encode("ascii", "ignore").decode() for text in stdlib_text(40)]
    trainer = trainers.BpeTrainer(vocab_size=600, special_tokens=["<|endoftext|>"], show_progress=False)
    tokenizer.train_from_iterator(ascii_only, trainer)
    tokenizer.save(str(tmp_path / "partial.json"))
    ours = HFTokenizer(tmp_path / "partial.json")
    texts = ["plain ascii", "日本語 and ascii"]
    with caplog.at_level(logging.WARNING, logger="onlinemix"):
        flat, lengths = ours.encode_flat(texts)
        ours.encode_flat(texts)
    assert ours.backend.startswith("fastokens ")
    assert [ids.tolist() for ids in split_flat(flat, lengths)] == reference_ids(
        tmp_path / "partial.json", texts, ours.eot_id
    )
    (line,) = [r.getMessage() for r in caplog.records]
    assert "refused a batch" in line and "encoded with tokenizers" in line


def test_a_backend_that_disagrees_is_an_error_naming_the_document_and_the_token(trained, monkeypatch):
    """The check itself, against a backend that gives one wrong id (a real disagreement is what it is for)."""
    monkeypatch.delenv(BACKEND_ENV, raising=False)
    tokenizer = HFTokenizer(trained["byte-level"])
    real = tokenizer.encoder

    class OneWrongId:
        def encode_batch_flat(self, texts, add_special_tokens=False):
            ids, offsets = real.encode_batch_flat(texts, add_special_tokens=add_special_tokens)
            wrong = np.frombuffer(ids, dtype=np.uint32).copy()
            second = int(np.frombuffer(offsets, dtype=np.uint64)[1])
            wrong[second + 3] += 1  # the second text's fourth token
            return wrong.tobytes(), offsets

    tokenizer._encoder = OneWrongId()
    with pytest.raises(ValueError) as error:
        tokenizer.check_backend(["first document", "the second document here"], "data/web.jsonl")
    message = str(error.value)
    assert message.startswith("data/web.jsonl: document 1: fastokens ") and "from token 3 " in message
    assert f"set {BACKEND_ENV}=tokenizers" in message and "\n" not in message


def write_mixture(root: Path, tokenizer: Path) -> Path:
    texts = STRESS * 3 + stdlib_text(60)
    write_jsonl(root / "text.jsonl", texts)
    config = {"seed": 0, "global_batch_size": 4, "seq_len": 32, "tokenizer": str(tokenizer),
              "domains": [{"name": "text", "source": "jsonl", "path": "text.jsonl"}]}  # fmt: skip
    (root / "mixture.yaml").write_text(yaml.safe_dump(config))
    return root / "mixture.yaml"


def test_a_token_cache_is_the_same_whichever_backend_made_it_and_says_which(trained, tmp_path, monkeypatch, capsys):
    config = write_mixture(tmp_path, trained["byte-fallback"])
    built = {}
    for backend in ("tokenizers", "auto"):
        monkeypatch.setenv(BACKEND_ENV, backend)
        monkeypatch.setenv("ONLINEMIX_CACHE_DIR", str(tmp_path / f"cache-{backend}"))
        (source,) = MixedDataset.from_config(config).sources
        built[backend] = source.cache
    slow, fast = built["tokenizers"], built["auto"]
    assert slow.folder.name == fast.folder.name  # the same key: the same tokenizer fingerprint
    for name in ("tokens.bin", "documents.npy"):
        assert (slow.folder / name).read_bytes() == (fast.folder / name).read_bytes()
    assert slow.meta["backend"].startswith("tokenizers ") and fast.meta["backend"].startswith("fastokens ")
    assert onlinemix(["cache", "list", "--cache-dir", str(tmp_path / "cache-auto")]) in (0, None)
    assert f"({fast.meta['backend']})" in capsys.readouterr().out
