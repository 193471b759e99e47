import time

import numpy as np
import pytest
import torch

from onlinemix.loaders.channel import ReplayTable, VersionedSchedule, WeightsChannel, WeightsTimeout
from onlinemix.mixing.schedule_log import MAGIC, ScheduleLogError, ScheduleWriter, read_schedule

HEADER = {"domains": ["a", "b"], "seed": 1, "lag": 2}


def test_batch_b_uses_version_b_minus_lag_and_past_a_records_end_it_says_so_or_holds():
    recorded = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])
    rows = VersionedSchedule(ReplayTable(recorded, past_end="hold"), lag=2).weights_for(0, 6)
    # versions max(0, b - 2): 0 0 0 1 2 2 (held: the last recorded)
    assert rows[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.5, 0.5]
    strict = VersionedSchedule(ReplayTable(recorded, source="run.oms"), lag=2)
    assert strict.weights_for(0, 6)[:, 0].tolist() == [1.0, 1.0, 1.0, 0.0, 0.5]  # what the record covers
    with pytest.raises(
        ValueError, match=r"version 3 is past the end of run\.oms \(versions 0\.\.2: a run of 2 steps\)"
    ):
        strict.weights_for(5, 6)


def test_channel_serves_only_published_versions_and_times_out_naming_the_step():
    channel = WeightsChannel(np.array([0.5, 0.5]), timeout=0.2)
    schedule = VersionedSchedule(channel, lag=1)
    assert len(schedule.weights_for(0, 10)) == 2  # batches 0 and 1 use version 0; 2 needs version 1
    channel.publish(1, np.array([0.9, 0.1]))
    assert schedule.weights_for(2, 3).tolist() == [[0.9, 0.1]]
    started = time.monotonic()
    with pytest.raises(WeightsTimeout, match=r"weights of step 2 \(latest published: 1\)"):
        schedule.weights_for(3, 4)
    assert time.monotonic() - started >= 0.2
    with pytest.raises(ValueError, match="expected 2, got 5"):
        channel.publish(5, np.array([0.5, 0.5]))


def test_channel_publishes_arrays_tensors_and_lists_and_rejects_a_wrong_shape():
    channel = WeightsChannel(np.array([0.5, 0.5]))
    channel.publish(1, np.array([0.75, 0.25], dtype=np.float32))
    channel.publish(2, torch.tensor([0.125, 0.875]))
    channel.publish(3, [1.0, 0.0])
    assert channel.rows(1, 3).tolist() == [[0.75, 0.25], [0.125, 0.875], [1.0, 0.0]]
    for bad in (np.array([0.2, 0.3, 0.5]), torch.ones(1, 2) / 2, 0.5):
        with pytest.raises(ValueError, match=r"expected 2 weights, got shape"):
            channel.publish(4, bad)
    assert channel.latest() == 3


def test_channel_ring_overwrite_is_an_error_and_state_round_trips():
    channel = WeightsChannel(np.array([1.0, 0.0]), capacity=4)
    for v in range(1, 7):
        channel.publish(v, np.array([v / 8, 1 - v / 8]))
    with pytest.raises(ValueError, match="overwritten"):
        channel.rows(1, 6)
    fresh = WeightsChannel(np.array([1.0, 0.0]), capacity=4)
    fresh.load_state_dict(channel.state_dict(3))
    assert fresh.latest() == 6 and fresh.rows(4, 6)[:, 0].tolist() == [4 / 8, 5 / 8, 6 / 8]


@pytest.mark.parametrize("bad", [[float("nan"), 1.0], [-0.5, 1.5], [0.0, 0.0], [0.3, 0.3], [float("inf"), 0.0]])
def test_only_distributions_are_published(bad):
    """A weight vector that is not a distribution would make the plan read "every domain exhausted" and end the
    stream: the channel refuses it, naming the version (the mixer keeps the last good weights before that)."""
    channel = WeightsChannel(np.array([0.5, 0.5]))
    with pytest.raises(ValueError, match=r"weights of version 1 are not a distribution"):
        channel.publish(1, np.array(bad))
    assert channel.latest() == 0
    with pytest.raises(ValueError, match=r"initial weights are not a distribution"):
        WeightsChannel(np.array(bad))
    with pytest.raises(ValueError, match="timeout must be > 0 seconds, got -1"):
        WeightsChannel(np.array([0.5, 0.5]), timeout=-1)


def write_log(path, versions):
    writer = ScheduleWriter(path, HEADER)
    for step in range(versions):
        writer.append(step, np.array([step / 10, 1 - step / 10]))
    writer.close()


def test_log_round_trip_is_exact(tmp_path):
    write_log(tmp_path / "s.oms", 5)
    log = read_schedule(tmp_path / "s.oms")
    assert log.domains == ["a", "b"] and log.header["lag"] == 2
    assert log.steps.tolist() == [0, 1, 2, 3, 4]
    assert log.weights[3].tolist() == [0.3, 1 - 0.3]
    assert (tmp_path / "s.oms").read_bytes().startswith(MAGIC)


def test_truncated_last_record_is_dropped_with_a_warning(tmp_path):
    path = tmp_path / "s.oms"
    write_log(path, 5)
    path.write_bytes(path.read_bytes()[:-7])  # a crash in the middle of the last record
    with pytest.warns(UserWarning, match="last record is truncated"):
        log = read_schedule(path)
    assert log.steps.tolist() == [0, 1, 2, 3]


def test_corrupt_record_drops_it_and_the_rest(tmp_path):
    path = tmp_path / "s.oms"
    write_log(path, 5)
    data = bytearray(path.read_bytes())
    record = 8 + 16 + 4
    data[-2 * record + 10] ^= 0xFF  # flip a byte of record 3
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="record 3 fails its checksum"):
        assert read_schedule(path).steps.tolist() == [0, 1, 2]


def test_resuming_a_log_cuts_records_after_the_checkpoint(tmp_path):
    path = tmp_path / "s.oms"
    write_log(path, 6)
    writer = ScheduleWriter(path, HEADER, resume_at=3)
    writer.append(4, np.array([0.25, 0.75]))
    writer.close()
    log = read_schedule(path)
    assert log.steps.tolist() == [0, 1, 2, 3, 4] and log.weights[4].tolist() == [0.25, 0.75]
    with pytest.raises(ScheduleLogError, match="lag is 2 in the log, 3 in this run"):
        ScheduleWriter(path, {**HEADER, "lag": 3}, resume_at=2)


def test_bad_logs(tmp_path):
    (tmp_path / "x.oms").write_bytes(b"hello\n")
    with pytest.raises(ScheduleLogError, match="not an onlinemix schedule log"):
        read_schedule(tmp_path / "x.oms")
    with pytest.raises(ScheduleLogError, match="not found"):
        read_schedule(tmp_path / "missing.oms")
