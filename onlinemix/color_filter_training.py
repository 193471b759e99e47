"""Training the pair of small causal LMs CoLoR-Filter scores with (``loaders/importance/color_filter.py``).

``fine_tune_conditional`` is the recipe ``onlinemix importance fit --scorer color-filter`` runs: copy a prior
model, train it a few hundred steps on the target set, save it and a JSON file naming both models. The scorer
itself, which only reads the two models, lives with the other scorers in the loader's importance package.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from onlinemix.loaders.extras import require
from onlinemix.loaders.importance.color_filter import FORMAT
from onlinemix.loaders.importance.estimator import ImportanceError


def _transformers() -> Any:
    return require("transformers", "training CoLoR-Filter's models")


def byte_level_tokenizer() -> Any:
    """A ``transformers`` tokenizer of single bytes (byte-level, no merges) with a padding token: 257 ids. For
    small models trained from scratch on any text (the suite's, the tests')."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocabulary = {symbol: i for i, symbol in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocabulary["<pad>"] = len(vocabulary)
    tokenizer = Tokenizer(models.BPE(vocab=vocabulary, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    return _transformers().PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token="<pad>")


def train_causal_lm(
    model: Any,
    tokenizer: Any,
    texts: Sequence[str],
    steps: int,
    *,
    batch_size: int = 16,
    lr: float = 1e-3,
    max_tokens: int = 512,
    seed: int = 0,
    desc: str = "training",
) -> Any:
    """``steps`` of next-token training (AdamW at a constant ``lr``), in place, with a progress bar; returns the
    model in eval mode.

    The documents are tokenized once and cut into pieces of at most ``max_tokens`` tokens (every token of a long
    document is trained on, not only its first ``max_tokens``); each step trains on ``batch_size`` pieces drawn
    at random, by a generator seeded with ``seed``: the same call trains the same model."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    pieces = [
        ids[start : start + max_tokens]
        for ids in tokenizer(list(texts))["input_ids"]
        for start in range(0, len(ids) - 1, max_tokens)  # a piece needs two tokens: one to predict
    ]
    if not pieces:
        raise ImportanceError(f"{desc}: no documents of two tokens or more to train on")
    generator = np.random.default_rng(seed)
    torch.manual_seed(seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    for _ in tqdm(range(steps), desc=desc, unit="step"):
        chosen = [pieces[i] for i in generator.integers(0, len(pieces), batch_size)]
        ids = torch.full((batch_size, max(map(len, chosen))), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, piece in enumerate(chosen):  # padded on the right, as the scorer pads
            ids[row, : len(piece)], mask[row, : len(piece)] = torch.tensor(piece), 1
        ids, mask = ids.to(device), mask.to(device)
        model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return model.eval()


def fine_tune_conditional(
    prior: str | Path,
    target: Sequence[str],
    output: str | Path,
    *,
    steps: int = 200,
    lr: float = 1e-3,
    batch_size: int = 16,
    max_tokens: int = 512,
    seed: int = 0,
    device: str = "cpu",
) -> Path:
    """The recipe: copy the ``prior`` model folder's model, train it ``steps`` steps on the ``target``
    documents, save it (with the tokenizer) to ``<output without suffix>.conditional/``, and write the JSON file
    ``output`` naming both models (relative to its folder). Returns ``output``."""
    transformers = _transformers()
    prior, output = Path(prior), Path(output)
    if not prior.is_dir():
        raise ImportanceError(f"--prior {prior} is not a model folder (a transformers checkpoint on disk)")
    model = transformers.AutoModelForCausalLM.from_pretrained(prior).to(device)
    tokenizer = transformers.AutoTokenizer.from_pretrained(prior)
    train_causal_lm(model, tokenizer, target, steps, batch_size=batch_size, lr=lr, max_tokens=max_tokens, seed=seed,
                    desc="fine-tuning on the target")  # fmt: skip
    folder = output.with_suffix(".conditional")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    settings = {
        "format": FORMAT,
        "prior": os.path.relpath(prior.resolve(), output.parent.resolve()),
        "conditional": folder.name,
        "max_tokens": max_tokens,
        "device": device,
        "recipe": {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed, "documents": len(target)},
    }
    output.write_text(json.dumps(settings, indent=1) + "\n")
    return output
