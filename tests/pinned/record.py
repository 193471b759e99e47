"""Record what ``scenario.py`` draws, for ``tests/test_pinned.py``: ``python tests/pinned/record.py [NAME...]``.

Run it only on a commit whose behaviour is the one to keep (it overwrites the record of the controllers named,
default all). The checkpoints it saves are those of that commit: a later one must still resume them exactly.

History: every controller was recorded before the limits became objects of their own; DGA again when it began
to step from the weights it published (its own mixture had run past the trust region into a corner and frozen
the run), so its checkpoint is of that commit.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import scenario

HERE = Path(__file__).resolve().parent


def main(names: list[str]) -> None:
    unknown = sorted(set(names) - set(scenario.CONTROLLERS))
    if unknown:
        raise SystemExit(f"unknown controller {unknown[0]!r}: choose from {', '.join(scenario.CONTROLLERS)}")
    record = {}
    if names and (HERE / "limits.npz").exists():
        with np.load(HERE / "limits.npz") as saved:
            record = dict(saved)  # the others' record is kept as it is
    with tempfile.TemporaryDirectory() as folder:
        config = scenario.write_data(Path(folder))
        for name in names or scenario.CONTROLLERS:
            weights, batches, checkpoint = scenario.run(config, name)
            record[f"{name}/weights"] = np.asarray(weights, dtype=np.float32)
            record[f"{name}/batches"] = np.asarray(batches, dtype=np.int64)
            torch.save(checkpoint, HERE / f"checkpoint-{name}.pt")
            print(f"{name}: final weights {np.round(weights[-1], 4).tolist()}")
        np.savez(HERE / "limits.npz", **record)


if __name__ == "__main__":
    main(sys.argv[1:])
