"""The worker's `decided` info line: one for an interval in which something was decided,
none for an idle one (whose batches only refresh the view mark, or tick)."""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from pathlib import Path

import structlog

from schemas import EventType, RunStatus, StatusEvent
from worker.engine.loop import Worker
from worker.engine.task import BatchOutcome
from worker.settings import Settings


def _worker(tmp_path: Path) -> Worker:
    return Worker(Settings(bootstrap_servers="127.0.0.1:1", db_path=tmp_path / "w.db"))


def _lines(worker: Worker) -> list[dict[str, object]]:
    # info level (the tests' default configuration keeps warnings and up)
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
    with structlog.testing.capture_logs() as logs:
        worker._log_summary()
    return [e for e in logs if e["event"] == "decided"]


def test_an_idle_interval_logs_no_decided_line(tmp_path: Path) -> None:
    """Batches and a transaction that decided nothing (a view-mark refresh) log nothing;
    they used to log `{"events": {}, "dead_letters": {}, "batches": 3, ...}` each minute."""
    worker = _worker(tmp_path)
    for _ in range(3):
        worker.metrics.committed(BatchOutcome(), 0.001)
    worker.metrics.transaction()
    assert _lines(worker) == []


def test_an_interval_that_decided_logs_one_line(tmp_path: Path) -> None:
    """An event decided makes the line, counting it; a failed batch alone does too; the
    next interval, idle, has none."""
    worker = _worker(tmp_path)
    event = StatusEvent(
        event_id="e",
        type=EventType.STARTED,
        status=RunStatus.RUNNING,
        job_type="etl",
        run_id="261128-093000-0.1",
        occurred_at=datetime(2026, 11, 28, 9, 30, tzinfo=UTC),
    )
    worker.metrics.committed(BatchOutcome(events=[event]), 0.001)
    worker.metrics.committed(BatchOutcome(), 0.001)
    (line,) = _lines(worker)
    assert line["events"] == {"started": 1}
    assert line["batches"] == 2
    assert _lines(worker) == []
    worker.metrics.failed()
    (line,) = _lines(worker)
    assert line["failed_batches"] == 1
