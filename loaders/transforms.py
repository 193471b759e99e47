"""Turning raw records into model inputs.

A *transform* is any picklable callable ``record -> {field: array}``. Every
domain of a mixture must produce the same fields with the same shapes, so
that one batch can hold samples of all of them. The built-in samples (token
windows) are the standard causal-LM pair of next-token arrays of length ``seq_len``:

- ``input_ids``: the tokens the model reads;
- ``labels``: the token that follows each of them, ``IGNORE_INDEX`` (-100,
  the default ``ignore_index`` of ``torch.nn.functional.cross_entropy``)
  where there is nothing to predict (padding).

A transform given in a config as ``"package.module:function"`` is imported
in each worker on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

IGNORE_INDEX = -100
Transform = Callable[[Any], Mapping[str, Any]]


class TokenWindow:
    """A window of ``seq_len + 1`` token ids -> ``input_ids`` and shifted ``labels``."""

    def __call__(self, window: np.ndarray) -> dict[str, np.ndarray]:
        window = np.asarray(window, dtype=np.int64)
        return {"input_ids": window[:-1], "labels": window[1:]}

    def __repr__(self) -> str:
        return "TokenWindow()"


class ImportedTransform:
    """A transform named ``"package.module:attribute"``, imported lazily (so it pickles as a name)."""

    def __init__(self, spec: str):
        module, sep, attribute = spec.partition(":")
        if not sep or not module or not attribute:
            raise ValueError(f"transform must look like 'package.module:function', got {spec!r}")
        self.spec = spec
        self._function: Transform | None = None

    def resolve(self) -> Transform:
        """The named function, imported on first use."""
        if self._function is None:
            module, _, attribute = self.spec.partition(":")
            try:
                target: Any = importlib.import_module(module)
                for part in attribute.split("."):
                    target = getattr(target, part)
            except (ImportError, AttributeError) as error:
                raise ValueError(f"cannot import {self.spec!r}: {error}") from error
            if not callable(target):
                raise ValueError(f"transform {self.spec!r} is not callable")
            self._function = target
        return self._function

    def __call__(self, record: Any) -> Mapping[str, Any]:
        return self.resolve()(record)

    def __getstate__(self) -> dict:
        return {"spec": self.spec, "_function": None}

    def __repr__(self) -> str:
        return f"ImportedTransform({self.spec!r})"


def collate(samples: Sequence[Mapping[str, Any]], where: str) -> dict[str, np.ndarray]:
    """Stack per-sample field dicts into arrays; ``where`` names the domain in errors."""
    if not samples:
        raise ValueError(f"{where}: nothing to collate")
    fields = sorted(samples[0])
    out: dict[str, np.ndarray] = {}
    for name in fields:
        try:
            out[name] = np.stack([np.asarray(sample[name]) for sample in samples])
        except KeyError as error:
            raise ValueError(f"{where}: a sample lacks field {error.args[0]!r} (fields: {fields})") from None
        except ValueError as error:
            raise ValueError(f"{where}: field {name!r} has samples of different shapes ({error})") from None
    for sample in samples:
        if sorted(sample) != fields:
            raise ValueError(f"{where}: samples have different fields: {fields} vs {sorted(sample)}")
    return out
