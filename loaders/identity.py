"""What a mixture's samples depend on besides the weights, compared: a resume, a replay or a continued schedule log
names the first field that changed (``MixedDataset.identity()`` records it)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from onlinemix.loaders.plan import UNLIMITED

PER_DOMAIN = {"sizes": "size", "caps": "repeat cap (max_epochs)", "order": "order",
              "sources": "data (content, tokenizer, samples)"}  # fmt: skip
# The fields whose change explains the others (a new seq_len changes every size; a new tokenizer every source's
# data): compared first, so that the message names what the user changed.
CAUSES = ("domains", "seq_len", "tokenizer", "global_batch_size", "seed", "sampling", "caps", "order")


def identity_mismatch(
    saved: Mapping[str, Any], now: Mapping[str, Any], names: Sequence[str], when: str = "when saved"
) -> str | None:
    """The first field of a recorded ``identity()`` that differs from ``now``'s, in words (a per-domain field
    names the domain; the fields that cause others to change come first), or ``None`` when they agree. Fields
    recorded before a key existed are not compared."""
    for key in sorted(saved, key=lambda k: CAUSES.index(k) if k in CAUSES else len(CAUSES)):
        value, current = saved[key], now.get(key)
        if current == value or key not in now:
            continue
        if key in PER_DOMAIN and isinstance(value, list) and len(value) == len(current or []):
            d = next(i for i, (a, b) in enumerate(zip(value, current)) if a != b)
            was, new = (_cap(value[d]), _cap(current[d])) if key == "caps" else (repr(value[d]), repr(current[d]))
            return f"domain {names[d]!r}'s {PER_DOMAIN[key]} was {was} {when}, is now {new}"
        return f"{key} was {value!r} {when}, is now {current!r}"
    return None


def _cap(samples: Any) -> str:
    """A repeat cap in words: a number of samples, or none (``UNLIMITED``)."""
    return "none" if samples == UNLIMITED else f"{samples:,} samples"
