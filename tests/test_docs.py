"""The documentation cannot drift from the code: every Python block of the README and of docs/ runs, every mixture
file shown parses, every command shown names a real subcommand, script and option, and the site builds in strict mode.

Python blocks run page by page, in order, in one namespace (a later block may use an earlier one's names), in a
folder holding the example mixture (``mixture.yaml``: domains code, prose and web). ``model`` (token ids to logits),
``optimizer`` and ``device`` are given, as the pages say.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import EXAMPLE_CONFIG, make_example

from onlinemix import ConfigError, MixtureConfig
from onlinemix.cli import main as onlinemix

ROOT = Path(__file__).parents[1]
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md")])
FENCE = re.compile(r"^```(\w+)[^\n]*\n(.*?)^```", re.S | re.M)
EXAMPLE = yaml.safe_load(EXAMPLE_CONFIG)


def blocks(page: Path, language: str) -> list[str]:
    return [code for lang, code in FENCE.findall(page.read_text()) if lang == language]


def name(page: Path) -> str:
    return str(page.relative_to(ROOT))


def included(code: str) -> bool:
    """Whether a block is a snippet include (``--8<-- "file:section"``); if so, the file and section must exist."""
    includes = re.findall(r'^--8<-- "([^":]+)(?::(\w+))?"$', code.strip(), re.M)
    for file, section in includes:
        text = (ROOT / file).read_text()
        assert not section or f"--8<-- [start:{section}]" in text, f"{file} has no section {section}"
    return bool(includes)


class TokenModel(torch.nn.Module):
    """Token ids -> next-token logits (a bigram table): the ``model`` of the docs' snippets."""

    def __init__(self, vocab: int = 258):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table(input_ids)


GETTING_STARTED = ROOT / "docs" / "getting-started.md"


def test_getting_started_runs_top_to_bottom_in_a_fresh_folder(tmp_path, monkeypatch):
    """The page as a newcomer follows it: its shell lines run, the mixture file it shows is saved under the name
    it gives, its Python blocks run in order in one namespace: nothing given, nothing skipped but installing."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    for language, code in FENCE.findall(GETTING_STARTED.read_text()):
        if language == "bash":
            for line in code.replace("\\\n", " ").splitlines():
                line = line.split(" #")[0].strip()
                if not line or "pip install" in line or "pytest" in line:
                    continue  # the install block: CI has just done it
                words = [sys.executable if w == ".venv/bin/python" else w for w in shlex.split(line)]
                result = subprocess.run(words, capture_output=True, text=True, timeout=600)
                assert result.returncode == 0, f"{line}: {result.stderr[-2000:]}"
        elif language == "yaml":
            first = code.splitlines()[0]
            assert first.startswith("# ") and first.endswith(".yaml"), "a mixture file shown must say its file name"
            (tmp_path / first[2:]).write_text(code)
        elif language == "python":
            exec(compile(code, "docs/getting-started.md", "exec"), scope)
    assert (tmp_path / "runs" / "schedule.oms").exists() and (tmp_path / "runs" / "ckpt.pt").exists()


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "python") and p != GETTING_STARTED], ids=name)
def test_every_python_block_runs(page, tmp_path, monkeypatch):
    make_example(tmp_path)
    monkeypatch.chdir(tmp_path)
    model = TokenModel()
    scope = {"model": model, "optimizer": torch.optim.SGD(model.parameters(), lr=0.1), "device": "cpu"}
    for number, code in enumerate(blocks(page, "python"), 1):
        if included(code):
            continue  # a part of a file that its own tests run
        exec(compile(code, f"{name(page)} (python block {number})", "exec"), scope)


@pytest.mark.parametrize("page", [p for p in PAGES if blocks(p, "yaml")], ids=name)
def test_every_mixture_file_shown_parses(page):
    for code in blocks(page, "yaml"):
        try:
            MixtureConfig.from_dict({**EXAMPLE, **yaml.safe_load(code)})  # a section: as part of the example
        except ConfigError as error:  # the paths shown are examples: only a missing one may fail
            assert re.search(r"not a folder|not found|does not exist", str(error)), f"{name(page)}: {error}"


def commands(page: Path) -> list[list[str]]:
    lines = []
    for code in blocks(page, "bash"):
        for line in code.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                words = shlex.split(part)
                if words and (words[0] == "onlinemix" or words[0].endswith("python")):
                    lines.append(words)
    return lines


@pytest.mark.parametrize("page", [p for p in PAGES if commands(p)], ids=name)
def test_every_command_shown_exists_with_its_options(page, capsys):
    for words in commands(page):
        if words[0] == "onlinemix":
            subcommand = [w for w in words[1:3] if re.fullmatch(r"[a-z]+", w)]
            with pytest.raises(SystemExit) as exited:
                onlinemix([*subcommand, "--help"])
            assert exited.value.code == 0, words
            known = capsys.readouterr().out
        elif words[1] == "-m":
            continue  # python -m pytest, python -m onlinemix ...: modules, not files
        else:
            script = ROOT / words[1]
            assert script.is_file(), f"{name(page)} runs {words[1]}, which does not exist"
            known = script.read_text()
            if script.parent.name == "quality":
                known += "".join(p.read_text() for p in script.parent.glob("*.py"))
        for option in (w.split("=")[0] for w in words[2:] if w.startswith("--")):
            assert option in known, f"{name(page)}: {' '.join(words)}: no option {option}"


def public_definitions():
    """Every public class, function, method and property defined in onlinemix's modules."""
    import importlib
    import inspect
    import pkgutil

    import onlinemix

    names = ["onlinemix", "onlinemix.cli"]
    for package in (onlinemix.loaders, onlinemix.mixing):
        names += [info.name for info in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
    for module_name in names:
        module = importlib.import_module(module_name)
        for name, thing in vars(module).items():
            if name.startswith("_") or getattr(thing, "__module__", None) != module_name:
                continue
            if inspect.isfunction(thing):
                yield f"{module_name}.{name}", thing, ()
            elif inspect.isclass(thing):
                yield f"{module_name}.{name}", thing, ()
                for member, value in vars(thing).items():
                    if isinstance(value, property):
                        value = value.fget
                    elif isinstance(value, (classmethod, staticmethod)):
                        value = value.__func__
                    if not member.startswith("_") and inspect.isfunction(value):
                        yield f"{module_name}.{name}.{member}", value, thing.__mro__[1:]


def test_every_public_definition_has_a_docstring():
    missing = [
        name
        for name, thing, bases in public_definitions()
        if not (thing.__doc__ or "").strip()
        and not any(
            (getattr(getattr(base, name.rsplit(".", 1)[1], None), "__doc__", None) or "").strip() for base in bases
        )
    ]  # a method overriding a documented one inherits its docstring (as help() shows it)
    assert not missing, f"public definitions without a docstring: {missing}"


@pytest.mark.skipif(shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None, reason="mkdocs absent")
def test_the_site_builds_in_strict_mode(tmp_path):
    mkdocs = Path(sys.executable).parent / "mkdocs"
    result = subprocess.run(
        [str(mkdocs), "build", "--strict", "--site-dir", str(tmp_path / "site")], cwd=ROOT, capture_output=True,
        text=True, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
