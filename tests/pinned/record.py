"""Record what ``scenario.py`` draws, for ``tests/test_pinned.py``: ``python tests/pinned/record.py``.

Run it only on a commit whose behaviour is the one to keep (it overwrites the record). The checkpoints it
saves are those of that commit: a later one must still resume them exactly.
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


def main() -> None:
    with tempfile.TemporaryDirectory() as folder:
        config = scenario.write_data(Path(folder))
        record = {}
        for name in scenario.CONTROLLERS:
            weights, batches, checkpoint = scenario.run(config, name)
            record[f"{name}/weights"] = np.asarray(weights, dtype=np.float32)
            record[f"{name}/batches"] = np.asarray(batches, dtype=np.int64)
            torch.save(checkpoint, HERE / f"checkpoint-{name}.pt")
            print(f"{name}: final weights {np.round(weights[-1], 4).tolist()}")
        np.savez(HERE / "limits.npz", **record)


if __name__ == "__main__":
    main()
