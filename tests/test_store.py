"""The SQLite store's write queue: batches written behind, merged, readable before written."""

from __future__ import annotations

import asyncio
import re
import sqlite3
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, cast

import pytest
from hypothesis import given, strategies as st
from pydantic_core import PydanticSerializationError

from schemas import EventType, RunStatus, Source
from worker.core.lifecycle import (
    Decided,
    EndedRun,
    JobConfig,
    JobState,
    Limits,
    Queued,
    Run,
    Start,
    decide,
    dump_state,
    load_state,
)
from worker.core.runs import RunRow
from worker.engine import sqlfile, stored, writer
from worker.engine.store import SCHEMA_VERSION, Store

AT = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
_CONFIG = JobConfig()


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


def state(job_type: str) -> tuple[str, JobState]:
    return job_type, JobState(job_type)


async def test_batches_that_come_while_the_writer_gathers_share_one_transaction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A batch after a quiet spell is written at once; those that come during the writer's
    pause after a write gather into one SQLite transaction; a flush does not wait out the
    pause."""
    monkeypatch.setattr(writer, "GATHER_S", 3600.0)
    written: list[int] = []
    first_written = asyncio.Event()
    real = writer.write_in_thread

    async def counted(*args: Any) -> None:
        await real(*args)
        written.append(1)
        first_written.set()

    monkeypatch.setattr(writer, "write_in_thread", counted)
    store = await Store.open(tmp_path / "jobs.db")
    try:
        store.writes.record_batch(0, [run("r1")], [], {"jobs.requests": 1})
        await asyncio.wait_for(first_written.wait(), 30)  # at once, not after the pause
        for offset in (2, 3):
            store.writes.record_batch(0, [run(f"r{offset}")], [], {"jobs.requests": offset})
            await asyncio.sleep(0)  # the writer runs: it is pausing
        assert written == [1]
        await asyncio.wait_for(store.flush(), 30)  # not an hour
        assert written == [1, 1]
        assert sorted(r.run_id for r in await store.runs()) == ["r1", "r2", "r3"]
        assert await store.applied_offsets(0) == {"jobs.requests": 3}
    finally:
        await store.close()


async def test_queued_batches_are_merged_and_written_with_their_offsets(tmp_path: Path) -> None:
    """Later rows win, offsets move forward, and the file holds them once flushed."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        store.writes.record_batch(0, [run("r1")], [state("report")], {"jobs.requests": 5})
        store.writes.record_batch(
            0, [run("r1", RunStatus.COMPLETED), run("r2")], [], {"jobs.requests": 9}, ["r0"]
        )
        await store.flush()
        assert store.writes.backlog == 0
        rows = {r.run_id: r.status for r in await store.runs()}
        assert rows == {"r1": RunStatus.COMPLETED, "r2": RunStatus.RUNNING}
        assert await store.applied_offsets(0) == {"jobs.requests": 9}
        assert [n async for n in store.job_types(0)] == [["report"]]
    finally:
        await store.close()


async def test_run_history_is_filtered_by_start_time_and_limited_newest_first(
    tmp_path: Path,
) -> None:
    """`jobctl runs --since ... --limit ...`: the newest runs started at or after the time,
    whatever time zone it is given in, the exact start included."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        rows = [
            run(f"r{i}", RunStatus.COMPLETED).replace(started_at=AT + timedelta(minutes=i))
            for i in range(6)
        ]
        rows[3] = rows[3].replace(started_at=rows[3].started_at.replace(microsecond=250_000))
        store.writes.record_batch(0, rows, [], {})
        await store.flush()
        since = AT + timedelta(minutes=2)
        assert [r.run_id for r in await store.runs(since=since)] == ["r5", "r4", "r3", "r2"]
        assert [r.run_id for r in await store.runs(since=since, limit=2)] == ["r5", "r4"]
        east = timezone(timedelta(hours=5))
        later = (AT + timedelta(minutes=3, seconds=0.1)).astimezone(east)
        assert [r.run_id for r in await store.runs(since=later)] == ["r5", "r4", "r3"]
        assert await store.runs(since=AT + timedelta(hours=1)) == []
        assert [r.run_id for r in await store.runs(limit=1)] == ["r5"]
    finally:
        await store.close()


async def test_a_head_given_with_a_state_is_written_and_a_later_batch_without_one_wins(
    tmp_path: Path,
) -> None:
    """A state's head row given already serialized is what the file gets (it is not
    serialized again); a later batch changing the same job type without one has its own
    state written, not the earlier batch's head."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        old = JobState("report")
        newer = old.replace(queue=(Queued("r-q", "req-q", None, "", AT),))
        given = {"report": stored.head(newer)}
        store.writes.record_batch(0, [], [("report", old)], {}, heads=given)
        await store.flush()
        assert [load_state(s) for s in (await store.load_states(["report"])).values()] == [newer]
        store.writes.record_batch(0, [], [("report", newer)], {}, heads=given)
        store.writes.record_batch(0, [], [("report", old)], {})
        await store.flush()
        assert [load_state(s) for s in (await store.load_states(["report"])).values()] == [old]
    finally:
        await store.close()


async def test_an_end_written_over_its_start_leaves_the_row_as_a_whole_write_would(
    tmp_path: Path,
) -> None:
    """Ends are written as updates of the row the start wrote; a run that started and ended
    in one batch (no row yet) is still written whole, and both files read the same."""
    ended = run("r1", RunStatus.FAILED).replace(
        ended_at=AT + timedelta(seconds=3),
        metrics={"n": 1},
        reason="boom",
    )
    alone = ended.replace(run_id="r2", request_id="req-r2")
    updated = await Store.open(tmp_path / "updated.db")
    whole = await Store.open(tmp_path / "whole.db")
    try:
        updated.writes.record_batch(0, [run("r1")], [], {"jobs.requests": 1})
        await updated.flush()  # the start is in the file before its end is queued
        updated.writes.record_batch(0, [ended, alone], [], {"jobs.results": 1})
        await updated.flush()
        whole.writes.record_batch(0, [ended, alone], [], {"jobs.results": 1})
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
            run(r, RunStatus.COMPLETED).replace(ended_at=AT + timedelta(seconds=s))
            for r, s in (("r-z", 1), ("r-a", 2))
        )
        store.writes.record_batch(
            0,
            [run("r-running"), late, early],
            [
                ("busy", JobState("busy", active=(active,))),
                ("waiting", JobState("waiting", queue=(queued,))),
                state("idle"),
            ],
            {},
        )
        store.writes.record_batch(
            1, [run("r-other").replace(partition=1)], [state("elsewhere")], {}
        )
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


async def test_a_job_type_that_moved_partition_is_read_from_its_new_one(
    tmp_path: Path,
) -> None:
    """A state rewritten in place keeps its partition; one that a later batch writes from
    another partition (its topic gained partitions) moves there, in the same write as the
    states that stay, and its old partition no longer finds it."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        busy = JobState("stays", queue=(Queued("r-q", "req-q", None, "", AT),))
        store.writes.record_batch(0, [], [("stays", JobState("stays")), state("moves")], {})
        await store.flush()
        store.writes.record_batch(0, [], [("stays", busy)], {})
        store.writes.record_batch(1, [], [("moves", busy.replace(job_type="moves"))], {})
        await store.flush()

        names = {p: [n for c in [c async for c in store.job_types(p)] for n in c] for p in (0, 1)}
        assert names == {0: ["stays"], 1: ["moves"]}
        assert await store.busy_states(0) == {"stays": busy}
        assert await store.busy_states(1) == {"moves": busy.replace(job_type="moves")}
    finally:
        await store.close()


async def test_states_are_readable_while_queued_and_after_they_are_written(
    tmp_path: Path,
) -> None:
    """`load_states` answers from the queue first, then from the file; unknown ones are absent."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        old = JobState("report")
        newer = old.replace(queue=(Queued("r-q", "req-q", None, "", AT),))
        store.writes.record_batch(0, [], [("report", old)], {})
        await store.flush()
        store.writes.record_batch(0, [], [("report", newer)], {})
        queued = await store.load_states(["report", "never-seen"])
        assert queued == {"report": newer}
        await store.flush()
        (written,) = (await store.load_states(["report"])).values()
        assert isinstance(written, bytes)
        assert load_state(written) == newer
    finally:
        await store.close()


async def test_a_failed_write_stops_the_queue(tmp_path: Path) -> None:
    """After a write fails nothing later is written: the file stays a prefix of the batches."""
    store = await Store.open(tmp_path / "jobs.db")
    try:
        bad = run("r1").replace(initial_data={"not json": object()})  # cannot be stored
        store.writes.record_batch(0, [bad], [], {"jobs.requests": 1})
        with pytest.raises(PydanticSerializationError):
            await store.flush()
        assert isinstance(store.failure, PydanticSerializationError)
        with pytest.raises(PydanticSerializationError):
            store.writes.record_batch(0, [run("r2")], [], {"jobs.requests": 2})
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
    store.writes.record_batch(0, [], [state("a"), state("b")], {})
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
        store.writes.record_batch(
            0, [run("gone"), run("kept"), run("done", RunStatus.COMPLETED)], [], {"x": 1}
        )
        await store.flush()
        stale = await store.replace_partition(
            0, [("report", stored.head(JobState("report")), [])], [run("kept")], {"x": 9}
        )
        assert stale == 1
        rows = {r.run_id: r.status for r in await store.runs()}
        assert rows == {"kept": RunStatus.RUNNING, "done": RunStatus.COMPLETED}
        assert [r.run_id for r in await store.active_runs(0)] == ["kept"]
    finally:
        await store.close()


def _filled(job_type: str, starts: int, limits: Limits) -> list[tuple[JobState, JobState]]:
    """(before, after) of `starts` refused starts of a busy job type: each takes an entry
    of the idempotency window, whose oldest leave once it is full."""
    busy = Run(f"{job_type}-r", job_type, None, "req-run", RunStatus.RUNNING, AT)
    state = JobState(job_type, active=(busy,))
    steps = []
    for i in range(starts):
        source = Source(topic="jobs.requests", partition=0, offset=i)
        start = Start(f"req-{i}", job_type, None, {}, AT, source)
        after, _ = decide(state, start, _CONFIG, limits)
        steps.append((state, after))
        state = after
    return steps


async def test_window_entries_are_rows_and_the_file_reads_back_every_state(
    tmp_path: Path,
) -> None:
    """Each change writes its head and the entries that came and went, not the windows: the
    file holds one row per entry held, and a state read back (from the queue or the file)
    equals the one decided."""
    limits = Limits(idempotency_window=5)
    steps = _filled("report", 12, limits)
    store = await Store.open(tmp_path / "jobs.db")
    try:
        for before, after in steps:
            store.writes.record_batch(
                0,
                [],
                [("report", after)],
                {},
                entries=[("report", *c) for c in stored.window_changes(before, after)],
            )
            await store.flush()
        last = steps[-1][1]
        assert len(last.decided) == 5
        (read,) = (await store.load_states(["report"])).values()
        assert isinstance(read, bytes)
        assert load_state(read) == last
        assert load_state(read).decided_next == 12
        assert await store.busy_states(0) == {"report": last}
        db = sqlite3.connect(tmp_path / "jobs.db")
        try:
            numbers = db.execute("SELECT kind, number FROM window_entries").fetchall()
            (head,) = db.execute("SELECT state FROM job_states").fetchone()
        finally:
            db.close()
        assert sorted(numbers) == [("d", n) for n in range(7, 12)]
        assert b"req-0" not in head
        assert b'"decided"' not in head
    finally:
        await store.close()


async def test_a_version_1_file_is_converted_and_reads_the_same(tmp_path: Path) -> None:
    """A file whose states carry their windows inline (schema version 1) opens as version 2:
    numbered windows become rows, a state not numbered yet stays whole, and every state
    reads back as it was."""
    path = tmp_path / "jobs.db"
    numbered = JobState(
        "numbered",
        decided=tuple(Decided(f"req-{i}", EventType.REFUSED, None) for i in range(3)),
        ended=(EndedRun("numbered-r1", RunStatus.COMPLETED, AT),),
    ).replace(
        decided_next=10,
        ended_next=1,
    )
    unnumbered = JobState("unnumbered", decided=(Decided("req-x", EventType.REFUSED, None),))
    db = sqlite3.connect(path)
    db.executescript(
        "CREATE TABLE job_states (job_type TEXT PRIMARY KEY, partition INTEGER NOT NULL, "
        "state BLOB NOT NULL); PRAGMA user_version = 1;"
    )
    db.executemany(
        "INSERT INTO job_states VALUES (?, 0, ?)",
        [(s.job_type, dump_state(s)) for s in (numbered, unnumbered)] + [("damaged", b"{not json")],
    )
    db.commit()
    db.close()
    store = await Store.open(path)
    try:
        read = await store.load_states(["numbered", "unnumbered"])
        assert {k: load_state(v) for k, v in read.items() if isinstance(v, bytes)} == {
            "numbered": numbered,
            "unnumbered": unnumbered,
        }
        assert load_state(read["numbered"]).decided_next == 10  # type: ignore[arg-type]
    finally:
        await store.close()
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
        rows = db.execute("SELECT job_type, kind, number FROM window_entries").fetchall()
        damaged = db.execute("SELECT state FROM job_states WHERE job_type = 'damaged'").fetchone()
    finally:
        db.close()
    assert sorted(rows) == [
        ("numbered", "d", 7),
        ("numbered", "d", 8),
        ("numbered", "d", 9),
        ("numbered", "e", 0),
    ]
    assert damaged == (b"{not json",)  # left as it was: loading it fails as before


@pytest.mark.parametrize("where", [f"partition = ? AND ({sqlfile.BUSY})", "job_type IN (?, ?)"])
def test_reading_states_looks_up_their_entries_and_scans_no_other(where: str) -> None:
    """A read of a few job states must not walk every window entry of the file (millions
    with a long history): SQLite searches the entries by job type, per state read."""
    db = sqlite3.connect(":memory:")
    try:
        db.executescript(sqlfile.SCHEMA)
        db.executemany(
            sqlfile.PUT_ENTRY, [(f"t{i}", "d", n, b"{}") for i in range(200) for n in range(5)]
        )
        db.execute("ANALYZE")
        params = (0,) if "partition" in where else ("t1", "t2")
        plan = [r[3] for r in db.execute(f"EXPLAIN QUERY PLAN {sqlfile.states_sql(where)}", params)]
    finally:
        db.close()
    assert "SEARCH w USING PRIMARY KEY (job_type=?)" in plan
    assert not [step for step in plan if step.startswith("SCAN w")]


async def test_a_write_in_the_connections_thread_commits_whole_or_not_at_all(
    tmp_path: Path,
) -> None:
    """`write_in_thread` runs a whole write on the connection's own thread, in one trip, and
    commits it; a write that fails part way leaves nothing, and a SQLite failure is a
    `StoreError` naming the file."""
    path = tmp_path / "jobs.db"
    store = await Store.open(path)
    db = store._db
    threads: list[int] = []

    def two_offsets(conn: sqlite3.Connection) -> None:
        threads.append(threading.get_ident())
        conn.executemany(sqlfile.PUT_OFFSET, [("jobs.requests", 0, 5), ("jobs.results", 0, 7)])

    def half_then_fail(conn: sqlite3.Connection) -> None:
        conn.execute(sqlfile.PUT_OFFSET, ("jobs.requests", 1, 9))
        conn.execute("INSERT INTO no_such_table VALUES (1)")

    def half_then_raise(conn: sqlite3.Connection) -> None:
        conn.execute(sqlfile.PUT_OFFSET, ("jobs.requests", 2, 9))
        raise ValueError("not a SQLite failure")

    try:
        await sqlfile.write_in_thread(db, str(path), two_offsets)
        assert len(threads) == 1
        assert threads[0] != threading.get_ident()  # not the event loop's
        with pytest.raises(
            sqlfile.StoreError, match=re.escape(f"writing the SQLite file {path} failed")
        ):
            await sqlfile.write_in_thread(db, str(path), half_then_fail)
        with pytest.raises(ValueError, match="not a SQLite failure"):
            await sqlfile.write_in_thread(db, str(path), half_then_raise)
        assert not db.in_transaction
    finally:
        await store.close()
    with sqlite3.connect(path) as other:  # what another connection sees: the first write only
        rows = other.execute("SELECT topic, partition, next_offset FROM applied_offsets")
        assert sorted(rows) == [("jobs.requests", 0, 5), ("jobs.results", 0, 7)]


class _Binding:
    """A connection that records the type of every parameter its statements bind."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db
        self.types: set[type] = set()

    def executemany(self, sql: str, rows: Any) -> sqlite3.Cursor:
        rows = [tuple(r) for r in rows]
        self.types.update(type(value) for row in rows for value in row)
        return self.db.executemany(sql, rows)

    def execute(self, sql: str, params: Any) -> sqlite3.Cursor:
        self.types.update(type(value) for value in params)
        return self.db.execute(sql, params)

    def getlimit(self, category: int) -> int:
        return self.db.getlimit(category)


def _batches(count: int) -> tuple[writer._Pending, writer._Pending]:
    """`count` runs started on as many job types (each with a window entry), then ended."""
    ids = [f"r{n:04d}" for n in range(count)]
    started = writer._Pending(
        runs={i: run(i).replace(job_type=f"job-{i}") for i in ids},
        states={f"job-{i}": (0, JobState(f"job-{i}")) for i in ids},
        entries={(f"job-{i}", "d", 0): b'{"request_id":"%s"}' % i.encode() for i in ids},
        offsets={("jobs.requests", 0): count},
    )
    ended = writer._Pending(
        runs={
            i: run(i, RunStatus.COMPLETED).replace(job_type=f"job-{i}", metrics={"n": n})
            for n, i in enumerate(ids)
        },
        ended=set(ids),
        states={f"job-{i}": (0, JobState(f"job-{i}", ended_next=1)) for i in ids},
        entries={(f"job-{i}", "e", 0): b'{"run_id":"%s"}' % i.encode() for i in ids},
        offsets={("jobs.results", 0): count},
    )
    return started, ended


def _tables(db: sqlite3.Connection) -> list[list[Any]]:
    return [
        db.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall()
        for table in ("runs", "job_states", "window_entries", "applied_offsets")
    ]


def _one_a_row(db: sqlite3.Connection, batch: writer._Pending) -> None:
    """What the write-behind wrote of `batch` with one-row statements (its runs either new or
    ended over their start's row), the oracle of the many-row statements."""
    params = [stored.run_params(r, retained=True) for i, r in batch.runs.items()]
    if batch.ended:
        db.executemany(
            sqlfile.END_RUN,
            [
                (r.status.value, stored.time_text(r.ended_at), stored.dumps(r.metrics), 0, i)
                for i, r in batch.runs.items()
                if r.ended_at is not None
            ],
        )
    else:
        db.executemany(sqlfile.UPSERT_RUN, params)
    db.executemany(
        sqlfile.PUT_STATE_IN_PLACE,
        [(j, p, bytearray(stored.head(state))) for j, (p, state) in batch.states.items()],
    )
    db.executemany(
        sqlfile.PUT_ENTRY, [(*key, bytearray(e or b"")) for key, e in batch.entries.items()]
    )
    db.executemany(sqlfile.PUT_OFFSET, [(*key, o) for key, o in batch.offsets.items()])


@pytest.mark.parametrize("count", [1, 2, 3, 255, 256, 257, 700])
@pytest.mark.parametrize("update_from", [True, False])
@pytest.mark.parametrize("variables", [32_766, 30])
def test_a_batch_written_a_few_statements_of_many_rows_writes_what_one_a_row_wrote(
    monkeypatch: pytest.MonkeyPatch, count: int, update_from: bool, variables: int
) -> None:
    """The write-behind writes a batch's runs, job states and window entries in statements
    of many rows (`writer.execute_many`): whatever the batch's size, what SQLite allows in a
    statement, and whether it can update from a list of values (3.33 and later), the file
    then holds, row for row, what one-row statements wrote, in a few statements."""
    many, one = sqlite3.connect(":memory:"), sqlite3.connect(":memory:")
    for db in (many, one):
        db.executescript(sqlfile.SCHEMA)
    many.setlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER, variables)
    monkeypatch.setattr(writer, "UPDATE_FROM", update_from)
    ran: list[str] = []
    many.set_trace_callback(ran.append)
    for batch in _batches(count):
        batch.write(many)
        _one_a_row(one, batch)
    many.set_trace_callback(None)
    assert _tables(many) == _tables(one)
    assert len(_tables(many)[0]) == count
    assert many.execute("SELECT COUNT(*) FROM runs WHERE status = 'COMPLETED'").fetchone() == (
        count,
    )
    updates_from = [sql for sql in ran if "FROM (VALUES" in sql]
    assert bool(updates_from) is update_from
    if update_from and variables > 12 * writer.MOST_ROWS:  # 256 runs a statement allowed
        # each batch: BEGIN, its offset, and for each of its 3 tables one statement a
        # `MOST_ROWS` rows and at most 8 more (128, 64, ... 1 rows) for the rest
        assert len(ran) <= 2 * (2 + 3 * (count // writer.MOST_ROWS + 8))


def test_the_write_behind_binds_only_types_sqlite3_takes_without_an_adapter_lookup() -> None:
    """sqlite3 looks for an adapter for any parameter that is not exactly an int, float, str
    or bytearray (0.4-0.5 µs each, a dozen a lifecycle): the write-behind binds none such. An
    empty column is `sqlfile.NULL` through `NULLIF(?, 0)`, which leaves text such as "0"
    alone; and every row reads back as it was queued."""
    db = sqlite3.connect(":memory:")
    db.executescript(sqlfile.SCHEMA)
    zeros = run("r0").replace(client_id="0", request_id="0", metrics={"n": 0}, reason="0")
    nothing = run("r1").replace(request_id=None)
    ended = run("r2", RunStatus.COMPLETED).replace(
        ended_at=AT + timedelta(seconds=1), metrics={"n": 2}
    )
    job = JobState("report")
    first = writer._Pending(
        runs={r.run_id: r for r in (zeros, nothing, run("r2"))},
        states={"report": (0, job)},
        entries={("report", "d", 0): b'{"request_id":"a"}'},
        offsets={("jobs.requests", 0): 3},
    )
    then = writer._Pending(
        runs={"r2": ended},
        ended={"r2"},
        entries={("report", "d", 0): None, ("report", "e", 0): b'{"run_id":"r2"}'},
        offsets={("jobs.results", 0): 1},
    )
    binding = _Binding(db)
    first.write(cast(sqlite3.Connection, binding))
    then.write(cast(sqlite3.Connection, binding))
    assert binding.types <= {int, float, str, bytearray}
    rows = {r[0]: r for r in db.execute(f"SELECT {sqlfile.COLUMNS} FROM runs")}
    assert sqlfile.run_row(rows["r0"]) == zeros
    assert sqlfile.run_row(rows["r1"]) == nothing
    assert rows["r1"][2:4] == (None, None)  # client_id, request_id
    assert rows["r1"][7] is None  # ended_at
    assert rows["r1"][9:] == (None, None)  # metrics, reason
    assert sqlfile.run_row(rows["r2"]) == ended
    assert db.execute("SELECT typeof(state) FROM job_states").fetchall() == [("blob",)]
    assert db.execute("SELECT kind, number, entry FROM window_entries").fetchall() == [
        ("e", 0, b'{"run_id":"r2"}')
    ]


@given(
    st.datetimes(timezones=st.just(UTC)).map(
        lambda t: t.replace(microsecond=t.microsecond // 1000 * 1000)
    )
)
def test_a_brokers_time_is_stored_as_isoformat_spells_it(at: datetime) -> None:
    """SQLite's time columns hold `isoformat`'s text (their order and the `since` filter
    compare it); `time_text` has msgspec spell a UTC time, a broker's to the millisecond."""
    assert stored.time_text(at) == at.isoformat()


_OFFSETS = st.builds(timezone, st.timedeltas(timedelta(hours=-23), timedelta(hours=23)))


@given(st.datetimes(timezones=st.none() | st.just(UTC) | _OFFSETS))
def test_any_other_time_is_stored_as_isoformat_spells_it(at: datetime) -> None:
    assert stored.time_text(at) == at.isoformat()
