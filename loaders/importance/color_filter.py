"""CoLoR-Filter's score (Brandfonbrener et al., 2024): the conditional loss reduction of a pair of small causal LMs.

A *prior* model is trained on general data; a *conditional* model is the same model fine-tuned on the target set.
A document's score is how much better the conditional model predicts it::

    score(x) = log p_conditional(x) − log p_prior(x) = loss_prior(x) − loss_conditional(x)

summed over the document's tokens (its first ``max_tokens``): an estimate of the log density ratio of the target
to the general data, like a DSIR log weight, and resampled the same way by the stream (``importance:`` in the
mixture file). In the authors' tables, data selected by a pair of 150M-parameter models trains a 1.2B model as
well as 25x more randomly chosen data (Books).

**File.** A small JSON file names the two models, any ``transformers`` causal-LM checkpoints on disk (a folder
with a config, weights and a tokenizer; both must share the tokenizer)::

    {"format": "onlinemix-color-filter", "prior": "models/prior", "conditional": "models/target",
     "max_tokens": 512, "batch_size": 16, "device": "cpu"}

**Recipe for the conditional model** (``onlinemix.color_filter_training.fine_tune_conditional``, or
``onlinemix importance fit --scorer color-filter --prior DIR --target FILES -o cf.json``): copy the prior and
train it a few hundred steps on the target set at about the prior's final learning rate (the authors: one pass
over the target); the command writes the fine-tuned model beside the JSON file and the file naming both.
``transformers`` is an optional extra: ``pip install 'onlinemix[color-filter]'``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onlinemix.loaders.extras import require
from onlinemix.loaders.importance.estimator import ImportanceError

FORMAT = "onlinemix-color-filter"


@dataclass
class ConditionalLossScorer:
    """Scores documents by ``loss_prior − loss_conditional`` (summed over tokens) of two causal LMs."""

    prior: Any  # a transformers causal LM
    conditional: Any
    tokenizer: Any
    max_tokens: int = 512
    batch_size: int = 16
    min_words: int = 1
    settings: dict[str, Any] | None = None  # as read from the file: part of the fingerprint

    name = "color-filter"

    @classmethod
    def load(cls, path: str | Path) -> ConditionalLossScorer:
        """The scorer a JSON file describes (model folders relative to the file's own folder)."""
        path = Path(path)
        try:
            settings = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise ImportanceError(f"{path}: not a CoLoR-Filter file ({error})") from None
        if not isinstance(settings, dict) or settings.get("format") != FORMAT:
            raise ImportanceError(f"{path}: not a CoLoR-Filter file (format {FORMAT!r} expected)")
        missing = [key for key in ("prior", "conditional") if key not in settings]
        if missing:
            raise ImportanceError(f"{path}: names no {' or '.join(missing)} model")
        transformers = _transformers()
        AutoModelForCausalLM, AutoTokenizer = transformers.AutoModelForCausalLM, transformers.AutoTokenizer
        device = torch.device(settings.get("device", "cpu"))
        folders = {key: path.parent / settings[key] for key in ("prior", "conditional")}
        models, tokenizers = {}, {}
        for key, folder in folders.items():
            if not folder.is_dir():
                raise ImportanceError(f"{path}: the {key} model folder {folder} does not exist")
            models[key] = AutoModelForCausalLM.from_pretrained(folder).to(device).eval()
            tokenizers[key] = AutoTokenizer.from_pretrained(folder)
        if tokenizers["prior"].get_vocab() != tokenizers["conditional"].get_vocab():
            raise ImportanceError(f"{path}: the two models have different tokenizers (the scores would not compare)")
        tokenizer = tokenizers["prior"]
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        settings = {**settings, "digests": {key: _folder_digest(folder) for key, folder in folders.items()}}
        return cls(
            models["prior"],
            models["conditional"],
            tokenizer,
            int(settings.get("max_tokens", 512)),
            int(settings.get("batch_size", 16)),
            int(settings.get("min_words", 1)),
            settings,
        )

    def fingerprint(self) -> str:
        """A hash of the settings and of both models' files: another model is another scorer."""
        return hashlib.sha256(json.dumps(self.settings, sort_keys=True).encode()).hexdigest()[:16]

    @torch.no_grad()
    def score(self, texts: Sequence[str], domain: str | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(scores, words)``: each document's summed conditional loss reduction, in batches of ``batch_size``;
        ``-inf`` for a document with fewer than ``min_words`` words or fewer than two tokens."""
        words = np.array([len(text.split()) for text in texts], dtype=np.int64)
        scores = np.full(len(texts), -np.inf)
        device = next(self.prior.parameters()).device
        for start in range(0, len(texts), self.batch_size):
            batch = list(texts[start : start + self.batch_size])
            encoded = self.tokenizer(
                batch, return_tensors="pt", padding=True, truncation=True, max_length=self.max_tokens
            ).to(device)
            ids, mask = encoded["input_ids"], encoded["attention_mask"]
            reduction = _token_losses(self.prior, ids, mask) - _token_losses(self.conditional, ids, mask)
            counted = mask[:, 1:].sum(1)
            found = reduction.sum(1).double().cpu().numpy()
            usable = (counted >= 1).cpu().numpy() & (words[start : start + len(batch)] >= max(self.min_words, 1))
            scores[start : start + len(batch)] = np.where(usable, found, -np.inf)
        return scores, words


def _token_losses(model: Any, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each next-token loss of ``ids`` under ``model`` (0 where the token is padding)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
    return losses * mask[:, 1:]


def _folder_digest(folder: Path) -> str:
    """Sizes and a hash of the first MiB of every file in a model folder: a changed model is another scorer."""
    digest = hashlib.sha256()
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(f"{file.relative_to(folder)}:{file.stat().st_size}".encode())
        with open(file, "rb") as handle:
            digest.update(handle.read(1 << 20))
    return digest.hexdigest()[:16]


def _transformers() -> Any:
    return require("transformers", "the CoLoR-Filter scorer")
