"""A run that pins what the controllers and their limits do: every controller, every limit binding.

``record.py`` ran this on the code before the limits moved out of the base controller and saved what it
drew (``limits.npz``) and a checkpoint taken half-way (``checkpoint-<controller>.pt``); ``test_pinned.py``
runs it again and asks for the same weights and batches, bit for bit, and for the old checkpoint to resume
into the same second half. Nothing here trains a model: the feedback is a fixed function of each batch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import yaml

from onlinemix import (
    ADOController,
    ClusterBanditController,
    DGAController,
    DoReMiController,
    MixedDataset,
    MixedLoader,
    ODMController,
    OnlineMixer,
    ScheduledController,
    StaticController,
    neighbour_similarity,
)

STEPS, HALF = 50, 25
CONTROLLERS = ("static", "scheduled", "odm", "ado", "doremi", "dga", "bandit", "bandit-region")
# Domain 3 is tiny (8 windows): its repeat budget (4 epochs over 50 steps of 16 windows: a weight of 0.04) binds
# under its starting weight, and it is the domain every signal below chases. Held-out losses rise in turn.
INITIAL = [0.4, 0.3, 0.2, 0.1]
# Every limit on and binding: a tight trust region, a minimum ratio, the repeat budget, the held-out guard, a floor.
LIMITS = {"trust_region": 0.01, "min_ratio": 0.9, "repeat_budget": 4.0, "heldout_tolerance": 0.01,
          "heldout_ema": 0.0, "min_prob": 0.02}  # fmt: skip


def write_data(root: Path) -> Path:
    """Four domains (three token-bin files and a JSONL file packed by the byte tokenizer) and their mixture."""
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    for name, tokens, step in (("big", 4000, 1), ("mid", 2000, 7), ("tiny", 8 * 16 + 1, 11)):
        (np.arange(tokens) * step % 251).astype(np.uint16).tofile(data / f"{name}.bin")
    lines = [f'{{"text": "document {i}: {"lorem ipsum " * (i % 5)}"}}\n' for i in range(60)]
    (data / "prose.jsonl").write_text("".join(lines))
    mixture = {
        "seed": 7,
        "global_batch_size": 16,
        "seq_len": 16,
        "domains": [
            {"name": "big", "source": "tokenbin", "path": "data/big.bin", "dtype": "uint16", "weight": INITIAL[0]},
            {"name": "prose", "source": "jsonl", "path": "data/prose.jsonl", "weight": INITIAL[1]},
            {"name": "mid", "source": "tokenbin", "path": "data/mid.bin", "dtype": "uint16", "weight": INITIAL[2]},
            {"name": "tiny", "source": "tokenbin", "path": "data/tiny.bin", "dtype": "uint16", "weight": INITIAL[3]},
        ],
    }
    config = root / "mixture.yaml"
    config.write_text(yaml.safe_dump(mixture, sort_keys=False))
    return config


def controller(name: str):
    """``name``'s controller from ``INITIAL`` with every limit it takes set to bind."""
    initial = torch.tensor(INITIAL)
    if name == "static":
        return StaticController(initial, min_prob=LIMITS["min_prob"])
    if name == "scheduled":
        return ScheduledController([(0, INITIAL), (20, [0.1, 0.2, 0.3, 0.4])], min_prob=LIMITS["min_prob"])
    if name == "odm":
        return ODMController(initial, reward_scale=0.5, warmup=3, **LIMITS)
    if name == "ado":
        return ADOController(initial, warmup=6, **LIMITS)
    if name == "doremi":
        return DoReMiController(initial, eta=0.5, **LIMITS)
    if name == "dga":
        return DGAController(initial, eta=2.0, ema=0.5, every=2, **LIMITS)
    # the bandit moves far: without a trust region (its default) its minimum ratio binds; with a tight one, that
    features = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    region = {"trust_region": 0.004 if name == "bandit-region" else None}
    return ClusterBanditController(initial, neighbour_similarity(features, 2), temperature=0.5, **{**LIMITS, **region})


def feedback(batch: dict, step: int) -> tuple[torch.Tensor, dict]:
    """Per-sample losses (and the controller's extra signals) as a fixed function of the batch: the tiny domain
    loses most, and every loss falls with the step like a power law."""
    domain, index = batch["domain"], batch["index"]
    losses = (1.0 + domain.float() + 0.01 * (index % 5).float()) * (step + 2.0) ** -0.3
    return losses, {"reference": losses * 0.6, "reward": domain.float() - 1.5}


def heldout(step: int) -> torch.Tensor:
    """Each domain's held-out loss: domain 0's rises over steps 10-20 and falls to a new lowest by step 30 (the
    guard holds it while it is favoured, then frees it), domain 2's likewise over steps 20-30, domain 1's rises
    from step 40."""
    losses = torch.tensor([2.0, 2.0, 2.0, 2.0]) - 0.01 * step
    losses[0] += 0.05 * min(max(0, step - 10), 10) - 0.08 * max(0, step - 20)
    losses[2] += 0.05 * min(max(0, step - 20), 10) - 0.08 * max(0, step - 30)
    losses[1] += 0.05 * max(0, step - 40)
    return losses


def run(config: Path, name: str, until: int = STEPS, resume: dict | None = None) -> tuple[list, list, dict | None]:
    """Train ``name`` from step 0 (or from ``resume``, a checkpoint of this run) to step ``until``. Returns the
    weights after each step, the (domain, index) pairs of each batch, and the checkpoint at ``HALF``."""
    dataset = MixedDataset.from_config(config, num_batches=STEPS)
    mixer = OnlineMixer(controller(name), dataset, lag=1)
    loader = MixedLoader(dataset, num_workers=0)
    if resume is not None:
        loader.load_state_dict(resume["loader"])
        mixer.load_state_dict(resume["mixer"])
    weights, batches, checkpoint = [], [], None
    step = mixer.step_count
    for batch in loader:
        if step == until:
            break
        batches.append(torch.stack([batch["domain"], batch["index"]], 1).tolist())
        losses, signals = feedback(batch, step)
        mixer.observe(losses, batch["domain"], **signals)
        if name == "dga":
            mixer.controller.observe_alignment(torch.tensor([0.1, -0.2, 0.4, 0.5]) * (1 + step % 3))
        if step % 5 == 4:
            mixer.observe_heldout(heldout(step))
        weights.append(mixer.step().tolist())
        step += 1
        if step == HALF:
            checkpoint = {"loader": loader.state_dict(), "mixer": mixer.state_dict()}
    mixer.close()
    return weights, batches, checkpoint
