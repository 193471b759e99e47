"""Online mixing end to end: weights changing every step, across worker processes, replayed and resumed."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import make_example

from onlinemix.loaders import MixedDataset, MixedLoader, MixtureConfig
from onlinemix.loaders.channel import DEFAULT_LAG
from onlinemix.mixing.controllers import ODMController
from onlinemix.mixing.mixer import MixingError, OnlineMixer
from onlinemix.mixing.schedule_log import ScheduleLogError, read_schedule, replay_schedule

STEPS, LAG = 16, 2


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    return make_example(tmp_path_factory.mktemp("online"))


def synthetic_losses(batch):
    """A loss that depends on the domain and the sample, so the weights move every step."""
    return 1.0 + batch["domain"].float() + (batch["index"] % 7).float() / 10


def build(config, log, workers, **mixer_kwargs):
    dataset = MixedDataset.from_config(config, num_batches=STEPS)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    mixer = OnlineMixer(ODMController(initial, reward_scale=0.5), dataset, lag=LAG, log=log, **mixer_kwargs)
    # prefetch_factor=1: the DataLoader's prefetch depth (workers x 1) stays within the lag
    return dataset, mixer, MixedLoader(dataset, num_workers=workers, prefetch_factor=1 if workers else None)


def train(mixer, loader, stop=None):
    seen = []
    for batch in loader:
        seen.append(list(zip(batch["domain"].tolist(), batch["index"].tolist())))
        mixer.observe(synthetic_losses(batch), batch["domain"])
        mixer.step()
        if len(seen) == stop:
            break
    return seen


@pytest.fixture(scope="module")
def recorded(config, tmp_path_factory):
    log = tmp_path_factory.mktemp("log") / "run.oms"
    _, mixer, loader = build(config, log, workers=2)
    batches = train(mixer, loader)
    mixer.close()
    return batches, log


def test_weights_change_every_step_and_are_logged(recorded):
    batches, log_path = recorded
    log = read_schedule(log_path)
    assert log.steps.tolist() == list(range(STEPS + 1))
    assert log.header["lag"] == LAG and log.header["controller"] == "odm"
    # EXP3 explores by its prior (the file's weights) alone while ε_t = 1/k (t <= k ln k = 3.3 for 3 domains),
    # then moves every step
    assert np.allclose(log.weights[1:3], log.weights[0]) and np.allclose(log.weights[0], [0.5, 0.3, 0.2])
    assert all(not np.array_equal(a, b) for a, b in zip(log.weights[3:], log.weights[4:]))
    assert len(batches) == STEPS


def test_online_run_with_workers_equals_replay_of_its_log_without_workers(config, recorded):
    batches, log_path = recorded
    dataset = MixedDataset.from_config(config, num_batches=STEPS)
    dataset.schedule = replay_schedule(log_path, dataset)
    replayed = [list(zip(b["domain"].tolist(), b["index"].tolist())) for b in MixedLoader(dataset)]
    assert replayed == batches
    # the mixture really moved: the batches differ from the static-weights run
    static = MixedDataset.from_config(config, num_batches=STEPS)
    assert [list(zip(b["domain"].tolist(), b["index"].tolist())) for b in MixedLoader(static)] != batches


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graph", [False, True])
def test_controller_on_cuda_publishes_without_host_syncs_and_its_log_replays(config, tmp_path, graph):
    dataset = MixedDataset.from_config(config, num_batches=STEPS)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    controller = ODMController(initial, reward_scale=0.5, device="cuda", graph=graph)
    mixer = OnlineMixer(controller, dataset, lag=LAG, log=tmp_path / "cuda.oms")
    seen = []
    for step, batch in enumerate(MixedLoader(dataset, num_workers=2)):
        seen.append(list(zip(batch["domain"].tolist(), batch["index"].tolist())))
        losses, domains = synthetic_losses(batch).cuda(), batch["domain"].cuda()
        torch.cuda.synchronize()
        if step >= 2:  # after the first steps, where a graphed controller captures (and syncs)
            torch.cuda.set_sync_debug_mode("error")
        try:
            mixer.observe(losses, domains)
            mixer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    mixer.close()
    log = read_schedule(tmp_path / "cuda.oms")
    assert log.steps.tolist() == list(range(STEPS + 1))
    assert not np.allclose(log.weights[-1], log.weights[0])
    replay = MixedDataset.from_config(config, num_batches=STEPS)
    replay.schedule = replay_schedule(tmp_path / "cuda.oms", replay)
    assert [list(zip(b["domain"].tolist(), b["index"].tolist())) for b in MixedLoader(replay)] == seen


def test_an_online_run_with_a_prefetching_thread_is_the_run_with_workers(config, recorded):
    dataset = MixedDataset.from_config(config, num_batches=STEPS)
    initial = torch.from_numpy(dataset.schedule.weights_for(0, 1)[0].copy())
    mixer = OnlineMixer(ODMController(initial, reward_scale=0.5), dataset, lag=LAG)
    assert train(mixer, MixedLoader(dataset, thread_prefetch=LAG)) == recorded[0]  # weights and batches alike
    mixer.close()


def test_a_prefetch_deeper_than_the_published_weights_is_warned_about(config):
    dataset, mixer, _ = build(config, None, workers=0)
    deep = MixedLoader(dataset, num_workers=1, prefetch_factor=3)  # 3 batches ahead, lag 2
    expected = r"prefetches 3 batches .*\(lag 2 x accumulation 1\).*a lag of at least 3 keeps them busy"
    with pytest.warns(UserWarning, match=expected):
        next(iter(deep))
    with pytest.warns(UserWarning, match=r"prefetches 3 batches \(thread_prefetch\)"):
        next(iter(MixedLoader(dataset, thread_prefetch=3)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        next(iter(MixedLoader(dataset, num_workers=1, prefetch_factor=2)))  # 2 ahead: within the lag, silent
        next(iter(MixedLoader(MixedDataset.from_config(config), num_workers=2, prefetch_factor=4)))  # static weights
    mixer.close()


def test_the_default_lag_covers_eight_workers_at_the_default_prefetch(config):
    dataset = MixedDataset.from_config(config)
    mixer = OnlineMixer(ODMController(torch.full((3,), 1 / 3)), dataset)
    assert mixer.lag == DEFAULT_LAG == 16
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        MixedLoader(dataset, num_workers=8)._warn_if_prefetch_outruns_weights()  # 16 batches ahead: silent
    with pytest.warns(UserWarning, match=r"prefetches 18 batches .*a lag of at least 18"):
        MixedLoader(dataset, num_workers=9)._warn_if_prefetch_outruns_weights()
    mixer.close()


def test_stop_and_resume_in_fresh_objects_continues_exactly(config, recorded, tmp_path):
    batches, log_path = recorded
    log = tmp_path / "resumed.oms"
    _, mixer, loader = build(config, log, workers=2)
    first = train(mixer, loader, stop=7)
    checkpoint = {"loader": loader.state_dict(), "mixer": mixer.state_dict()}
    mixer.close()
    _, mixer, loader = build(config, log, workers=1)
    mixer.load_state_dict(checkpoint["mixer"])
    loader.load_state_dict(checkpoint["loader"])
    rest = train(mixer, loader)
    mixer.close()
    assert first + rest == batches
    assert np.array_equal(read_schedule(log).weights, read_schedule(log_path).weights)


def test_replay_refuses_a_log_of_another_mixture_naming_the_field(config, recorded, tmp_path):
    import yaml

    raw = yaml.safe_load(config.read_text())
    for key, value, message in (
        ("seed", 99, "seed was 1234 when the log was recorded, is now 99"),
        ("global_batch_size", 16, "global_batch_size was 32 when the log was recorded, is now 16"),
    ):
        other = tmp_path / f"{key}.yaml"
        other.write_text(yaml.safe_dump({**raw, key: value}).replace("data/", str(config.parent / "data") + "/"))
        with pytest.raises(ScheduleLogError, match=message):
            replay_schedule(recorded[1], MixedDataset.from_config(other))
    renamed = tmp_path / "renamed.yaml"
    raw["domains"][2]["name"] = "html"
    renamed.write_text(yaml.safe_dump(raw).replace("data/", str(config.parent / "data") + "/"))
    with pytest.raises(ScheduleLogError, match=r"domains was \['code', 'prose', 'web'\] when the log was recorded"):
        replay_schedule(recorded[1], MixedDataset.from_config(renamed))


def test_replay_past_the_end_of_a_log_is_an_error_or_holds_its_last_weights(config, recorded):
    dataset = MixedDataset.from_config(config, num_batches=STEPS + LAG + 3)
    dataset.schedule = replay_schedule(recorded[1], dataset)  # a log of 16 steps covers batches 0..16 + lag
    with pytest.raises(Exception, match=r"version 17 is past the end of .*run\.oms .*past_end='hold'"):
        list(MixedLoader(dataset))
    dataset.schedule = replay_schedule(recorded[1], dataset, past_end="hold")
    replayed = list(MixedLoader(dataset))
    assert len(replayed) == STEPS + LAG + 3
    assert [list(zip(b["domain"].tolist(), b["index"].tolist())) for b in replayed[:STEPS]] == recorded[0]


def test_non_finite_losses_are_counted_or_raised(config):
    _, mixer, loader = build(config, None, workers=0)
    batch = next(iter(loader))
    losses = synthetic_losses(batch)
    losses[0] = float("nan")
    mixer.observe(losses, batch["domain"])
    with pytest.warns(UserWarning, match="step 1: 1 non-finite losses"):
        mixer.step()
    _, strict, loader = build(config, None, workers=0, nonfinite="error")
    strict.observe(losses, batch["domain"])
    strict.step()
    with pytest.raises(MixingError, match="non-finite"):
        strict.step()


def test_out_of_range_domain_ids_raise(config):
    mixer = build(config, None, workers=0)[1]
    mixer.observe(torch.ones(2), torch.tensor([0, 9]))
    mixer.step()
    with pytest.raises(MixingError, match="outside \\[0, 3\\)"):
        mixer.observe(torch.ones(2), torch.tensor([0, 1]))


def test_cli_replays_a_log_and_shows_exports_and_plots_it(config, recorded, tmp_path, capsys):
    import yaml

    from onlinemix.cli import main

    batches, log_path = recorded
    assert main(["sample", str(config), "--batches", str(STEPS), "--schedule", str(log_path), "--workers", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [[tuple(p) for p in json.loads(line)["samples"]] for line in lines] == batches
    assert main(["sample", str(config), "--batches", "1", "--names"]) == 0
    assert {domain for domain, _ in json.loads(capsys.readouterr().out)["samples"]} <= {"code", "prose", "web"}
    assert main(["sample", str(config), "--batches", str(STEPS + 8), "--schedule", str(log_path)]) == 1
    assert "past the end of" in capsys.readouterr().err

    assert main(["schedule", "show", str(log_path)]) == 0
    out = capsys.readouterr().out
    assert f"{STEPS} optimizer steps (weight versions 0..{STEPS}), 3 domains" in out
    assert "  controller  odm\n" in out and "  seed        1234, global batch 32\n" in out
    assert f"  lag         {LAG} (batch b drawn with version b // accumulation - lag), accumulation 1" in out
    assert "{" not in out and "config_hash" not in out  # text, not a Python dict
    assert [line.split()[:2] for line in out.splitlines() if line.startswith("code ")] == [["code", "0.5000"]]

    assert main(["schedule", "export", str(log_path), "--format", "csv", "-o", str(tmp_path / "w.csv")]) == 0
    rows = (tmp_path / "w.csv").read_text().splitlines()
    assert rows[0] == "step,code,prose,web" and len(rows) == STEPS + 2
    assert [float(x) for x in rows[5].split(",")[1:]] == read_schedule(log_path).weights[4].tolist()
    assert main(["schedule", "export", str(log_path), "--format", "jsonl"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[1])["step"] == 1
    assert main(["schedule", "export", str(log_path), "-o", str(tmp_path / "no" / "such" / "w.csv")]) == 1
    assert "cannot write" in capsys.readouterr().err

    # The proxy-to-target workflow: a run's mean (or final) weights as static weights of a mixture file.
    weights = read_schedule(log_path).weights
    assert main(["schedule", "export", str(log_path), "--format", "yaml"]) == 0
    exported = yaml.safe_load(capsys.readouterr().out)["domains"]
    assert [d["name"] for d in exported] == ["code", "prose", "web"]
    assert np.allclose([d["weight"] for d in exported], weights.mean(0) / weights.mean(0).sum(), atol=1e-6)
    out = tmp_path / "static.yaml"
    assert main(["schedule", "export", str(log_path), "--format", "yaml", "--weights", "final", "--config",
                 str(config), "-o", str(out)]) == 0  # fmt: skip
    static = MixtureConfig.load(out)  # a mixture file as it was, with the run's final weights
    assert np.allclose([d.weight for d in static.domains], weights[-1] / weights[-1].sum(), atol=1e-6)
    assert static.mixing == {} and static.seed == 1234

    assert main(["schedule", "plot", str(log_path), "-o", str(tmp_path / "w.png")]) == 0
    assert (tmp_path / "w.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {tmp_path / 'w.png'}" in capsys.readouterr().out
    assert main(["schedule", "show", str(tmp_path / "missing.oms")]) == 1


def test_mixer_from_the_config_mixing_section(tmp_path):
    import yaml

    from onlinemix.loaders.config import ConfigError

    path = make_example(tmp_path)
    raw = yaml.safe_load(path.read_text())

    def mixer_for(mixing, **overrides):
        path.write_text(yaml.safe_dump({**raw, "mixing": mixing}))
        return OnlineMixer.from_config(path, MixedDataset.from_config(path), **overrides)

    mixer = mixer_for({"controller": "odm", "reward_scale": 0.25, "warmup": 3, "lag": 2, "check_every": 0})
    assert isinstance(mixer.controller, ODMController)
    assert (mixer.controller.reward_scale, mixer.controller.warmup, mixer.lag) == (0.25, 3, 2)
    assert torch.allclose(mixer.controller.weights, torch.tensor([0.5, 0.3, 0.2]))  # the config's weights
    assert len(mixer.header["config_hash"]) == 64
    scheduled = mixer_for({"controller": "scheduled", "waypoints": [[0, [1, 0, 0]], [10, [0, 0, 1]]]})
    scheduled.observe(torch.ones(2), torch.tensor([0, 1]))
    for _ in range(5):
        weights = scheduled.step()
    assert torch.allclose(weights, torch.tensor([0.5, 0.0, 0.5]))
    assert mixer_for({}, lag=7).controller.name == "static" and mixer_for({}, lag=7).lag == 7
    with pytest.raises(ConfigError, match=r"mixing.controller must be one of \['ado', 'bandit', 'dga', 'doremi'"):
        mixer_for({"controller": "quad"})
    knobs = (
        "compile, graph, heldout_ema, heldout_tolerance, importance_gain, min_prob, min_ratio, repeat_budget, "
        "reward_scale, trust_region, warmup, and the mixer lag, accumulation"
    )
    with pytest.raises(
        ConfigError, match=rf"mixing \(odm controller\): unknown key 'eta'; the odm controller takes {knobs}"
    ):
        mixer_for({"controller": "odm", "eta": 1})
