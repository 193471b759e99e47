"""The token-bin hot loop, compiled (numba): windows of a memory map copied into a batch's rows.

numpy's way, ``out["input_ids"][rows] = inputs[indices]`` and the same for
the labels, makes four passes per domain: a gather of the inputs into a
temporary, its scatter (and cast) into the batch, and both again for the
labels, one token over. This loop reads each window once and writes both
rows in the same pass: about 1.7x faster for a batch of 1024-token windows,
and it lets a prefetch thread run beside the training thread (``nogil``).
Compiled once per token dtype, and cached beside this file.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, nogil=True, boundscheck=False)
def _gather(
    tokens: np.ndarray, starts: np.ndarray, rows: np.ndarray, inputs: np.ndarray, labels: np.ndarray
) -> None:  # pragma: no cover - compiled
    length = inputs.shape[1]
    for i in range(starts.shape[0]):
        window = tokens[starts[i] : starts[i] + length + 1]
        input_row, label_row = inputs[rows[i]], labels[rows[i]]
        # Two plain loops, not one: each is a contiguous widening copy the compiler vectorises.
        for j in range(length):
            input_row[j] = window[j]
        for j in range(length):
            label_row[j] = window[j + 1]


def gather_windows(
    tokens: np.ndarray, starts: np.ndarray, rows: np.ndarray | slice, inputs: np.ndarray, labels: np.ndarray
) -> None:
    """Copy ``tokens[start : start + seq_len + 1]`` for each of ``starts`` into row ``rows[i]`` of ``inputs`` (its
    first ``seq_len`` tokens) and of ``labels`` (its last ``seq_len``), widening to their dtype.

    The caller guarantees every window lies inside ``tokens`` (the loop does not check: it trusts the plan, which
    only asks for windows below the source's length) and every row inside the outputs.
    """
    if isinstance(rows, slice):
        rows = np.arange(*rows.indices(len(inputs)))
    if len(rows) != len(starts):
        raise ValueError(f"{len(starts)} windows for {len(rows)} rows")
    _gather(tokens, np.ascontiguousarray(starts, dtype=np.int64), np.asarray(rows, dtype=np.int64), inputs, labels)
