"""`worker.core.runs.changed`: a run row with what an event changes, built directly."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from schemas import RunStatus
from worker.core.runs import RunRow, changed


def test_a_run_row_changes_only_what_an_event_changes() -> None:
    at = datetime(2026, 12, 3, 12, 0, tzinfo=UTC)
    row = RunRow("r", "nightly", None, "q", RunStatus.RUNNING, 0, at, None, {"a": 1}, None, None)
    ended = changed(row, {"status": RunStatus.COMPLETED, "ended_at": at, "reason": None})
    assert (ended.status, ended.ended_at, ended.initial_data) == (RunStatus.COMPLETED, at, {"a": 1})
    assert (ended.run_id, ended.started_at, ended.partition) == ("r", at, 0)
    with pytest.raises(TypeError, match="cannot change"):
        changed(row, {"partition": 3})
