"""The SQLite store's write queue: batches written behind, merged, readable before written."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic_core import PydanticSerializationError

from schemas import RunStatus
from worker.core.lifecycle import JobState, Queued, Run, dump_state
from worker.core.runs import RunRow
from worker.engine.store import Store

AT = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)


def run(run_id: str, status: RunStatus = RunStatus.RUNNING) -> RunRow:
    return RunRow(
        run_id=run_id,
        job_type="report",
        client_id=None,
        request_id=f"req-{run_id}",
        status=status,
        partition=0,
        started_at=AT,
        ended_at=None if status is RunStatus.RUNNING else AT,
        initial_data={"day": "monday"},
        metrics=None,
        reason=None,
    )


def state(job_type: str) -> tuple[str, bytes]:
    return job_type, dump_state(JobState(job_type))


async def test_queued_batches_are_merged_and_written_with_their_offsets(tmp_path: Path) -> None:
    """Later rows win, offsets move forward, and the file holds them once flushed."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        store.record_batch(0, [run("r1")], [state("report")], {"jobs.requests": 5})
        store.record_batch(
            0, [run("r1", RunStatus.COMPLETED), run("r2")], [], {"jobs.requests": 9}, ["r0"]
        )
        await store.flush()
        assert store.backlog == 0
        rows = {r.run_id: r.status for r in await store.runs()}
        assert rows == {"r1": RunStatus.COMPLETED, "r2": RunStatus.RUNNING}
        assert await store.applied_offsets(0) == {"jobs.requests": 9}
        assert [n async for n in store.job_types(0)] == [["report"]]
    finally:
        await store.close()


async def test_an_end_written_over_its_start_leaves_the_row_as_a_whole_write_would(
    tmp_path: Path,
) -> None:
    """Ends are written as updates of the row the start wrote; a run that started and ended
    in one batch (no row yet) is still written whole, and both files read the same."""
    ended = replace(
        run("r1", RunStatus.FAILED),
        ended_at=AT + timedelta(seconds=3),
        metrics={"n": 1},
        reason="boom",
    )
    alone = replace(ended, run_id="r2", request_id="req-r2")
    updated = await Store.open(tmp_path / "updated.db")
    whole = await Store.open(tmp_path / "whole.db")
    try:
        updated.record_batch(0, [run("r1")], [], {"jobs.requests": 1})
        await updated.flush()  # the start is in the file before its end is queued
        updated.record_batch(0, [ended, alone], [], {"jobs.results": 1})
        await updated.flush()
        whole.record_batch(0, [ended, alone], [], {"jobs.results": 1})
        await whole.flush()
        assert await updated.runs() == await whole.runs() == [alone, ended]
        assert await updated.active_runs(0) == []
        assert [e for chunk in [c async for c in updated.retained_ends(0)] for e in chunk] == [
            (ended.ended_at, "r1"),
            (alone.ended_at, "r2"),
        ]
    finally:
        await updated.close()
        await whole.close()


async def test_a_partition_take_reads_only_the_work_in_flight(tmp_path: Path) -> None:
    """A worker taking a partition gets the busy job states, every job type's name, the
    running runs' rows and the retained ended runs in end order; idle states stay unread."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        active = Run("r-active", "busy", None, "req-a", RunStatus.RUNNING, AT)
        queued = Queued("r-queued", "req-q", None, "", AT)
        early, late = (
            replace(run(r, RunStatus.COMPLETED), ended_at=AT + timedelta(seconds=s))
            for r, s in (("r-z", 1), ("r-a", 2))
        )
        store.record_batch(
            0,
            [run("r-running"), late, early],
            [
                ("busy", dump_state(JobState("busy", active=(active,)))),
                ("waiting", dump_state(JobState("waiting", queue=(queued,)))),
                state("idle"),
            ],
            {},
        )
        store.record_batch(1, [replace(run("r-other"), partition=1)], [state("elsewhere")], {})
        await store.flush()

        busy = await store.busy_states(0)
        assert busy == {
            "busy": JobState("busy", active=(active,)),
            "waiting": JobState("waiting", queue=(queued,)),
        }
        assert sorted(n for chunk in [c async for c in store.job_types(0)] for n in chunk) == [
            "busy",
            "idle",
            "waiting",
        ]
        assert [r.run_id for r in await store.active_runs(0)] == ["r-running"]
        ends = [e async for chunk in store.retained_ends(0) for e in chunk]
        assert ends == [(AT + timedelta(seconds=1), "r-z"), (AT + timedelta(seconds=2), "r-a")]
    finally:
        await store.close()


async def test_states_are_readable_while_queued_and_after_they_are_written(
    tmp_path: Path,
) -> None:
    """`load_states` answers from the queue first, then from the file; unknown ones are absent."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        old = JobState("report")
        newer = replace(old, decided=())
        store.record_batch(0, [], [("report", dump_state(old))], {})
        await store.flush()
        store.record_batch(0, [], [("report", dump_state(newer) + b" ")], {})
        queued = await store.load_states(["report", "never-seen"])
        assert queued == {"report": dump_state(newer) + b" "}
        await store.flush()
        assert await store.load_states(["report"]) == {"report": dump_state(newer) + b" "}
    finally:
        await store.close()


async def test_a_failed_write_stops_the_queue(tmp_path: Path) -> None:
    """After a write fails nothing later is written: the file stays a prefix of the batches."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        bad = replace(run("r1"), initial_data={"not json": object()})  # cannot be stored
        store.record_batch(0, [bad], [], {"jobs.requests": 1})
        with pytest.raises(PydanticSerializationError):
            await store.flush()
        assert isinstance(store.failure, PydanticSerializationError)
        with pytest.raises(PydanticSerializationError):
            store.record_batch(0, [run("r2")], [], {"jobs.requests": 2})
        assert await store.applied_offsets(0) == {}
    finally:
        with pytest.raises(PydanticSerializationError):
            await store.close()


async def test_concurrent_reads_open_one_reading_connection(tmp_path: Path) -> None:
    """Batches of several partitions reading at once share one extra connection, and
    closing the store closes it (a leaked one would keep the process from exiting)."""

    def sqlite_threads() -> set[threading.Thread]:
        # aiosqlite runs each connection in a thread of its own; other tests' threads (Kafka
        # clients winding down) come and go meanwhile, so only these are counted.
        return {t for t in threading.enumerate() if "_connection_worker_thread" in t.name}

    before = sqlite_threads()
    store = await Store.open(tmp_path / "jobs.db")
    store.record_batch(0, [], [state("a"), state("b")], {})
    await store.flush()
    results = await asyncio.gather(*(store.load_states([j]) for j in ("a", "b", "c")))
    assert [set(r) for r in results] == [{"a"}, {"b"}, set()]
    opened = sqlite_threads() - before
    assert len(opened) == 2  # the writing and the reading connection
    await store.close()
    for thread in opened:  # each ends once its connection is closed
        await asyncio.to_thread(thread.join, 10)
        assert not thread.is_alive()


async def test_a_restore_drops_runs_another_owner_ended_long_ago(tmp_path: Path) -> None:
    """A run this file shows RUNNING that the changelog no longer holds (another owner ended
    it and its row was tombstoned) is not left RUNNING; ended history and the snapshot's
    runs stay."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        store.record_batch(
            0, [run("gone"), run("kept"), run("done", RunStatus.COMPLETED)], [], {"x": 1}
        )
        await store.flush()
        stale = await store.replace_partition(0, [state("report")], [run("kept")], {"x": 9})
        assert stale == 1
        rows = {r.run_id: r.status for r in await store.runs()}
        assert rows == {"kept": RunStatus.RUNNING, "done": RunStatus.COMPLETED}
        assert [r.run_id for r in await store.active_runs(0)] == ["kept"]
    finally:
        await store.close()
