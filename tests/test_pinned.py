"""What every controller draws with every limit binding, pinned bit for bit (``tests/pinned/``).

The record (weights of 50 steps and the batches they drew, per controller, and a checkpoint at step 25) was
written by ``tests/pinned/record.py`` on the code before the limits became objects of their own; a
refactoring that moves a single weight or batch fails here, and so does one that cannot resume those
checkpoints into the same second half.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

PINNED = Path(__file__).resolve().parent / "pinned"
sys.path.insert(0, str(PINNED))
import scenario  # noqa: E402


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> Path:
    return scenario.write_data(tmp_path_factory.mktemp("pinned"))


@pytest.fixture(scope="module")
def record() -> dict[str, np.ndarray]:
    with np.load(PINNED / "limits.npz") as saved:
        return dict(saved)


@pytest.mark.parametrize("name", scenario.CONTROLLERS)
def test_every_limit_draws_the_recorded_weights_and_batches(config, record, name):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the mixer's repeat warning: the tiny domain is meant to be repeated
        weights, batches, _ = scenario.run(config, name)
    np.testing.assert_array_equal(np.asarray(weights, dtype=np.float32), record[f"{name}/weights"])
    np.testing.assert_array_equal(np.asarray(batches), record[f"{name}/batches"])


@pytest.mark.parametrize("name", scenario.CONTROLLERS)
def test_a_checkpoint_saved_before_the_limits_moved_resumes_exactly(config, record, name):
    checkpoint = torch.load(PINNED / f"checkpoint-{name}.pt", weights_only=False)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        weights, batches, _ = scenario.run(config, name, resume=checkpoint)
    np.testing.assert_array_equal(np.asarray(weights, dtype=np.float32), record[f"{name}/weights"][scenario.HALF :])
    np.testing.assert_array_equal(np.asarray(batches), record[f"{name}/batches"][scenario.HALF :])
