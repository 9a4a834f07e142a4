"""The worker's batch step without a broker: what a batch commits."""

from __future__ import annotations

import json
from pathlib import Path

from worker.codec import InputRecord
from worker.runner import Owner, Worker
from worker.settings import Settings


def start(offset: int, timestamp_ms: int, job_type: str) -> InputRecord:
    body = json.dumps({"job_type": job_type, "request_id": f"req-{offset}"}).encode()
    return InputRecord(
        "requests", "jobs.requests", 0, offset, timestamp_ms, job_type.encode(), body
    )


def test_the_highest_offset_is_committed_when_broker_times_go_backwards(tmp_path: Path) -> None:
    """Records are decided in broker-time order, but the batch commits past its last offset
    even when a later offset carries an earlier time (CreateTime set by producers)."""
    worker = Worker(Settings(db_path=tmp_path / "jobs.db"))
    worker.partition_count = 1
    owner = Owner(number=0, producer=None, jobs={}, runs={}, retained=[], applied={})
    records = [start(0, 2_000, "late"), start(1, 1_000, "early")]
    records.sort(key=lambda r: (r.timestamp_ms, r.role != "requests", r.offset))
    outcome = worker.apply(owner, records)
    assert [e.job_type for e in outcome.events] == ["early", "late"]
    assert outcome.next_offsets == {"jobs.requests": 2}
    assert owner.applied == {"jobs.requests": 2}
    assert set(outcome.states) == {"early", "late"}
