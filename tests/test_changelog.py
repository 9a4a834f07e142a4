"""Changelog rows: written by the worker, read back by a restore and by the client."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from schemas import RunStatus
from worker.core.lifecycle import JobState, Run, dump_state
from worker.core.runs import RunRow
from worker.engine import changelog

AT = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
STATE = JobState("report", active=(Run("r1", "report", None, "req-1", RunStatus.RUNNING, AT),))
ROW = RunRow("r1", "report", None, "req-1", RunStatus.RUNNING, 0, AT, None, {"day": 1}, None, None)


def test_rows_as_written_are_cut_out_and_other_spellings_parsed() -> None:
    """A restore needs each row's inner JSON; it gets the same bytes however a row is spelled."""
    _, job_value = changelog.job_row("report", dump_state(STATE))
    _, run_value = changelog.run_row(ROW)
    assert changelog.split_row(job_value) == ("job", dump_state(STATE))
    kind, data = changelog.split_row(run_value)
    assert kind == "run"
    assert changelog.load_run(data) == ROW

    respelled = json.dumps(json.loads(job_value), indent=2).encode()
    assert changelog.split_row(respelled) == ("job", dump_state(STATE))
    kind, data = changelog.split_row(json.dumps(json.loads(run_value), indent=1).encode())
    assert kind == "run"
    assert changelog.load_run(data) == ROW

    with pytest.raises(ValueError, match="not a changelog row"):
        changelog.split_row(b'{"row": "something else"}')


def test_a_snapshot_keeps_the_latest_rows_and_refuses_a_damaged_state() -> None:
    """Later rows win, a tombstone removes its run, and a state that does not validate fails
    the restore rather than a later batch."""
    snapshot = changelog.PartitionSnapshot()
    changelog.apply_row(snapshot, *changelog.job_row("report", dump_state(JobState("report"))))
    changelog.apply_row(snapshot, *changelog.job_row("report", dump_state(STATE)))
    changelog.apply_row(snapshot, *changelog.run_row(ROW))
    changelog.apply_row(snapshot, *changelog.run_row(replace(ROW, run_id="r2")))
    changelog.apply_row(snapshot, b"r1", None)
    assert snapshot.jobs == {"report": dump_state(STATE)}
    assert list(snapshot.runs) == ["r2"]
    assert snapshot.records == 5

    with pytest.raises(ValidationError, match="job_type"):
        changelog.apply_row(snapshot, b"broken", b'{"row":"job","state":{"job_type":5}}')
    assert "broken" not in snapshot.jobs


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"x", os.urandom(300)),
        (b"\xff\xfe", b'{"row":"run","v":1,"run":{}}'),
        (b"x", b"[" * 5_000 + b"]" * 5_000),
        (b"x", b'{"row":' + b"[" * 5_000 + b"}"),
        (b"x", b'["row", "job"]'),
        (b"x", b'{"row":"run"}'),
        (b"x", b'{"row":"nope","state":1}'),
        (b"x", b'"' + b"9" * 1_000_000 + b'"'),
        (b"x", b'{"row":"run","v":1,"run":{"run_id":5,"status":"RUNNING"}}'),
        (b"x", b'{"row":"run","v":1,"run":\xc3\x28}'),
    ],
)
def test_records_no_worker_writes_are_skipped_not_a_failed_restore(
    key: bytes, value: bytes
) -> None:
    """Anyone who may write the state topic can send anything: it is counted and skipped,
    and the rows of ours beside it are kept."""
    snapshot = changelog.PartitionSnapshot()
    changelog.apply_row(snapshot, *changelog.run_row(ROW))
    changelog.apply_row(snapshot, key, value)
    assert [run.run_id for run in changelog.load_runs(snapshot)] == ["r1"]
    assert snapshot.foreign == 1
