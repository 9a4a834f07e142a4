"""The worker's batch step without a broker: what a batch commits."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from worker.core.config import JobsConfig
from worker.core.lifecycle import Limits, decision_order
from worker.core.limits import InputLimits
from worker.engine.codec import InputRecord
from worker.engine.task import PartitionTask, Retained, Rules


def start(offset: int, timestamp_ms: int, job_type: str) -> InputRecord:
    body = json.dumps({"job_type": job_type, "request_id": f"req-{offset}"}).encode()
    return InputRecord(
        "requests", "jobs.requests", 0, offset, timestamp_ms, job_type.encode(), body
    )


def test_the_highest_offset_is_committed_when_broker_times_go_backwards() -> None:
    """Records are decided in broker-time order, but the batch commits past its last offset
    even when a later offset carries an earlier time (CreateTime set by producers)."""
    rules = Rules(1, JobsConfig(), Limits(), InputLimits(), timedelta(days=1))
    task = PartitionTask(0, rules)
    records = [start(0, 2_000, "late"), start(1, 1_000, "early")]
    records.sort(key=decision_order)
    outcome = task.apply(records)
    assert [e.job_type for e in outcome.events] == ["early", "late"]
    assert outcome.next_offsets == {"jobs.requests": 2}
    assert task.applied == {"jobs.requests": 2}
    assert set(outcome.states) == {"early", "late"}


def test_ended_runs_leave_in_order_once_retention_has_passed_never_earlier() -> None:
    """A run leaves at the first horizon at or after its end; one that ended earlier than the
    run before it (a producer clock gone back) leaves with that run, not before."""
    t0 = datetime(2026, 11, 29, 7, 0, tzinfo=UTC)
    retained = Retained()
    for i, run_id in enumerate(["a", "b", "c"]):
        retained.add(t0 + timedelta(seconds=i), run_id)
    retained.add(t0 + timedelta(seconds=1.5), "late-clock")
    retained.add(t0 + timedelta(seconds=4), "d")

    assert retained.expire(t0 - timedelta(seconds=1)) == []
    assert retained.expire(t0 + timedelta(seconds=1)) == ["a", "b"]
    assert retained.expire(t0 + timedelta(seconds=1.9)) == []  # "late-clock" waits behind "c"
    assert len(retained) == 3
    retained.add(t0 + timedelta(seconds=5), "e")
    assert retained.expire(t0 + timedelta(seconds=4)) == ["c", "late-clock", "d"]
    assert retained.expire(t0 + timedelta(seconds=4)) == []
    assert (len(retained), retained.expire(t0 + timedelta(days=1))) == (1, ["e"])
    assert len(retained) == 0
