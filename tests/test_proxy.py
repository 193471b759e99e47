"""A short run's schedule on a longer run keeps the longer run's repeat budget; a run that will draw a domain far
past its budget is told so before its first batch."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
import yaml
from conftest import make_example, write_tokens

from onlinemix import MixedDataset, MixedLoader, OnlineMixer, ScheduledController, StaticController
from onlinemix.cli import main
from onlinemix.mixing.schedule_log import ScheduleWriter, read_schedule

SIZES = [1000, 1000, 10]  # samples: domain 2 is small
PER_STEP, RECORDED = 10, 100  # samples a step, and the proxy's steps
# The proxy's budget (16 epochs over 100 steps of 10 samples) capped the small domain at 16 * 10 / 1000 = 0.16.
PROXY = [0.42, 0.42, 0.16]


def proxy_log(path, steps: int = RECORDED, weights=PROXY):
    """A schedule log of a proxy run that held ``weights`` for ``steps`` steps, on a mixture of ``SIZES``."""
    header = {"domains": ["a", "b", "small"], "seed": 0, "lag": 1, "accumulation": 1, "global_batch_size": PER_STEP,
              "controller": "dga", "mixture": {"sizes": SIZES}}  # fmt: skip
    writer = ScheduleWriter(path, header)
    writer.append(0, np.full(3, 1 / 3))
    for step in range(1, steps + 1):
        writer.append(step, np.asarray(weights, dtype=np.float64))
    writer.close()
    return path


def test_a_schedule_stretched_four_times_keeps_the_new_runs_repeat_budget_hand_computed(tmp_path, caplog):
    log = proxy_log(tmp_path / "proxy.oms")
    stretched = ScheduledController.from_log(log, steps=4 * RECORDED)
    with caplog.at_level(logging.WARNING, logger="onlinemix"):
        stretched.count_epochs(PER_STEP, SIZES, steps=4 * RECORDED)
    # 16 epochs over 400 steps of 10 samples allow the small domain 16 * 10 / 4000 = 0.04; the 0.12 above it goes
    # to the others in proportion (0.42 : 0.42): 0.48 each
    for _ in range(10):
        stretched.step()
    torch.testing.assert_close(stretched.weights, torch.tensor([0.48, 0.48, 0.04]))
    # raw, the stretched shares would draw it 0.16 * 4000 / 10 = 64 epochs; capped, 16 (its budget), the others
    # 0.48 * 4000 / 1000 = 1.92 (steps 1-4 of the stretch ramp up from the first waypoint's uniform weights)
    projected = stretched.projected_epochs()
    assert projected[2] <= 16.0 + 1e-3 and projected[2] > 15.9
    assert projected[:2] == pytest.approx([1.92, 1.92], abs=0.01)
    (line,) = [r.getMessage() for r in caplog.records if "stretched" in r.getMessage()]
    assert line.startswith("a schedule recorded over 100 steps, stretched to 400: this run's repeat budget (16 epochs)")
    assert "'small' 64.3 -> 16.0 epochs" in line  # the raw figure ramps up from uniform over the first 4 steps


def test_a_replay_at_the_recorded_length_is_left_as_it_is(tmp_path):
    log = proxy_log(tmp_path / "proxy.oms")
    for steps in (None, RECORDED):  # no stretch: the recorded run's own weights
        replayed = ScheduledController.from_log(log, steps=steps)
        raw = ScheduledController.from_log(log, steps=steps, repeat_budget=None)
        replayed.count_epochs(PER_STEP, SIZES, steps=RECORDED)
        raw.count_epochs(PER_STEP, SIZES, steps=RECORDED)
        for _ in range(RECORDED):
            assert torch.equal(replayed.step(), raw.step())
        assert torch.equal(replayed.weights, torch.tensor(PROXY, dtype=torch.float64).float())


def test_the_budget_is_spread_evenly_where_no_mixture_could_keep_it(tmp_path):
    # every domain over its budget (a tiny corpus, a long run): the caps grow in proportion to the sizes, so that each
    # domain is drawn the same number of epochs
    log = proxy_log(tmp_path / "proxy.oms")
    stretched = ScheduledController.from_log(log, steps=100_000)
    stretched.count_epochs(PER_STEP, SIZES, steps=100_000)
    for _ in range(3):
        stretched.step()
    torch.testing.assert_close(stretched.weights, torch.tensor(SIZES, dtype=torch.float32) / sum(SIZES))


def test_a_stretched_schedules_own_limits_and_a_limit_list_are_told_apart(tmp_path):
    log = proxy_log(tmp_path / "proxy.oms")
    floored = ScheduledController.from_log(log, steps=4 * RECORDED, min_prob=0.01)
    assert [type(limit).__name__ for limit in floored.limits] == ["MemorisationGuard", "Floor"]
    with pytest.raises(ValueError, match=r"give repeat_budget=None to pass limits=\[\.\.\.\] to a stretched"):
        ScheduledController.from_log(log, steps=4 * RECORDED, limits=[])
    with pytest.raises(ValueError, match="steps must be an integer >= 1, got 0"):
        ScheduledController.from_log(log, steps=0)


def test_exported_static_weights_are_capped_for_the_new_runs_length(tmp_path, capsys):
    log = proxy_log(tmp_path / "proxy.oms")
    out = tmp_path / "tuned.yaml"
    args = ["schedule", "export", str(log), "--format", "yaml", "--weights", "final", "-o", str(out)]
    assert main([*args, "--steps", str(4 * RECORDED)]) == 0
    assert "capped by the repeat budget (16 epochs over 400 steps): small 0.1600 -> 0.0400" in capsys.readouterr().err
    weights = {d["name"]: d["weight"] for d in yaml.safe_load(out.read_text())["domains"]}
    assert weights == {"a": 0.48, "b": 0.48, "small": 0.04}
    assert main(args) == 0  # the recorded length: the proxy's own budget held it, nothing to cap
    assert "capped" not in capsys.readouterr().err
    assert {d["name"]: d["weight"] for d in yaml.safe_load(out.read_text())["domains"]} == dict(zip("ab", [0.42] * 2),
                                                                                                small=0.16)  # fmt: skip
    assert main([*args, "--steps", "400", "--repeat-budget", "0"]) == 0  # no cap asked for
    assert yaml.safe_load(out.read_text())["domains"][2]["weight"] == 0.16


def small_domain_mixture(root, weight: float):
    """The example mixture with a fourth, tiny token-bin domain (3 windows) at ``weight``."""
    config = make_example(root)
    write_tokens(root / "data/tiny.bin", np.arange(3 * 128 + 1) % 256)
    raw = yaml.safe_load(config.read_text())
    rest = (1 - weight) / 3
    for domain in raw["domains"]:
        domain["weight"] = rest
        domain.pop("max_epochs", None)
    raw["domains"].append({"name": "tiny", "source": "tokenbin", "path": "data/tiny.bin", "weight": weight})
    config.write_text(yaml.safe_dump(raw))
    return config


def test_a_run_that_will_draw_a_domain_far_past_its_budget_is_told_before_its_first_batch(tmp_path):
    config = small_domain_mixture(tmp_path, weight=0.1)
    dataset = MixedDataset.from_config(config, num_batches=40)
    # 0.1 of 32 samples over 40 steps is 128 samples: 42.7 epochs of 3 windows, past 2x the budget of 16
    expected = (r"over this run's 40 steps of 32 samples, the static controller's weights draw 'tiny' \(3 samples\) "
                r"about 43 epochs .* over 2x the repeat budget of 16 epochs")  # fmt: skip
    with pytest.warns(UserWarning, match=expected):
        mixer = OnlineMixer(StaticController(torch.tensor([0.3, 0.3, 0.3, 0.1])), dataset, lag=1)
    assert mixer.step_count == 0  # before the first step, and before the first batch:
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not again while the run goes on (the repeat warning at 10 epochs aside)
        warnings.filterwarnings("ignore", message=".*has been drawn about")
        for _ in MixedLoader(dataset):
            mixer.step()
    short = MixedDataset.from_config(config, num_batches=10)  # 10.7 epochs: within 2x the budget
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OnlineMixer(StaticController(torch.tensor([0.3, 0.3, 0.3, 0.1])), short, lag=1)


def test_a_stretched_schedule_on_a_real_run_draws_within_the_budget(tmp_path):
    config = small_domain_mixture(tmp_path, weight=1 / 4)
    dataset = MixedDataset.from_config(config, num_batches=20)
    # the proxy: a quarter of every batch on the tiny domain, 20 steps (about 53 epochs of it)
    mixer = OnlineMixer(StaticController(torch.full((4,), 1 / 4)), dataset, lag=1, log=tmp_path / "proxy.oms",
                        repeat_warning=0)  # fmt: skip
    for _ in MixedLoader(dataset):
        mixer.step()
    mixer.close()
    assert len(read_schedule(tmp_path / "proxy.oms").steps) == 21
    longer = MixedDataset.from_config(config, num_batches=80)  # 2,560 samples of 287: every other domain fits
    stretched = ScheduledController.from_log(tmp_path / "proxy.oms", steps=80)
    replay = OnlineMixer(stretched, longer, lag=1, repeat_warning=0)
    drawn = np.zeros(4)
    for batch in MixedLoader(longer):
        drawn += np.bincount(batch["domain"].numpy(), minlength=4)
        replay.step()
    # the published weights, version 0 included, spend at most the budget: 16 epochs of 3 windows, 48 draws in
    # expectation (each step's count is its share of 32 samples rounded up or down at random: about 0.6 a step)
    assert stretched.epochs.drawn[3] <= 16.0 + 1e-4
    assert abs(drawn[3] - 48) < 15 and drawn.sum() == 80 * 32
