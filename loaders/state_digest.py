"""State dicts that carry their own digest: a damaged checkpoint is one line, never a different run.

A byte flipped in a checkpoint can leave it loadable: a loader cursor or a controller weight a little different,
and the run goes on silently as another run; or a key name different, and the load fails with a bare
``KeyError`` deep inside. So every state dict whose values decide the sample order or the weights
(``MixedLoader``'s, ``OnlineMixer``'s, ``MiniBatchCoreset``'s) is sealed: ``seal`` adds ``"digest"``, a BLAKE2b of
every key and value (tensors by dtype, shape and bytes), and ``unseal`` checks it before anything is read.
A state saved before digests existed has none: it is loaded as it is, with a warning.
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Mapping
from typing import Any

import numpy as np

DIGEST = "digest"


class CheckpointError(ValueError):
    """A checkpoint (or a part of one) that is damaged, or not one: the message says which and what to do."""


def digest(value: Any) -> str:
    """A BLAKE2b (128 bits) of ``value``: nested dicts (keys in a fixed order), lists, tuples, strings, bytes,
    numbers, ``None``, numpy arrays and torch tensors (their dtype, shape and bytes)."""
    hasher = hashlib.blake2b(digest_size=16)
    _feed(hasher, value)
    return hasher.hexdigest()


def _feed(hasher: Any, value: Any) -> None:
    if isinstance(value, Mapping):
        hasher.update(b"d%d" % len(value))
        for key in sorted(value, key=lambda k: (type(k).__name__, repr(k))):
            _feed(hasher, key)
            _feed(hasher, value[key])
    elif isinstance(value, (list, tuple)):
        hasher.update(b"l%d" % len(value))
        for item in value:
            _feed(hasher, item)
    elif isinstance(value, str):
        _bytes(hasher, b"s", value.encode("utf-8", "surrogatepass"))
    elif isinstance(value, (bytes, bytearray)):
        _bytes(hasher, b"b", bytes(value))
    elif value is None or isinstance(value, (bool, int, float, np.number)):
        _bytes(hasher, b"n", repr(value).encode() + type(value).__name__.encode())
    elif isinstance(value, np.ndarray):
        _array(hasher, value)
    elif type(value).__module__.startswith("torch"):
        tensor = value.detach().cpu().contiguous()
        if tensor.dtype.is_floating_point and tensor.element_size() == 2:  # bfloat16 and half: their raw bits
            tensor = tensor.view(dtype=_int16())
        hasher.update(str(value.dtype).encode())
        _array(hasher, tensor.numpy())
    else:
        raise TypeError(f"cannot digest a {type(value).__name__} in a state dict")


def _bytes(hasher: Any, tag: bytes, data: bytes) -> None:
    hasher.update(tag + b"%d:" % len(data))
    hasher.update(data)


def _array(hasher: Any, array: np.ndarray) -> None:
    hasher.update(f"a{array.dtype.str}{array.shape}".encode())
    hasher.update(np.ascontiguousarray(array).tobytes())


def _int16() -> Any:
    import torch

    return torch.int16


def seal(state: dict[str, Any]) -> dict[str, Any]:
    """``state`` with its ``"digest"``."""
    return {**state, DIGEST: digest(state)}


def unseal(state: Any, what: str, required: tuple[str, ...]) -> dict[str, Any]:
    """``state`` without its digest, after checking it; ``what`` names the state in messages, ``required`` the keys
    a state without a digest (saved by an earlier version) must have. A ``CheckpointError`` when anything is off."""
    if not isinstance(state, Mapping):
        raise CheckpointError(f"{what} is damaged or not one: a mapping was expected, got {type(state).__name__}")
    state = dict(state)
    saved = state.pop(DIGEST, None)
    if saved is None:
        missing = [key for key in required if key not in state]
        if missing:
            raise CheckpointError(
                f"{what} is damaged or not one: it has no digest and lacks {missing[0]!r} (keys: {sorted(state)}); "
                "restore the checkpoint from another copy"
            )
        warnings.warn(f"{what} was saved without a digest (by an earlier version): it is not checked", stacklevel=3)
        return state
    try:
        found = digest(state)
    except TypeError as error:
        raise CheckpointError(f"{what} is damaged: {error}") from None
    if found != saved:
        raise CheckpointError(
            f"{what} is damaged: its digest does not match what it holds (a byte changed since it was saved); "
            "restore the checkpoint from another copy"
        )
    return state
