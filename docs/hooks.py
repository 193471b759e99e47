"""MkDocs hook: lay out the ``onlinemix`` package as it is installed, for the API reference.

In the repository ``onlinemix.loaders`` lives in ``loaders/`` and ``onlinemix.mixing`` in ``mixing/``
(setuptools' package-dir). mkdocstrings reads source files, not the installed package, so before the build
this links them together under ``build/api/onlinemix``, the folder the reference is read from.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT / "build" / "api" / "onlinemix"


def on_startup(**kwargs) -> None:
    TREE.mkdir(parents=True, exist_ok=True)
    links = {path.name: path for path in (ROOT / "onlinemix").iterdir() if path.suffix in (".py", ".typed")}
    links |= {path.name: path for path in (ROOT / "onlinemix").iterdir() if (path / "__init__.py").exists()}
    links |= {"loaders": ROOT / "loaders", "mixing": ROOT / "mixing"}
    for stale in TREE.iterdir():  # a module that became a package (or went away) leaves a dangling link
        if stale.is_symlink() and stale.name not in links:
            stale.unlink()
    for name, target in links.items():
        link = TREE / name
        if link.is_symlink() and link.resolve() == target:
            continue
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(target)
