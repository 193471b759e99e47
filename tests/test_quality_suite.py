"""The quality suite (benchmarks/quality/): its arithmetic by hand, and one scenario end to end on synthetic corpora
(the real ones are Debian's manual pages and message catalogues, which a test must not depend on)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks" / "quality"))
corpora = pytest.importorskip("corpora")
data = pytest.importorskip("data")
results = pytest.importorskip("results")
run = pytest.importorskip("run")
scenarios = pytest.importorskip("scenarios")
train = pytest.importorskip("train")


def test_steps_to_reach_interpolates_between_evaluations():
    steps = np.array([0, 100, 200, 300])
    values = np.array([5.0, 3.0, 2.0, 1.5])
    assert results.steps_to_reach(steps, values, 2.5) == pytest.approx(150.0)  # halfway from 3.0 to 2.0
    assert results.steps_to_reach(steps, values, 2.0) == pytest.approx(200.0)
    assert results.steps_to_reach(steps, values, 1.0) is None  # never reached
    assert results.steps_to_reach(steps, np.array([5.0, 1.0, 1.0, 1.0]), 4.0) == pytest.approx(25.0)


def test_target_prior_spreads_over_the_asked_number_of_domains_and_favours_the_closest():
    divergences = np.linspace(0.5, 5.0, 64)
    for clusters in (4, 16):
        weights = np.array(scenarios.target_prior(divergences.tolist(), clusters))
        assert weights.sum() == pytest.approx(1.0)
        assert math.exp(-(weights * np.log(weights + 1e-300)).sum()) == pytest.approx(clusters, rel=1e-3)
        assert np.all(np.diff(weights) <= 0)  # closer (smaller divergence): more weight


def test_documents_are_split_by_name_and_clusters_partition_the_pool():
    documents = [(f"doc{i}", "text " * 10) for i in range(400)]
    training, heldout = data.split(documents)
    assert len(training) + len(heldout) == 400 and not {d[0] for d in training} & {d[0] for d in heldout}
    assert abs(len(heldout) / 400 - data.HELDOUT_SHARE) < 0.06
    words = {"a": "alpha beta gamma ", "b": "uno dos tres ", "c": "eins zwei drei "}
    pool = [(kind, (words[kind] * 20) + f" {i}") for i in range(30) for kind in words]
    members = data.cluster(pool, 3)
    assert sorted(i for cluster in members for i in cluster) == list(range(len(pool)))
    assert sorted({pool[i][0] for i in cluster} == {pool[cluster[0]][0]} for cluster in members) == [True] * 3


def synthetic_corpus(name: str) -> list[tuple[str, str]]:
    """About 120 KB of documents in a made-up language of ``name``'s own words."""
    rng = np.random.default_rng(sum(name.encode()))
    vocabulary = ["".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8))) for _ in range(60)]
    return [(f"{name}/{i}", " ".join(rng.choice(vocabulary, 300))) for i in range(80)]


def tiny_suite(monkeypatch) -> None:
    """The suite on synthetic corpora of a few KB and models of a few thousand parameters: its code, in seconds."""
    monkeypatch.setattr(corpora, "CORPORA", {name: (lambda n=name: synthetic_corpus(n)) for name in corpora.CORPORA})
    monkeypatch.setattr(data, "GENERAL", {name: (corpus, 20_000) for name, (corpus, _) in data.GENERAL.items()})
    monkeypatch.setattr(data, "HELDOUT_BYTES", 6_000)
    monkeypatch.setattr(data, "SPECIFIC_BYTES", 4_000)
    monkeypatch.setattr(data, "CLUSTERS", 8)
    monkeypatch.setattr(data, "CLUSTER_POOL", dict.fromkeys(data.CLUSTER_POOL, 8_000))
    monkeypatch.setattr(train, "SIZES", {"small": {"width": 16, "layers": 1, "heads": 2},
                                         "medium": {"width": 24, "layers": 2, "heads": 2}})  # fmt: skip
    monkeypatch.setattr(train, "EVAL_WINDOWS", 16)
    monkeypatch.setattr(train, "WARMUP_STEPS", 2)
    monkeypatch.setattr(run, "REFERENCE_STEPS", 50)
    monkeypatch.setattr(run, "PRIOR_STEPS", 6)
    monkeypatch.setattr(run, "TUNING_STEPS", 3)


def test_a_scenario_runs_end_to_end_writes_its_table_and_plot_and_resumes(tmp_path, monkeypatch, capsys):
    tiny_suite(monkeypatch)
    argv = ["--out", str(tmp_path), "--scenarios", "targeted+specific", "--seeds", "2", "--steps", "12"]
    assert run.main([*argv, "--workers", "1"]) == 0
    summary = (tmp_path / "summary.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in summary.splitlines() if line.startswith("| ")}
    for method in ("uniform", "proportional", "closest", "odm", "ado", "doremi", "dga", "importance", "classifier",
                   "color-filter", "coreset", "doremi-target"):  # fmt: skip
        assert method in rows, method
    # compute, in plain runs: a static run is one; DGA adds its alignment gradients and the guard's probes;
    # DoReMi adds a forward of its reference per step and the uniform run that made the reference
    compute = {method: float(row[6]) for method, row in rows.items() if method != "method"}
    assert compute["uniform"] == compute["closest"] == compute["classifier"] == 1.0
    steps, batch, k = 12, data.GLOBAL_BATCH, 7  # one alignment (step 10: 32 windows a domain, 64 of the target)
    probes = 32 * k  # the guard: 32 windows a domain, a forward each, at step 10 (of 12)
    plain = steps * batch * 3
    assert compute["dga"] == pytest.approx(round((plain + 3 * (32 * k + 64) + probes) / plain, 2), abs=0.006)
    assert compute["doremi"] == pytest.approx(round(1 + (plain + steps * batch + probes) / plain, 2), abs=0.006)
    reference = (run.REFERENCE_STEPS * 32 * 3 + 16) / plain  # 50 steps of 32 windows, one validation of 16
    assert compute["doremi-target"] == pytest.approx(
        round(1 + (steps * batch + probes) / plain + reference, 2), abs=0.006
    )
    assert compute["proxy-dga"] == 1.25  # the replay, and the proxy: a quarter of the steps, no alignment yet
    assert compute["export-dga"] == 1.25  # its mean weights as a static mixture: the same proxy
    assert compute["coreset"] == round(7 / 3, 2)  # each step: the pool's forward (4 batches), one training pass
    setup = json.loads((tmp_path / "importance/targeted+specific-color-filter/setup-compute.json").read_text())
    assert compute["color-filter"] == round(1 + setup["window_passes"] / (steps * batch * 3), 2) > 1.0
    assert "vs uniform (paired)" in summary and rows["uniform"][4] == "+0.0000 ± 0.0000"
    assert "the bar" in summary and ("meets the 0.75x bar" in summary or "0.75x bar is not met" in summary
                                     or "does not meet the 0.75x bar" in summary)  # fmt: skip
    assert (tmp_path / "targeted+specific.png").stat().st_size > 10_000
    runs = sorted((tmp_path / "runs" / "targeted+specific").rglob("*.json"))
    # every method on both seeds (uniform, proportional, closest, odm, ado, doremi, dga, importance, classifier,
    # color-filter, coreset, doremi-target, bandit, bandit-unguarded), the proxy workflows' short run, its stretched
    # schedule and its static export on both, the grid on seed 0, its best on seed 1
    assert len(runs) == 14 * 2 + 3 * 2 + 6 + 1
    assert len(list((tmp_path / "runs" / "targeted+specific" / "proxies").glob("*.oms"))) == 2  # the proxies' logs
    capsys.readouterr()
    assert run.main([*argv, "--workers", "1"]) == 0  # everything kept: nothing trained again
    assert "runs to train" not in capsys.readouterr().out

    # the larger size, from these results: uniform, the small size's grid point, its best online method, the proxy
    # workflow at this size and the small model's run replayed; compute in runs of the larger size
    sizes = pytest.importorskip("sizes")
    argv = ["--small", str(tmp_path), "--out", str(tmp_path / "medium"), "--scenarios", "targeted+specific"]
    assert sizes.main([*argv, "--seeds", "2", "--steps", "12", "--workers", "1"]) == 0
    table = (tmp_path / "medium" / "sizes.md").read_text()
    rows = {line.split(" | ")[0][2:]: line.split(" | ") for line in table.splitlines() if line.startswith("| ")}
    online = sizes.best_online(tmp_path, scenarios.scenarios(tmp_path / "data", tmp_path)["targeted+specific"], 2)
    for label in ("uniform", online, f"proxy-{online}", f"export-{online}", f"small-{online}",
                  f"small-export-{online}"):  # fmt: skip
        assert label in rows and rows[label][1] != "not run", label
    share = train.parameters("small") / train.parameters("medium")
    whole = [json.loads((tmp_path / f"medium/runs/targeted+specific/small/{online}-seed{s}.json").read_text())
             for s in range(2)]  # fmt: skip
    small_cost = np.mean([run["compute"] for run in whole]) / (12 * data.GLOBAL_BATCH * 3)
    assert 0 < share < 1 and float(rows["uniform"][3]) == 1.0  # a run of the larger size: one
    assert float(rows[f"small-{online}"][3]) == pytest.approx(1 + share * small_cost, abs=0.006)  # and its share
    searched = len(scenarios.scenarios(tmp_path / "data", tmp_path)["targeted+specific"].grid) + 2
    for label in (label for label in rows if label.startswith("grid: ")):  # the small size's search, at its share
        assert float(rows[label][3]) == pytest.approx(1 + share * searched, abs=0.006)
    assert rows["uniform"][4] != "–"  # the small size's gain beside this size's
    assert (tmp_path / "medium" / "targeted+specific.png").exists()


def test_the_gpu_slice_runs_end_to_end_in_its_tiny_configuration(tmp_path, monkeypatch):
    tiny_suite(monkeypatch)
    gpu_slice = pytest.importorskip("gpu_slice")
    assert gpu_slice.main(["--tiny", "--out", str(tmp_path), "--steps", "24"]) == 0
    report = (tmp_path / "gpu_slice.md").read_text()
    assert report.startswith("# GPU slice on CPU")
    for label in ("uniform", "dga", "proxy-dga", "export-dga"):
        assert f"| {label} | " in report, label
    assert "CUDA tests" not in report  # none on the CPU
    assert "| ODM | " in report and "| DGA | " in report  # the controller benchmark's rows
    with pytest.raises(SystemExit):
        gpu_slice.main(["--tiny", "--out", str(tmp_path), "--steps", "6"])  # too few for a quarter-length proxy
