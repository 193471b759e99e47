"""The in-process loader against an earlier commit of itself, side by side in one process: did a change cost speed?

The earlier commit's ``loaders`` and ``mixing`` folders are taken out of git (``git archive``) into a temporary
folder. Before the package was named ``onlinemix`` (up to 367caec) they were top-level packages, so the old
version imports as ``loaders`` next to the current ``onlinemix.loaders``, in the same process; both then read
the same four token-bin domains (``seq_len`` 1024, batch 32, ``MixedLoader(num_workers=0)``), interleaved over
rounds, the best round of each counting. It prints samples/s of each and the ratio current / earlier, with byte
ids and with ids up to 50,000 (``uint16`` files of a BPE-sized vocabulary).

Run it before and after a change to a hot path (the plan, a source's ``read_into``, the dataset's ``read``):

    .venv/bin/python benchmarks/loader_ab.py                 # against 32573fc, the last commit before the loss
    .venv/bin/python benchmarks/loader_ab.py --against HEAD~3 --rounds 6

(A commit from after the rename to ``onlinemix`` cannot be imported beside the current one: then it says so.)
"""

from __future__ import annotations

import argparse
import importlib
import io
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from types import ModuleType

import numpy as np

SEQ_LEN, BATCH = 1024, 32
WEIGHTS = [0.4, 0.3, 0.2, 0.1]
ROOT = Path(__file__).resolve().parents[1]


def earlier(commit: str, folder: Path) -> ModuleType:
    """The ``loaders`` package of ``commit``, imported from ``folder`` (as the top-level ``loaders``)."""
    archive = subprocess.run(["git", "archive", commit, "loaders", "mixing"], cwd=ROOT, capture_output=True)
    if archive.returncode:
        raise SystemExit(f"git archive {commit}: {archive.stderr.decode().strip()}")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(folder, filter="data")
    if not (folder / "loaders" / "__init__.py").is_file():
        raise SystemExit(f"{commit} has no top-level loaders package (it is after the rename to onlinemix)")
    sys.path.insert(0, str(folder))
    loaders = importlib.import_module("loaders")
    if Path(loaders.__file__).parent != folder / "loaders":
        raise SystemExit(f"'import loaders' found {loaders.__file__}, not the copy of {commit}")
    return loaders


def write_domains(folder: Path, vocabulary: int) -> list[Path]:
    """Four token-bin files of 3 million random ids below ``vocabulary`` each."""
    rng = np.random.default_rng(0)
    paths = []
    for d in range(4):
        path = folder / f"d{d}-{vocabulary}.bin"
        rng.integers(0, vocabulary, 3_000_000, dtype=np.uint16).tofile(path)
        paths.append(path)
    return paths


def loader(package: ModuleType, paths: list[Path]):
    """``MixedLoader(num_workers=0)`` over ``paths`` with ``package``'s classes (current or earlier)."""
    plan = importlib.import_module(f"{package.__name__}.plan")
    sources = [package.TokenBinSource(p, SEQ_LEN) for p in paths]
    spec = package.PlanSpec([len(s) for s in sources], [plan.UNLIMITED] * 4, seed=0, global_batch_size=BATCH)
    dataset = package.MixedDataset(sources, ["d0", "d1", "d2", "d3"], spec, package.StaticSchedule(np.array(WEIGHTS)))
    return package.MixedLoader(dataset, num_workers=0)


def rate(package: ModuleType, paths: list[Path], batches: int) -> float:
    iterator = iter(loader(package, paths))
    for _ in range(5):
        next(iterator)
    started = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * BATCH / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--against", default="32573fc", help="the earlier commit (default 32573fc)")
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds; the best counts (default 4)")
    parser.add_argument("--batches", type=int, default=400, help="timed batches per round (default 400)")
    args = parser.parse_args()
    import onlinemix.loaders as current

    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        old = earlier(args.against, folder / "earlier")
        print(f"seq_len {SEQ_LEN}, batch {BATCH}, 4 token-bin domains, in process, best of {args.rounds} rounds")
        print(f"| ids | current | {args.against} | current / {args.against} |\n|---|---:|---:|---:|")
        for vocabulary in (256, 50_000):
            paths = write_domains(folder, vocabulary)
            best = {"current": 0.0, "earlier": 0.0}
            for _ in range(args.rounds):
                best["current"] = max(best["current"], rate(current, paths, args.batches))
                best["earlier"] = max(best["earlier"], rate(old, paths, args.batches))
            ratio = best["current"] / best["earlier"]
            print(f"| below {vocabulary:,} | {best['current']:,.0f} | {best['earlier']:,.0f} | {ratio:.2f}x |")


if __name__ == "__main__":
    main()
