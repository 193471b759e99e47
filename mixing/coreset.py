"""Mini-batch coresets (CoLM-style): train on the part of a larger pool that stands for all of it.

The loader draws a *pool* of ``k x batch`` samples from the mixture; the trainer scores the pool with one
forward pass without gradients, turns each sample into a *gradient proxy* (``output_gradients``: the gradient of
its loss with respect to the logits, averaged over its positions — the last layer's, which is enough), and
``MiniBatchCoreset.select`` keeps ``batch`` of them, whose backward pass is then the only one. What is kept:

- **Each domain's share of the pool, within one sample.** Domain ``d`` with ``c_d`` of the pool's ``N`` samples
  gets ``floor(batch·c_d/N)`` or ``ceil(...)`` of the batch (largest remainders get the ceilings; ties go to the
  lower domain), so a coreset never changes the mixture the controller chose, and a small domain is never
  squeezed out by a large one's gradients.
- **Within a domain, the samples that cover its gradients best**: greedy facility location on the cosine
  similarity of proxies (each pick is the sample that most raises how well every pool sample of its domain is
  matched by some pick). Near-duplicates are picked once; unusual samples are picked because nothing else
  stands for them.
- **How much each pick stands for**: ``coreset_weight``, the number of its domain's pool samples closest to it,
  scaled to mean 1 over the batch. ``(losses * batch["coreset_weight"]).mean()`` then follows the pool's gradient
  (and its domain shares exactly); the plain mean trains on the medoids as equals.

Selection runs where the proxies are (GPU or CPU), with no host synchronisation. Every step's picks are
recorded (their slots in the pool, and a hash of which samples those were): ``state_dict`` carries the record,
so a resumed run continues it, and ``save`` writes it for ``MiniBatchCoreset.replay``, which gives the same
picks again without a model — refusing, at the first step where it differs, a pool that is not the recorded
one (another mixture, seed or schedule).

Trade-off: the pool's forward pass costs about ``k/3`` of a training step's compute (forward only), in
exchange for a backward over ``batch`` samples chosen from ``k x batch`` — the memory of the small batch, the
coverage of the large one. ``k`` of 2-4 is the usual range.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from onlinemix.loaders.state_digest import seal, unseal
from onlinemix.loaders.transforms import IGNORE_INDEX

FORMAT = "onlinemix-coreset-1"
SOFTMAX_CHUNK = 1 << 26  # float32 probabilities output_gradients holds at once (256 MiB)
_HASH_MULTIPLIER = 0x9E3779B97F4A7C15 - (1 << 64)  # the golden-ratio constant, as a signed int64


class CoresetError(ValueError):
    """A pool, proxies or recorded selection that does not fit."""


def output_gradients(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Each sample's gradient proxy: ``softmax(logits) - onehot(labels)`` averaged over its real positions.

    That is the gradient of the sample's mean token loss with respect to the output layer's bias (the logits'
    shared direction): ``(batch, vocab)``, float32, computed without autograd. Any ``(batch, D)`` tensor a
    trainer prefers (last-layer weight gradients, sketched) works as ``proxies`` too.
    """
    if logits.dim() != 3 or labels.shape != logits.shape[:2]:
        raise CoresetError(f"logits must be (batch, positions, vocab) and labels (batch, positions); got "
                           f"{tuple(logits.shape)} and {tuple(labels.shape)}")  # fmt: skip
    size, positions, vocabulary = logits.shape
    with torch.no_grad():
        real = labels != ignore_index
        sums = torch.empty(size, vocabulary, dtype=torch.float32, device=logits.device)
        # The softmax in float32 a few samples at a time: a pool's (N, T, V) probabilities at once could be GBs.
        chunk = max(1, SOFTMAX_CHUNK // max(1, positions * vocabulary))
        for start in range(0, size, chunk):
            stop = min(size, start + chunk)
            probabilities = torch.softmax(logits[start:stop].float(), dim=-1)
            sums[start:stop] = (probabilities * real[start:stop].unsqueeze(-1)).sum(dim=1)
        rows = torch.arange(size, device=logits.device).unsqueeze(1).expand(size, positions)
        sums.index_put_((rows, labels.clamp(min=0)), -real.to(torch.float32), accumulate=True)
        return sums / real.sum(dim=1, keepdim=True).clamp(min=1)


def domain_quotas(domains: torch.Tensor, num_domains: int, batch_size: int) -> torch.Tensor:
    """How many of ``batch_size`` picks each domain gets: its share of the pool, rounded by largest remainder.

    Domain ``d`` with ``c_d`` of the pool's ``N`` samples gets ``floor(batch_size·c_d/N)``, plus one for the
    ``batch_size - sum(floors)`` domains with the largest remainders (ties: the lower domain id). Exact
    integer arithmetic, on ``domains``' device.
    """
    pool = domains.numel()
    counts = _count(domains, num_domains)
    scaled = counts * batch_size
    floors, remainders = scaled // pool, scaled % pool
    left = batch_size - floors.sum()
    # Rank by remainder, then by domain id: the key is unique per domain, so the order is deterministic.
    ids = torch.arange(num_domains, device=domains.device)
    key = remainders * num_domains + (num_domains - 1 - ids)
    rank = torch.empty_like(ids)
    rank[torch.argsort(key, descending=True)] = ids
    return floors + (rank < left).to(floors.dtype)


def _count(values: torch.Tensor, size: int) -> torch.Tensor:
    """How often each of ``0 .. size - 1`` occurs in ``values`` (``bincount`` with a fixed length: ``bincount``
    itself reads the largest value back to the host to size its output, a synchronisation on a GPU)."""
    return torch.zeros(size, dtype=torch.int64, device=values.device).index_add_(0, values, torch.ones_like(values))


def _selection_hash(domains: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """One int64 naming which samples were picked, in order (wrapping arithmetic, on their device)."""
    position = torch.arange(1, len(indices) + 1, device=indices.device, dtype=torch.int64)
    return (((indices.to(torch.int64) * 1_000_003 + domains.to(torch.int64)) * position) * _HASH_MULTIPLIER).sum()


class MiniBatchCoreset:
    """Pick ``batch_size`` samples of each pool the loader yields (see the module docstring).

    Args:
        batch_size: samples kept per pool; the mixture's batch size is the pool's (``k x batch_size``).
        num_domains: the mixture's domains (``len(mixing.names)``).
        pool_size: samples per pool, where known (``for_pools`` knows it): recorded, and a record or checkpoint
            of pools of another size is refused naming it.
    """

    def __init__(self, batch_size: int, num_domains: int, pool_size: int | None = None):
        if not isinstance(batch_size, int) or batch_size < 1:
            raise CoresetError(f"coreset batch_size must be an integer >= 1, got {batch_size!r}")
        if num_domains < 1:
            raise CoresetError(f"num_domains must be >= 1, got {num_domains}")
        self.batch_size = batch_size
        self.num_domains = num_domains
        self.pool_size = pool_size
        self._slots: list[torch.Tensor] = []  # per step: the picked slots of the pool, int32
        self._counts: list[torch.Tensor] = []  # per step: how many pool samples each pick stands for
        self._hashes: list[torch.Tensor] = []  # per step: _selection_hash of the picked samples
        self._replay: dict[str, np.ndarray] | None = None

    @classmethod
    def for_pools(cls, dataset: Any, pool: int) -> MiniBatchCoreset:
        """The coreset of a dataset whose batches are pools of ``pool`` training batches: it keeps this rank's
        share of one (``dataset.local_batch_size // pool``)."""
        if dataset.local_batch_size % pool:
            raise CoresetError(f"a batch of {dataset.local_batch_size} samples is not {pool} pools' worth")
        return cls(dataset.local_batch_size // pool, len(dataset.names), dataset.local_batch_size)

    # -- selection ---------------------------------------------------------------------------------------

    @property
    def step(self) -> int:
        """Pools selected from so far (the next selection's step)."""
        return len(self._slots)

    def __call__(self, pool: Mapping[str, torch.Tensor], proxies: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """The coreset of ``pool`` as a batch: every field at the picked slots, plus ``coreset_weight``."""
        slots, weights = self.select(pool, proxies)
        batch = take(pool, slots)
        batch["coreset_weight"] = weights
        return batch

    def select(
        self, pool: Mapping[str, torch.Tensor], proxies: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The picked slots of ``pool`` (ascending: the pool's order is kept) and each pick's weight.

        ``pool`` needs ``domain`` and ``index`` (the loader's fields); ``proxies`` is ``(N, D)`` with a row per
        pool sample (``output_gradients``), ``None`` when replaying. Runs on ``proxies``' device.
        """
        domains, indices = pool["domain"], pool["index"]
        size = len(domains)
        if size < self.batch_size:
            raise CoresetError(
                f"a pool of {size} samples cannot give a coreset of {self.batch_size}: the mixture's batch size is "
                f"the pool's (k x {self.batch_size})"
            )
        if self._replay is not None:
            return self._replayed(domains, indices)
        if proxies is None:
            raise CoresetError("select needs the pool's gradient proxies (output_gradients) unless it replays")
        if proxies.dim() != 2 or len(proxies) != size:
            raise CoresetError(f"proxies must be (pool size {size}, D), got {tuple(proxies.shape)}")
        device = proxies.device
        domains = domains.to(device, non_blocking=True)
        slots, counts = self._facility_location(domains, proxies)
        indices = indices.to(device, non_blocking=True)
        self._record(slots, counts, _selection_hash(domains[slots], indices[slots]))
        return slots, self._weights(counts, size)

    def _facility_location(self, domains: torch.Tensor, proxies: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Greedy facility location per domain under ``domain_quotas``, all domains in one loop: the picked
        slots and, for each, how many pool samples of its domain are closest to it."""
        size, device = len(domains), proxies.device
        unit = F.normalize(proxies.float(), dim=1)
        same = domains.unsqueeze(0) == domains.unsqueeze(1)
        similarity = (unit @ unit.T + 1.0) * same  # in [0, 2]; 0 across domains (a pick covers its own domain)
        quota = domain_quotas(domains, self.num_domains, self.batch_size)
        taken = torch.zeros(self.num_domains, dtype=quota.dtype, device=device)
        covered = torch.zeros(size, device=device)  # how well each sample is matched by the picks so far
        picked = torch.zeros(size, dtype=torch.bool, device=device)
        one = torch.ones(1, dtype=quota.dtype, device=device)
        for _ in range(self.batch_size):
            gain = (similarity - covered.unsqueeze(1)).clamp(min=0).sum(dim=0)
            open_ = ~picked & (taken[domains] < quota[domains])
            choice = torch.where(open_, gain, torch.full_like(gain, -1.0)).argmax().view(1)  # stays a tensor
            picked.index_fill_(0, choice, True)
            taken.index_add_(0, domains[choice], one)
            covered = torch.maximum(covered, similarity.index_select(1, choice).squeeze(1))
        # The picks in ascending slot order (a stable sort, not nonzero(): that waits for the device).
        slots = torch.sort((~picked).to(torch.uint8), stable=True).indices[: self.batch_size]
        # Each pool sample stands behind its most similar pick of its own domain: the picks' weights.
        nearest = similarity.index_select(1, slots).argmax(dim=1)
        return slots, _count(nearest, self.batch_size)

    def _weights(self, counts: torch.Tensor, pool_size: int) -> torch.Tensor:
        return counts.to(torch.float32) * (self.batch_size / pool_size)

    def _record(self, slots: torch.Tensor, counts: torch.Tensor, picked: torch.Tensor) -> None:
        """Keep one step's picks: slots, coverage counts and ``picked``, the ``_selection_hash`` of the samples."""
        self._slots.append(slots.to(torch.int32))
        self._counts.append(counts.to(torch.int32))
        self._hashes.append(picked)

    def _replayed(self, domains: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._replay is not None
        step, recorded = self.step, self._replay
        if step >= len(recorded["slots"]):
            raise CoresetError(
                f"the recorded selection holds {len(recorded['slots'])} steps; step {step} is past its end"
            )
        pool = recorded.get("pool_size")
        largest = int(recorded["slots"][step].max(initial=-1))
        if (pool is not None and int(pool) != len(domains)) or largest >= len(domains):
            recorded_on = f"pools of {int(pool)} samples" if pool is not None else f"slot {largest}"
            raise CoresetError(
                f"the selection was recorded on {recorded_on}; this mixture's pools hold {len(domains)} (its "
                "mixing.coreset.pool or global_batch_size differ): replay on the mixture it was recorded on"
            )
        slots = torch.from_numpy(recorded["slots"][step].astype(np.int64)).to(domains.device)
        counts = torch.from_numpy(recorded["counts"][step].astype(np.int64)).to(domains.device)
        picked = _selection_hash(domains[slots], indices[slots])
        if int(picked) != int(recorded["hashes"][step]):
            raise CoresetError(
                f"step {step}: the pool is not the one the selection was recorded on (its samples at the recorded "
                "slots differ): replay on the same mixture, seed and weight schedule"
            )
        self._record(slots, counts, picked)
        return slots, self._weights(counts, len(domains))

    # -- record, checkpoint, replay ------------------------------------------------------------------------

    def record(self) -> dict[str, np.ndarray]:
        """Every step's picks so far: ``slots`` and ``counts`` ``(steps, batch)`` int32 (each pick's slot in the
        pool and how many pool samples it stands for), ``hashes`` ``(steps,)`` int64 (which samples they were).
        One host transfer: call it at checkpoints, not every step."""
        if not self._slots:
            empty = np.zeros((0, self.batch_size), np.int32)
            return {"slots": empty, "counts": empty.copy(), "hashes": np.zeros(0, np.int64)}
        return {
            "slots": torch.stack(self._slots).cpu().numpy(),
            "counts": torch.stack(self._counts).cpu().numpy(),
            "hashes": torch.stack(self._hashes).cpu().numpy(),
        }

    def state_dict(self) -> dict[str, Any]:
        """The settings and the record of every pick (12 bytes a pick and 8 a step), for exact resumption."""
        return seal({"format": FORMAT, **self._settings(), **self.record()})

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue the record a checkpoint carries: the next pick is that run's next step."""
        state = unseal(state, "the coreset's checkpoint", ("format", "slots", "counts", "hashes"))
        self._check_fits(state, "the checkpoint")
        self._slots = [torch.from_numpy(np.array(row, dtype=np.int32)) for row in state["slots"]]
        self._counts = [torch.from_numpy(np.array(row, dtype=np.int32)) for row in state["counts"]]
        self._hashes = [torch.tensor(int(value)) for value in state["hashes"]]

    def save(self, path: str | Path) -> Path:
        """Write the record to ``path`` (``.npz``) for ``MiniBatchCoreset.replay``."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as file:
            np.savez(file, format=np.array(FORMAT), **{k: np.array(v) for k, v in self._settings().items()},
                     **self.record())  # fmt: skip
        return path

    @classmethod
    def replay(cls, path: str | Path, num_domains: int) -> MiniBatchCoreset:
        """A coreset that gives the picks recorded in ``path`` (``save``) again, step by step, without proxies;
        a pool whose samples at the recorded slots are not the recorded ones is an error."""
        try:
            with np.load(path, allow_pickle=False) as stored:
                recorded = {key: stored[key] for key in stored.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as error:
            raise CoresetError(f"cannot read the coreset record {path}: it is damaged or not one ({error})") from None
        missing = [key for key in ("slots", "counts", "hashes") if key not in recorded]
        if missing:
            raise CoresetError(f"the coreset record {path} is damaged: it lacks {missing[0]!r}")
        header = {key: value.item() for key, value in recorded.items() if value.ndim == 0}
        if header.get("format") != FORMAT or "batch_size" not in header:
            raise CoresetError(f"{path} is not a coreset record of this version (format {header.get('format')!r})")
        pool = header.get("pool_size")
        coreset = cls(int(header["batch_size"]), num_domains, None if pool is None else int(pool))
        coreset._check_fits(header, str(path))
        coreset._replay = recorded
        return coreset

    def _settings(self) -> dict[str, int]:
        settings = {"batch_size": self.batch_size, "num_domains": self.num_domains}
        return settings if self.pool_size is None else {"pool_size": self.pool_size, **settings}

    def _check_fits(self, state: Mapping[str, Any], what: str) -> None:
        if state.get("format") != FORMAT:
            raise CoresetError(f"{what} holds no coreset record of this version (format {state.get('format')!r})")
        for key, ours in self._settings().items():
            if key not in state:  # a record from before the pool size was recorded
                continue
            if int(state[key]) != ours:
                if key == "pool_size":
                    raise CoresetError(
                        f"{what} was recorded on pools of {int(state[key])} samples; this mixing's hold {ours} "
                        f"(mixing.coreset.pool differs: pools of {int(state[key]) // self.batch_size} batches then, "
                        f"{ours // self.batch_size} now)"
                    )
                raise CoresetError(f"{what} was recorded with {key} {int(state[key])}; this coreset has {ours}")


def take(pool: Mapping[str, torch.Tensor], slots: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every field of ``pool`` at ``slots`` (moved to each field's device, which syncs only for a host field)."""
    return {name: values.index_select(0, slots.to(values.device)) for name, values in pool.items()}
