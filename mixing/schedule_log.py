"""The schedule log: every published weight version of a run, in one compact, appendable file.

Layout (little-endian)::

    ONLINEMIX-SCHEDULE 1\\n                 magic and format version
    {"domains": [...], "seed": ..., ...}\\n  JSON header: domains, seed, lag, accumulation, config hash,
                                            starting weights, the mixture's identity (seq_len, tokenizer,
                                            each source's size and content digest), and ``crc32``: the
                                            CRC-32 of the rest of it (a changed header is refused)
    record*                                 one per version, in order from version 0

    record = int64 step | float64 weight x k | uint32 CRC-32 of the step and weights

Records have a fixed size, so a crash mid-write leaves a short last record:
the reader drops it (and anything after a record whose CRC fails) with a
warning and keeps every complete record before it. Weights are stored as the
exact float64 values the loader used, so a replay is bit for bit.
"""

from __future__ import annotations

import json
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from onlinemix.loaders.channel import ReplayTable, VersionedSchedule
from onlinemix.loaders.identity import identity_mismatch

MAGIC = b"ONLINEMIX-SCHEDULE 1\n"
HEADER_DEFAULTS = {"accumulation": 1}  # keys added after format 1 was first written
HEADER_KEYS = ("domains", "seed", "lag")  # what every header has (what a replay needs)
HEADER_CRC = "crc32"  # the header's checksum (logs written before it have none: not checked)


class ScheduleLogError(ValueError):
    """A schedule log that cannot be read or does not fit the run."""


@dataclass
class ScheduleLog:
    header: dict[str, Any]
    steps: np.ndarray  # (n,) int64: 0, 1, 2, ...
    weights: np.ndarray  # (n, k) float64

    @property
    def domains(self) -> list[str]:
        """The domains' names, in weight order."""
        return list(self.header["domains"])


def _record_size(num_domains: int) -> int:
    return 8 + 8 * num_domains + 4


def _read_header(file) -> dict[str, Any]:
    if file.readline() != MAGIC:
        raise ScheduleLogError(f"{file.name}: not an onlinemix schedule log (bad magic line)")
    line = file.readline()
    try:
        header = json.loads(line)
    except json.JSONDecodeError as error:
        raise ScheduleLogError(f"{file.name}: unreadable header: {error}") from None
    if not isinstance(header, dict) or not isinstance(header.get("domains"), list):
        raise ScheduleLogError(f"{file.name}: header lacks the list of domains")
    missing = [key for key in HEADER_KEYS if key not in header]
    if missing:
        raise ScheduleLogError(f"{file.name}: the header is damaged: it lacks {missing[0]!r}")
    saved = header.pop(HEADER_CRC, None)
    if saved is not None and saved != _header_crc(header):
        raise ScheduleLogError(
            f"{file.name}: the header is damaged (its checksum fails): a run resumed from a checkpoint restores "
            "its log from the checkpoint's copy once this file is deleted"
        )
    return header


def _header_crc(header: dict[str, Any]) -> int:
    return zlib.crc32(json.dumps(header, sort_keys=True).encode())


def read_schedule(path: str | Path) -> ScheduleLog:
    """Read a log, dropping (with a warning) a truncated or corrupt tail."""
    path = Path(path)
    try:
        file = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        raise ScheduleLogError(f"schedule log not found: {path}") from None
    with file:
        header = _read_header(file)
        body = file.read()
    k = len(header["domains"])
    size = _record_size(k)
    complete = len(body) // size
    if len(body) % size:
        warnings.warn(
            f"{path}: the last record is truncated ({len(body) % size} of {size} bytes); dropped it, "
            f"kept {complete} complete records",
            stacklevel=2,
        )
    records = np.frombuffer(body[: complete * size], dtype=np.uint8).reshape(complete, size)
    steps = records[:, :8].copy().view("<i8").ravel()
    weights = records[:, 8 : 8 + 8 * k].copy().view("<f8")
    stored = records[:, size - 4 :].copy().view("<u4").ravel()
    for i in range(complete):
        if zlib.crc32(records[i, : size - 4].tobytes()) != stored[i]:
            warnings.warn(
                f"{path}: record {i} fails its checksum; dropped it and the {complete - i - 1} after it", stacklevel=2
            )
            steps, weights = steps[:i], weights[:i]
            break
    if not np.array_equal(steps, np.arange(len(steps))):
        gap = int(np.argmax(steps != np.arange(len(steps))))
        raise ScheduleLogError(f"{path}: record {gap} is for step {steps[gap]}, expected step {gap}")
    return ScheduleLog(header, steps, weights)


class ScheduleWriter:
    """Appends weight versions to a log, flushed record by record.

    ``resume_at`` reopens an existing log for a run resumed after step
    ``resume_at``: records past it (written after the checkpoint, before a
    crash) are cut off, and the header must match.
    """

    def __init__(self, path: str | Path, header: dict[str, Any], resume_at: int | None = None):
        self.path = Path(path)
        self.header = header
        self.num_domains = len(header["domains"])
        self._size = _record_size(self.num_domains)
        if resume_at is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "wb")  # noqa: SIM115 - kept open for the run
            sealed = {**as_json(header), HEADER_CRC: _header_crc(as_json(header))}
            self._file.write(MAGIC + (json.dumps(sealed, sort_keys=True) + "\n").encode())
            self._file.flush()
            self.next_step = 0
            return
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a torn tail is expected here and cut off below
            existing = read_schedule(self.path)
        problem = identity_mismatch(existing.header.get("mixture", {}), as_json(header.get("mixture", {})),
                                    header["domains"], when="in the log")  # fmt: skip
        if problem:
            raise ScheduleLogError(f"{self.path} was written on another mixture: {problem}")
        for key in ("run", "domains", "seed", "global_batch_size", "lag", "accumulation", "initial"):
            if key not in existing.header and key not in HEADER_DEFAULTS:
                continue  # a log from before the key was recorded
            logged, ours = existing.header.get(key, HEADER_DEFAULTS.get(key)), header.get(key, HEADER_DEFAULTS.get(key))
            if key == "run" and logged != ours:
                raise ScheduleLogError(
                    f"{self.path} was written by another run (run {logged}, the checkpoint's is {ours}): a run "
                    "restarted from scratch over the same log replaced it. Resume with that run's own log, or log "
                    "to a new file"
                )
            if logged != ours:
                raise ScheduleLogError(f"{self.path}: {key} is {logged!r} in the log, {ours!r} in this run")
        self._existing = existing
        if len(existing.steps) <= resume_at:
            raise ScheduleLogError(
                f"{self.path} is damaged or cut short: it holds steps up to {len(existing.steps) - 1}, the checkpoint "
                f"is at step {resume_at}; delete it, and the resumed run restores it from the checkpoint's copy"
            )
        self._file = open(self.path, "r+b")  # noqa: SIM115
        _read_header(self._file)  # leaves the file at the first record
        self._file.truncate(self._file.tell() + (resume_at + 1) * self._size)
        self._file.seek(0, os.SEEK_END)
        self.next_step = resume_at + 1

    def check_versions(self, channel_state: dict[str, Any]) -> None:
        """The versions a checkpoint carries (``WeightsChannel.state_dict``) must be the log's, bit for bit."""
        first, weights = int(channel_state["first"]), np.asarray(channel_state["weights"], dtype=np.float64)
        logged = self._existing.weights[first : first + len(weights)]
        if logged.shape != weights.shape or not np.array_equal(logged, weights):
            raise ScheduleLogError(
                f"{self.path}: its weights at steps {first}..{first + len(weights) - 1} are not the checkpoint's: "
                "the log belongs to another run"
            )

    def append(self, step: int, weights: np.ndarray) -> None:
        """Append one weight version (flushed: a crash loses at most the record being written)."""
        if step != self.next_step:
            raise ScheduleLogError(f"{self.path}: expected step {self.next_step}, got {step}")
        weights = np.asarray(weights, dtype="<f8")
        if weights.shape != (self.num_domains,):
            raise ScheduleLogError(f"{self.path}: expected {self.num_domains} weights, got {weights.shape}")
        payload = struct.pack("<q", step) + weights.tobytes()
        self._file.write(payload + struct.pack("<I", zlib.crc32(payload)))
        self._file.flush()
        self.next_step += 1

    def close(self) -> None:
        """Close the file."""
        self._file.close()


def as_json(value: Any) -> Any:
    """``value`` as it reads back from the log's JSON header (tuples become lists), for comparisons."""
    return json.loads(json.dumps(value, default=str))


def replay_schedule(path: str | Path, dataset: Any, past_end: str = "error") -> VersionedSchedule:
    """A schedule that replays a recorded log: batch ``b`` gets the weights it got when recorded.

    Set it as ``dataset.schedule`` (no controller, any number of workers). The log must have been
    recorded on this mixture: everything its batches depend on besides the weights (the dataset's
    ``identity()``: domains, seed, global batch size, seq_len, tokenizer, each source's size and content
    digest...) is checked, and a difference is an error naming the field. ``past_end`` says what batches
    after the recorded run get: ``"error"`` (default) or ``"hold"`` (the last recorded weights).
    """
    log = read_schedule(path)
    ours = as_json(dataset.identity())
    recorded = {key: log.header[key] for key in ("domains", "seed", "global_batch_size") if key in log.header}
    recorded.update(log.header.get("mixture", {}))  # logs from before a key was recorded: not checked
    problem = identity_mismatch(recorded, ours, dataset.names, when="when the log was recorded")
    if problem:
        raise ScheduleLogError(f"{path} does not fit this mixture: {problem}; replay it on the mixture it was made on")
    if not len(log.weights):
        raise ScheduleLogError(f"{path} holds no weight versions (the run stopped before its first step)")
    accumulation = int(log.header.get("accumulation", HEADER_DEFAULTS["accumulation"]))
    table = ReplayTable(log.weights, past_end, source=str(path))
    return VersionedSchedule(table, lag=int(log.header["lag"]), accumulation=accumulation)
