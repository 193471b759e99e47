"""One ``onlinemix`` namespace: a user's own ``loaders/`` and ``mixing/`` packages never meet onlinemix's."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import make_example

import onlinemix

REPO = Path(__file__).resolve().parents[1]

# A training script in a project that has packages named like onlinemix's folders.
USER_SCRIPT = """\
import sys

import loaders
import mixing
import torch

import onlinemix
from onlinemix.loaders.plan import PlanSpec

assert loaders.MINE == "the user's loaders" and mixing.MINE == "the user's mixing", "user packages shadowed"
assert onlinemix.loaders.__name__ == "onlinemix.loaders" and not hasattr(onlinemix.loaders, "MINE")
assert PlanSpec.__module__ == "onlinemix.loaders.plan"

if __name__ == "__main__":  # spawned workers import this file again
    run = onlinemix.OnlineMixing.from_config(
        sys.argv[1], controller="odm", num_workers=2, loader_options={"multiprocessing_context": "spawn"}, lag=2,
        dataset_options={"num_batches": 6},
    )
    for batch in run:
        run.observe(torch.rand(len(batch["domain"])), batch)
        run.step()
    print("ran", run.loader.position.batch, "batches from", onlinemix.__file__)
"""


def _user_project(root: Path) -> Path:
    for name in ("loaders", "mixing"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(f'MINE = "the user\'s {name}"\n')
    (root / "train.py").write_text(USER_SCRIPT)
    return make_example(root / "data")


def _run(script_dir: Path, config: Path, env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "train.py", str(config)], cwd=script_dir, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_the_package_is_one_namespace():
    assert onlinemix.MixedDataset.__module__ == "onlinemix.loaders.dataset"
    assert onlinemix.OnlineMixer.__module__ == "onlinemix.mixing.mixer"
    assert (Path(onlinemix.__file__).parent / "py.typed").exists()
    assert "loaders" not in sys.modules and "mixing" not in sys.modules  # nothing imported them top-level


def test_a_project_with_its_own_loaders_and_mixing_runs_onlinemix_from_the_editable_install(tmp_path):
    config = _user_project(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    assert "ran 6 batches from " + str(REPO / "onlinemix") in _run(tmp_path, config, env)


def test_a_regular_install_holds_only_onlinemix_and_runs_beside_the_users_packages(tmp_path):
    # Build from a copy of the tracked files, so that the checkout gets no build/ or egg-info folders.
    source = tmp_path / "source"
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True, check=True).stdout
    for name in filter(None, tracked.decode().split("\0")):
        if (REPO / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            (source / name).write_bytes((REPO / name).read_bytes())
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", site]
    subprocess.run([*install, str(source)], check=True, capture_output=True, timeout=300)
    installed = sorted(p.name for p in site.iterdir() if p.name not in ("bin", "__pycache__"))
    assert [name for name in installed if not name.startswith("onlinemix-")] == ["onlinemix"], installed
    assert {p.name for p in (site / "onlinemix").iterdir()} >= {"loaders", "mixing", "cli", "py.typed"}

    project = tmp_path / "project"
    config = _user_project(project)
    env = {**os.environ, "PYTHONPATH": str(site)}
    assert "ran 6 batches from " + str(site / "onlinemix") in _run(project, config, env)
    console = textwrap.dedent(f"""\
        import sys
        sys.argv = ["onlinemix", "inspect", {str(config)!r}, "--steps", "3"]
        from onlinemix.cli import main
        sys.exit(main())
    """)
    (project / "cli.py").write_text(console)
    done = subprocess.run([sys.executable, "cli.py"], cwd=project, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "code" in done.stdout, done.stderr[-2000:]
