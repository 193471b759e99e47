"""One run of the quality suite: a tiny GPT trained on a scenario's mixture with one method, evaluated as it goes.

A run is a pure function of ``(scenario, method, seed, steps)`` and the data: the model's
initialisation, the sample order (onlinemix's plan) and the evaluation windows all follow from
them. Its result is a JSON history: held-out losses at each evaluation, the weights, the time taken.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))
from tiny_gpt import TinyGPT

from onlinemix import (
    ByteTokenizer,
    Controller,
    MiniBatchCoreset,
    MixedDataset,
    MixtureConfig,
    OnlineMixer,
    OnlineMixing,
    gradient_alignment,
    output_gradients,
    per_sample_loss,
)

# The model: a run's "size" names one. CPU: small (0.14M parameters) and medium (1.26M, 9x: a run of 600 steps in
# about five minutes on one core); on a GPU: large (25M).
SIZES = {
    "small": {"width": 64, "layers": 2, "heads": 4},
    "medium": {"width": 128, "layers": 6, "heads": 4},
    "large": {"width": 512, "layers": 8, "heads": 8},
}
LEARNING_RATE, WARMUP_STEPS = 3e-3, 50
EVAL_WINDOWS = 512  # held-out windows per set, evenly spread over it
EVAL_POINTS = 6  # evaluations per run, evenly spaced (the last at the final step)
PROBE_WINDOWS, PROBE_EVERY = 32, 10  # the memorisation guard: fixed held-out windows per domain, every so many steps
# Compute, in window passes: a forward pass of one window is 1, a backward 2 (the usual 1:2 of FLOPs).
FORWARD, FORWARD_BACKWARD = 1, 3


@dataclass
class Method:
    """How a run's weights are decided: a controller built from the dataset, and what it needs each step.

    ``controller(dataset, device)`` returns the controller (on ``device``); ``reference`` names the model
    whose per-sample loss DoReMi subtracts; ``align`` is the token-bin file DGA aligns with (whenever the
    controller's ``alignment_due()``: every 10 steps while the weights move); ``config`` replaces the scenario's
    mixture file (importance resampling writes its own);
    ``guarded``: the memorisation guard's held-out probes are fed to the controller (online methods);
    ``reward``: models whose per-sample losses make each sample's reward, passed as ``observe(..., reward=...)``:
    ``(general, target)``: how much better the second predicts it (``loss_general - loss_target``, CoLoR-Filter's
    score); ``(target,)``: how well it does (``-loss_target``); ``pool``: above 1, each step trains on a
    mini-batch coreset (``MiniBatchCoreset``, loss weighted by coverage) of a pool ``pool`` times the batch.
    """

    name: str
    controller: Callable[[MixedDataset, str], Controller]
    reference: str | None = None
    align: str | None = None
    guarded: bool = False
    config: Path | None = None
    reward: tuple[str, ...] | None = None
    pool: int = 1


class HeldOut:
    """Fixed evaluation windows of held-out token-bin files: ``count`` per set (default ``EVAL_WINDOWS``), evenly
    spread over it."""

    def __init__(self, sets: dict[str, Path], seq_len: int, count: int | None = None):
        count = count or EVAL_WINDOWS
        self.windows = {}
        for name, path in sets.items():
            tokens = np.fromfile(path, dtype=np.uint16).astype(np.int64)
            starts = np.linspace(0, len(tokens) - seq_len - 1, count).astype(np.int64)
            self.windows[name] = torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]))

    @property
    def size(self) -> int:
        """Windows in all sets (one evaluation's forward passes)."""
        return sum(len(windows) for windows in self.windows.values())

    @torch.no_grad()
    def evaluate(self, model: TinyGPT) -> dict[str, float]:
        model.eval()
        losses = {}
        for name, windows in self.windows.items():
            total = 0.0
            for chunk in windows.to(model.device).split(256):
                total += per_sample_loss(model(chunk[:, :-1]), chunk[:, 1:]).sum().item()
            losses[name] = total / len(windows)
        model.train()
        return losses


def windows(path: Path, seq_len: int, count: int, generator: np.random.Generator) -> torch.Tensor:
    """``count`` random windows of a token-bin file (for DGA's per-domain and target gradients)."""
    tokens = np.memmap(path, dtype=np.uint16, mode="r")
    starts = generator.integers(0, len(tokens) - seq_len - 1, count)
    return torch.from_numpy(np.stack([tokens[s : s + seq_len + 1] for s in starts]).astype(np.int64))


def window_loss(model: TinyGPT, batch: torch.Tensor) -> torch.Tensor:
    batch = batch.to(model.device)
    return per_sample_loss(model(batch[:, :-1]), batch[:, 1:]).mean()


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth."""
    if step < WARMUP_STEPS:
        return LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return LEARNING_RATE * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def parameters(size: str) -> int:
    """The model's parameter count at ``size`` (the byte vocabulary, the suite's sequence length)."""
    from data import SEQ_LEN

    return sum(p.numel() for p in new_model(SEQ_LEN, 0, size).parameters())


def new_model(seq_len: int, seed: int, size: str = "small", device: str = "cpu") -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(ByteTokenizer.vocab_size, seq_len, **SIZES[size]).to(device)


def train(
    config: Path,
    method: Method,
    seed: int,
    steps: int,
    heldout: dict[str, Path],
    references: dict[str, Path],
    probes: dict[str, Path],
    save_model: Path | None = None,
    size: str = "small",
    device: str = "cpu",
    log: Path | None = None,
) -> dict:
    """Train one run; returns its history. ``probes``: each training domain's own held-out set, scored every
    ``PROBE_EVERY`` steps for an online method's memorisation guard (``OnlineMixing.observe_heldout``); ``log``:
    where to write the run's schedule log (a proxy run's, for the proxy workflows).

    The history's ``compute`` is the run's training compute in window passes (see ``FORWARD``), counting
    what the method adds (reference forwards, alignment gradients, probes) but not the evaluations."""
    if device == "cpu":
        torch.set_num_threads(1)  # the suite runs one process per core
    mixture = MixtureConfig.load(method.config or config)
    mixture.seed = seed  # the sample order varies with the seed, like the initialisation
    mixture.global_batch_size *= method.pool  # with a coreset, the loader's batches are the pools
    dataset = MixedDataset.from_config(mixture, num_batches=steps)
    coreset = MiniBatchCoreset.for_pools(dataset, method.pool) if method.pool > 1 else None
    if log is not None and log.exists():
        log.unlink()  # an interrupted run's: this one starts afresh
    mixer = OnlineMixer(method.controller(dataset, device), dataset, lag=1, log=log)
    mixing = OnlineMixing(mixer, coreset=coreset, num_workers=0 if device == "cpu" else 2)
    model = new_model(mixture.seq_len, seed, size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.1)

    def frozen(name: str) -> TinyGPT:
        model = new_model(mixture.seq_len, seed, size, device)
        model.load_state_dict(torch.load(references[name], map_location=device))
        return model.eval()

    reference = None if method.reference is None else frozen(method.reference)
    scorers = None if method.reward is None else [frozen(name) for name in method.reward]
    generator = np.random.default_rng(seed)
    evaluation = HeldOut(heldout, mixture.seq_len)
    probing = method.guarded and set(probes) >= set(dataset.names)
    probe = HeldOut({name: probes[name] for name in dataset.names}, mixture.seq_len, PROBE_WINDOWS) if probing else None
    compute = 0
    checkpoints = {round(steps * (i + 1) / EVAL_POINTS) for i in range(EVAL_POINTS)}
    history = {"evals": [{"step": 0, "loss": evaluation.evaluate(model)}], "weights": [], "probes": []}
    started = time.perf_counter()
    for step, batch in enumerate(mixing):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        if coreset is not None:  # score the pool without gradients; train on its coreset
            with torch.no_grad():
                proxies = output_gradients(model(batch["input_ids"].to(device)), batch["labels"].to(device))
            compute += FORWARD * len(proxies)
            batch = mixing.select(batch, proxies)
        ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
        losses = per_sample_loss(model(ids), labels)
        optimizer.zero_grad(set_to_none=True)
        (losses * batch["coreset_weight"].to(device) if coreset is not None else losses).mean().backward()
        optimizer.step()
        compute += FORWARD_BACKWARD * len(ids)
        signals = {}
        if reference is not None:
            with torch.no_grad():
                signals["reference"] = per_sample_loss(reference(ids), labels)
            compute += FORWARD * len(ids)
        if scorers is not None:
            with torch.no_grad():
                scores = [per_sample_loss(scorer(ids), labels) for scorer in scorers]
            signals["reward"] = scores[0] - scores[1] if len(scores) == 2 else -scores[0]
            compute += len(scorers) * FORWARD * len(ids)
        mixing.observe(losses.detach(), batch, **signals)
        if method.align is not None and mixer.controller.alignment_due():  # every 10 steps, less once settled
            per_domain = [windows(source.path, mixture.seq_len, 32, generator) for source in dataset.sources]
            target = windows(Path(method.align), mixture.seq_len, 64, generator)
            alignment = gradient_alignment(model, window_loss, per_domain, target, cosine=True)
            mixer.controller.observe_alignment(alignment)
            compute += FORWARD_BACKWARD * (sum(map(len, per_domain)) + len(target))
        if probe is not None and (step + 1) % PROBE_EVERY == 0:
            scored = list(probe.evaluate(model).values())  # in the dataset's domain order
            mixing.observe_heldout(torch.tensor(scored))
            history["probes"].append([step + 1, scored])
            compute += FORWARD * probe.size
        weights = mixing.step()
        if (step + 1) % max(1, steps // 50) == 0:
            history["weights"].append([step + 1, weights.tolist()])
        if step + 1 in checkpoints:
            history["evals"].append({"step": step + 1, "loss": evaluation.evaluate(model)})
    history["seconds"] = time.perf_counter() - started
    history["names"] = dataset.names
    history["compute"] = compute
    mixing.close()
    if save_model is not None:
        save_model.parent.mkdir(parents=True, exist_ok=True)
        torch.save(model.state_dict(), save_model)
    return history


def train_reference(
    specific: Path,
    align: Path,
    seq_len: int,
    seed: int,
    steps: int,
    out: Path,
    size: str = "small",
    device: str = "cpu",
) -> dict:
    """A model trained on the specific set alone, kept at its best loss on the alignment set (a target reference)."""
    if device == "cpu":
        torch.set_num_threads(1)
    model = new_model(seq_len, seed, size, device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LEARNING_RATE, weight_decay=0.1)
    generator = np.random.default_rng(seed)
    validation = HeldOut({"align": align}, seq_len)
    best, history = math.inf, []
    compute = steps * 32 * FORWARD_BACKWARD + steps // 50 * validation.size * FORWARD
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss = window_loss(model, windows(specific, seq_len, 32, generator))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % 50 == 0:
            current = validation.evaluate(model)["align"]
            history.append([step + 1, current])
            if current < best:
                best = current
                out.parent.mkdir(parents=True, exist_ok=True)
                torch.save(model.state_dict(), out)
    return {"validation": history, "best": best, "compute": compute}


def save(history: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(history))
    temporary.replace(path)
