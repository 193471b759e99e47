"""The end-to-end example on a tiny mixture: every method trains, logs, and DGA's log replays exactly."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import write_jsonl, write_tokens
from onlinemix.mixing.schedule_log import read_schedule

EXAMPLES = Path(__file__).parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
train_gpt = pytest.importorskip("train_gpt")
compare_mixing = pytest.importorskip("compare_mixing")


@pytest.fixture
def mixture(tmp_path: Path) -> Path:
    """Three training domains and a held-out set of each plus a target set, as prepare_data.py lays them out."""
    rng = np.random.default_rng(0)
    texts = {"a": np.arange(3000) % 11, "b": rng.integers(0, 256, 3000), "c": (np.arange(3000) * 5) % 97}
    domains, heldout = [], []
    for name, tokens in texts.items():
        write_tokens(tmp_path / f"{name}.bin", tokens)
        write_tokens(tmp_path / f"val/{name}.bin", tokens[::-1])
        domains.append({"name": name, "source": "tokenbin", "path": f"{name}.bin", "dtype": "uint16"})
        heldout.append({"name": name, "source": "tokenbin", "path": f"val/{name}.bin", "dtype": "uint16"})
    write_jsonl(tmp_path / "val/target.jsonl", [f"target document {i} " * 3 for i in range(20)])
    heldout.append({"name": "target", "source": "jsonl", "path": "val/target.jsonl"})
    for file, entries in (("mixture.yaml", domains), ("heldout.yaml", heldout)):
        config = {"seed": 3, "global_batch_size": 8, "seq_len": 16, "domains": entries}
        (tmp_path / file).write_text(yaml.safe_dump(config, sort_keys=False))
    return tmp_path / "mixture.yaml"


def run(mixture: Path, method: str, *extra: str) -> dict:
    out = mixture.parent / "runs"
    argv = [f"--config={mixture}", f"--method={method}", "--steps=6", "--eval-every=3", "--workers=0"]
    argv += [f"--log={out / method}.oms", f"--checkpoint={out / method}.pt", "--eval-samples=4", *extra]
    return train_gpt.train(train_gpt.parser().parse_args(argv))


def test_every_method_trains_and_dga_replays_exactly(mixture):
    out = mixture.parent / "runs"
    uniform = run(mixture, "uniform", f"--save-model={out / 'reference.pt'}")
    assert [e["step"] for e in uniform["evals"]] == [3, 6]
    assert set(uniform["evals"][-1]["loss"]) == {"a", "b", "c", "target"}
    assert np.allclose(read_schedule(out / "uniform.oms").weights, 1 / 3)

    doremi = run(mixture, "doremi", f"--reference={out / 'reference.pt'}")
    assert len(doremi["trained"]) == 6
    assert not np.allclose(read_schedule(out / "doremi.oms").weights[-1], 1 / 3)

    dga = run(mixture, "dga", "--dga-every=2")
    log = read_schedule(out / "dga.oms")
    assert log.steps.tolist() == list(range(7))
    assert np.allclose(log.weights[:2], 1 / 3) and not np.allclose(log.weights[2], 1 / 3)  # first update: step 2
    assert compare_mixing.replay_matches(mixture, out / "dga.oms", dga["trained"]) == 6

    args = compare_mixing.argparse.Namespace(config=mixture, steps=6, eval_every=3, workers=0, out=out)
    importance = compare_mixing.run("importance", args)  # fits, scores, writes importance.yaml, trains
    drawn = read_schedule(out / "importance.oms")
    assert drawn.header["controller"] == "odm" and len(importance["trained"]) == 6
    written = yaml.safe_load((mixture.parent / "importance.yaml").read_text())
    assert written["importance"] == {"sidecars": "importance", "estimator": "est.npz", "beta": 1.0, "keep": 0.5}
    assert all((mixture.parent / "importance" / f"{name}.importance.npy").exists() for name in "abc")

    histories = {"uniform": uniform, "doremi": doremi, "dga": dga, "importance": importance}
    report = compare_mixing.table(histories, "target", 6)
    assert "bar: the best static mixture (uniform)" in report
    assert report.count("\n| ") == 5  # header and one row per method


def test_doremi_without_a_reference_says_what_it_needs(mixture):
    with pytest.raises(SystemExit, match="--method doremi needs --reference"):
        run(mixture, "doremi")
