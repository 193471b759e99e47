"""DGA with a small specific set that is also a training domain: the failure mode, and what prevents it.

A tiny GPT learns a rule (``next = 5 * previous + 3 mod 64``, 30% noise) from a tiny "specific" set (8
sequences), a large noisier set of the same rule, and a large set of another rule. Aligning DGA with the
specific set's own samples makes it pour the weight onto them and the model memorises them; the mixer
says so, and the controller's repeat budget holds the set at its starting weight once it has been drawn 16
times over. Aligning with held-out sequences of the rule and capping the specific set's repeats keeps it useful.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import write_tokens

from onlinemix import DGAController, MixedDataset, MixedLoader, OnlineMixer, gradient_alignment, per_sample_loss

sys.path.insert(0, str(Path(__file__).parents[1] / "examples"))
from tiny_gpt import TinyGPT

VOCAB, SEQ_LEN, STEPS = 64, 16, 240
UNBOUNDED = {"repeat_budget": None, "trust_region": None}  # neither guard: the failure mode as it was


def rule(n: int, multiply: int, add: int, noise: float, seed: int) -> np.ndarray:
    """``n`` sequences of SEQ_LEN + 1 tokens following ``next = multiply * previous + add`` (mod VOCAB), noisy."""
    generator = np.random.default_rng(seed)
    tokens = np.empty((n, SEQ_LEN + 1), np.int64)
    tokens[:, 0] = generator.integers(0, VOCAB, n)
    for t in range(1, SEQ_LEN + 1):
        follow = (tokens[:, t - 1] * multiply + add) % VOCAB
        tokens[:, t] = np.where(generator.random(n) < noise, generator.integers(0, VOCAB, n), follow)
    return tokens


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("dga")
    sets = {"generic": rule(2000, 1, 1, 0.3, 1), "related": rule(2000, 5, 3, 0.6, 2), "specific": rule(8, 5, 3, 0.3, 3)}
    domains = []
    for name, tokens in sets.items():
        # one window per sequence: stride seq_len + 1 leaves no window across two of them
        write_tokens(root / f"{name}.bin", tokens.ravel())
        domains.append({"name": name, "source": "tokenbin", "path": f"{name}.bin", "stride": SEQ_LEN + 1})
    for name, capped in (("free.yaml", None), ("capped.yaml", 4)):
        entries = [dict(d) for d in domains]
        if capped:
            entries[2]["max_epochs"] = capped
        config = {"seed": 0, "global_batch_size": 16, "seq_len": SEQ_LEN, "domains": entries}
        (root / name).write_text(yaml.safe_dump(config))
    return root, sets, rule(64, 5, 3, 0.3, 4), torch.from_numpy(rule(512, 5, 3, 0.3, 5))


def window_loss(model, windows: torch.Tensor) -> torch.Tensor:
    return per_sample_loss(model(windows[:, :-1]), windows[:, 1:]).mean()


def train(config: Path, sets: dict, align: np.ndarray, target: torch.Tensor, **options):
    """DGA every 5 steps, aligned with ``align``; returns the final weights, the target loss curve, the number of
    specific samples drawn, the warnings. ``options`` go to the controller."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    dataset = MixedDataset.from_config(config, num_batches=STEPS)
    controller = DGAController(torch.full((3,), 1 / 3), eta=10.0, ema=0.5, every=5, min_prob=0.01, **options)
    mixer = OnlineMixer(controller, dataset, lag=1)
    model = TinyGPT(VOCAB, SEQ_LEN, width=32, layers=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = np.random.default_rng(1)
    curve, drawn = [], 0
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, batch in enumerate(MixedLoader(dataset)):
            losses = per_sample_loss(model(batch["input_ids"]), batch["labels"])
            optimizer.zero_grad()
            losses.mean().backward()
            optimizer.step()
            drawn += int((batch["domain"] == 2).sum())
            mixer.observe(losses.detach(), batch["domain"])
            if (step + 1) % 5 == 0:
                per_domain = [torch.from_numpy(s[generator.integers(0, len(s), 16)]) for s in sets.values()]
                target_batch = torch.from_numpy(align)
                controller.observe_alignment(gradient_alignment(model, window_loss, per_domain, target_batch, True))
            mixer.step()
            if (step + 1) % 40 == 0:
                with torch.no_grad():
                    curve.append(window_loss(model, target).item())
    return controller.weights, curve, drawn, [str(w.message) for w in caught]


def test_dga_aligned_with_its_own_training_domain_pours_the_weight_onto_it_and_the_mixer_says_so(data):
    root, sets, _, target = data
    weights, _, drawn, messages = train(root / "free.yaml", sets, sets["specific"], target, **UNBOUNDED)
    assert weights[2] > 0.9  # the failure mode: alignment of a set with itself is its gradient's squared norm
    assert drawn > 100 * 8  # the 8 sequences, drawn over a hundred epochs
    assert any("domain 'specific' (8 samples) has been drawn about" in m and "max_epochs" in m for m in messages)


def test_the_repeat_budget_holds_a_chased_small_domain_at_its_starting_weight(data):
    root, sets, _, target = data
    collapsed = train(root / "free.yaml", sets, sets["specific"], target, **UNBOUNDED)
    budget_alone = {"trust_region": None}  # the default budget (16 epochs), without DGA's default trust region
    weights, curve, drawn, messages = train(root / "free.yaml", sets, sets["specific"], target, **budget_alone)
    assert weights[2] == pytest.approx(1 / 3, abs=1e-4)  # held at its start once past 16 epochs
    assert drawn < collapsed[2] / 2
    assert curve[-1] < collapsed[1][-1] - 0.3  # far better on the held-out target than the collapsed run
    assert any("holds it at most at its starting weight from 16 epochs (repeat_budget)" in m for m in messages)


def test_dga_aligned_with_held_out_data_and_a_repeat_cap_keeps_the_specific_set_useful(data):
    root, sets, align, target = data
    free = train(root / "free.yaml", sets, sets["specific"], target, **UNBOUNDED)
    _, curve, drawn, messages = train(root / "capped.yaml", sets, align, target)
    assert drawn == 4 * 8  # max_epochs 4 of 8 sequences, then the domain drops out of the plan
    assert curve[-1] < free[1][-1] - 0.3  # far better on the held-out target than the collapsed run
    assert not any("has been drawn about" in m for m in messages)


def held_out_of(weights: torch.Tensor, loss: torch.Tensor, step: int) -> torch.Tensor:
    """A stand-in for each domain's held-out loss: falls while the domain is drawn at or above its start (1/4),
    rises while it is starved (forgotten); domain 0's rises from step 100 on whatever its weight (memorised)."""
    loss = loss + torch.where(weights >= 0.25, -0.002, 0.003)
    if step > 100:
        loss[0] += 0.006
    return loss


def test_holding_one_domain_does_not_freeze_the_others():
    # DGA favours domain 0 past the trust region; from step 100 its held-out loss rises and the guard holds it; from
    # step 150 the alignments favour domain 1 too. Before, the run froze twice over: DGA's own mixture ran into a
    # corner (the other weights underflowed to 0), and every domain starved before was held as soon as domain 0's
    # excess made it favoured, its held-out loss having risen while it was starved: all four at 1/4 to the end.
    dga = DGAController(torch.full((4,), 0.25), eta=4.0, ema=0.5)
    dga.count_epochs(32, [10_000] * 4, steps=300)
    loss, weights = torch.full((4,), 2.0), []
    for step in range(1, 301):
        dga.observe_alignment(torch.tensor([0.5, 0.3 if step > 150 else -0.2, -0.3, -0.3]))
        loss = held_out_of(dga.weights, loss, step)
        if step % 10 == 0:
            dga.observe_heldout(loss)
        weights.append(dga.step().clone())
    assert dga.memorised().tolist() == [True, False, False, False]  # only the memorised domain is held
    assert weights[149][0] == pytest.approx(0.25) and weights[-1][0] == pytest.approx(0.25)
    assert weights[-1][1] > 0.6 > 0.04 > weights[-1][2]  # the others followed the alignments
    assert not torch.allclose(weights[-1], torch.full((4,), 0.25))
    assert (torch.stack(weights[150:]) - torch.stack(weights[149:-1])).abs().max() > 0.05


def test_a_rise_while_starved_is_forgetting_not_memorising():
    dga = DGAController(torch.full((3,), 1 / 3), eta=4.0, ema=0.0, trust_region=None, heldout_ema=0.0)
    dga.weights = torch.tensor([0.8, 0.1, 0.1])  # domain 1 starved
    dga.observe_heldout(torch.tensor([2.0, 2.0, 2.0]))
    dga.observe_heldout(torch.tensor([2.0, 2.3, 2.0]))  # it is forgotten: its loss rises
    dga.weights = torch.tensor([0.1, 0.8, 0.1])  # now favoured, its loss no higher than when it became so
    dga.observe_heldout(torch.tensor([2.0, 2.3, 2.0]))
    assert dga.memorised().tolist() == [False, False, False]
    dga.observe_heldout(torch.tensor([2.0, 2.35, 2.0]))  # a rise while favoured: memorised
    assert dga.memorised().tolist() == [False, True, False]
