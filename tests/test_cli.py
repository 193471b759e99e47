import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import make_example

from onlinemix.cli import main
from onlinemix.loaders import MixedDataset


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return make_example(root)


def sample(capsys, *args):
    assert main(["sample", *map(str, args)]) == 0
    return capsys.readouterr().out.splitlines()


def test_sample_prints_one_json_line_per_batch_in_training_order(config, capsys):
    lines = sample(capsys, config, "--batches", 5)
    assert len(lines) == 5
    first = json.loads(lines[0])
    assert first["batch"] == 0 and len(first["samples"]) == 32
    assert all(len(pair) == 2 and 0 <= pair[0] < 3 for pair in first["samples"])
    assert [json.loads(line)["batch"] for line in lines] == [0, 1, 2, 3, 4]


def test_sample_output_does_not_depend_on_workers_and_start_is_a_suffix(config, capsys):
    whole = sample(capsys, config, "--batches", 12)
    assert sample(capsys, config, "--batches", 12, "--workers", 2) == whole
    for start in (1, 7):
        assert sample(capsys, config, "--batches", 12 - start, "--start", start, "--workers", 3) == whole[start:]


def test_sample_rank_slices_join_to_the_global_batch(config, capsys):
    whole = [json.loads(line)["samples"] for line in sample(capsys, config, "--batches", 3)]
    halves = [
        [json.loads(line)["samples"] for line in sample(capsys, config, "--batches", 3, "--rank", r, "--world-size", 2)]
        for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*halves)] == whole


def test_inspect_reports_sizes_weights_and_exact_epochs(config, capsys):
    assert main(["inspect", str(config), "--steps", "100"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.split()[0] in ("code", "prose", "web")}
    prose = MixedDataset.from_config(config).sources[1]
    assert rows["code"][1:4] == ["tokenbin", f"{(20_000 - 129) // 128 + 1:,}", "0.5000"]
    assert rows["prose"][1:5] == ["jsonl", f"{len(prose):,}", "0.3000", "2"]
    assert rows["prose"][5] == "2.000" and "(exhausted)" in " ".join(rows["prose"])
    # code's share after prose runs out is renormalised, so its epochs exceed 100 * 32 * 0.5 / 155
    assert float(rows["code"][5]) > 100 * 32 * 0.5 / 155
    assert "tokenizer: byte, 258 ids, end of text 256" in out
    tokens = prose.cache.meta["tokens"]
    assert f"domain 'prose': 150 documents, {tokens:,} tokens packed into {len(prose):,} windows (byte)" in out


def test_errors_are_one_line_and_exit_nonzero(tmp_path, capsys):
    make_example(tmp_path)
    raw = yaml.safe_load((tmp_path / "mixture.yaml").read_text())
    raw["domains"][2]["path"] = "data/gone.bin"
    (tmp_path / "mixture.yaml").write_text(yaml.safe_dump(raw))
    assert main(["inspect", str(tmp_path / "mixture.yaml")]) == 1
    assert "onlinemix: error: domain 'web': file not found" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "mixture.yaml"), "--batches", "-1"]) == 2


def test_console_script_is_installed_and_explains_itself():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "onlinemix"), "sample", "--help"], capture_output=True, text=True, check=True
    )
    assert "--start B prints" in result.stdout and "--workers" in result.stdout
