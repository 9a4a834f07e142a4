"""SQLite store (aiosqlite, WAL): run history, each job type's core state, applied offsets.

Runs are written from status events by `apply_events`, the same function whether the events
were just decided or are being replayed from the status topic, so a store rebuilt from the
decision log equals the live one by construction. Rows are tagged with their partition.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any

import aiosqlite

from schemas import ENDING_EVENTS, EventType, RunStatus, StatusEvent
from worker.lifecycle import JobState, dump_state, load_state

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    job_type     TEXT NOT NULL,
    client_id    TEXT,
    request_id   TEXT,
    status       TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    ended_at     TEXT,
    initial_data TEXT NOT NULL,
    metrics      TEXT,
    reason       TEXT,
    -- 1 while the run's row is in the changelog (not yet tombstoned)
    retained     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_type ON runs (job_type, started_at);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE INDEX IF NOT EXISTS runs_retained ON runs (partition, retained);
CREATE TABLE IF NOT EXISTS job_states (
    job_type  TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    state     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS job_states_by_partition ON job_states (partition);
CREATE TABLE IF NOT EXISTS applied_offsets (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""

_COLUMNS = (
    "run_id, job_type, client_id, request_id, status, partition, started_at, ended_at, "
    "initial_data, metrics, reason"
)


@dataclass(frozen=True, slots=True)
class RunRow:
    """One run as recorded."""

    run_id: str
    job_type: str
    client_id: str | None
    request_id: str | None
    status: RunStatus
    partition: int
    started_at: datetime
    ended_at: datetime | None
    initial_data: dict[str, Any]
    metrics: dict[str, Any] | None
    reason: str | None


def started_row(event: StatusEvent, partition: int) -> RunRow:
    """The row of a run as its `started` event creates it."""
    assert event.run_id is not None
    assert event.started_at is not None
    return RunRow(
        run_id=event.run_id,
        job_type=event.job_type,
        client_id=event.client_id,
        request_id=event.request_id,
        status=RunStatus.RUNNING,
        partition=partition,
        started_at=event.started_at,
        ended_at=None,
        initial_data=dict(event.initial_data or {}),
        metrics=None,
        reason=None,
    )


def run_change(event: StatusEvent) -> dict[str, Any] | None:
    """The fields of an existing run row that `event` changes (None: it changes none).

    The worker's live rows and `replay` both go through here, so they cannot drift apart.
    """
    if event.type is EventType.PROGRESS:
        return {"metrics": event.metrics}
    if event.type not in ENDING_EVENTS:
        return None
    assert event.status is not None
    change: dict[str, Any] = {
        "status": event.status,
        "ended_at": event.occurred_at,
        "reason": event.reason,
    }
    if event.metrics is not None:  # else the last progress metrics stay
        change["metrics"] = event.metrics
    return change


def _dumps(value: object) -> str | None:
    return None if value is None else json.dumps(value, sort_keys=True, separators=(",", ":"))


class Store:
    """The worker's SQLite file. Open with `await Store.open(path)`; close with `close()`."""

    def __init__(self, db: aiosqlite.Connection) -> None:
        self._db = db
        # Several partitions' batches finish concurrently; each SQLite transaction is a
        # sequence of awaits on one connection, so they must not interleave.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str) -> Store:
        """Open (creating if needed) the store at `path`, in WAL mode."""
        db = await aiosqlite.connect(str(path))
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(_SCHEMA)
        await db.commit()
        return cls(db)

    async def close(self) -> None:
        """Close the connection."""
        await self._db.close()

    async def load_partition(self, partition: int) -> dict[str, JobState]:
        """The core state of every job type recorded on `partition`."""
        async with self._db.execute(
            "SELECT job_type, state FROM job_states WHERE partition = ?", (partition,)
        ) as cursor:
            return {job_type: load_state(state) async for job_type, state in cursor}

    async def applied_offsets(self, partition: int) -> dict[str, int]:
        """Topic -> next offset to apply, for input topics of `partition`."""
        async with self._db.execute(
            "SELECT topic, next_offset FROM applied_offsets WHERE partition = ?", (partition,)
        ) as cursor:
            return {topic: offset async for topic, offset in cursor}

    async def commit_batch(
        self,
        partition: int,
        runs: Iterable[RunRow],
        states: Iterable[JobState],
        next_offsets: Mapping[str, int],
        tombstoned: Iterable[str] = (),
    ) -> None:
        """Record one processed batch of `partition` atomically."""
        async with self._lock:
            await self._upsert_runs(runs, retained=True)
            await self._db.executemany(
                "UPDATE runs SET retained = 0 WHERE run_id = ?", [(r,) for r in tombstoned]
            )
            await self._put_states(partition, states)
            await self._put_offsets(partition, next_offsets)
            await self._db.commit()

    async def replace_partition(
        self,
        partition: int,
        states: Iterable[JobState],
        runs: Iterable[RunRow],
        next_offsets: Mapping[str, int],
    ) -> None:
        """Replace what is known of `partition` by a snapshot restored from the changelog."""
        async with self._lock:
            await self._db.execute("DELETE FROM job_states WHERE partition = ?", (partition,))
            await self._db.execute("UPDATE runs SET retained = 0 WHERE partition = ?", (partition,))
            await self._upsert_runs(runs, retained=True)
            await self._put_states(partition, states)
            await self._db.execute("DELETE FROM applied_offsets WHERE partition = ?", (partition,))
            await self._put_offsets(partition, next_offsets)
            await self._db.commit()

    async def _upsert_runs(self, runs: Iterable[RunRow], *, retained: bool) -> None:
        await self._db.executemany(
            "INSERT OR REPLACE INTO runs (run_id, job_type, client_id, request_id, status, "
            "partition, started_at, ended_at, initial_data, metrics, reason, retained) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    r.run_id,
                    r.job_type,
                    r.client_id,
                    r.request_id,
                    r.status,
                    r.partition,
                    r.started_at.isoformat(),
                    None if r.ended_at is None else r.ended_at.isoformat(),
                    _dumps(r.initial_data),
                    _dumps(r.metrics),
                    r.reason,
                    int(retained),
                )
                for r in runs
            ],
        )

    async def _put_states(self, partition: int, states: Iterable[JobState]) -> None:
        await self._db.executemany(
            "INSERT INTO job_states (job_type, partition, state) VALUES (?, ?, ?) "
            "ON CONFLICT (job_type) DO UPDATE SET partition = excluded.partition, "
            "state = excluded.state",
            [(s.job_type, partition, dump_state(s)) for s in states],
        )

    async def _put_offsets(self, partition: int, next_offsets: Mapping[str, int]) -> None:
        await self._db.executemany(
            "INSERT INTO applied_offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
            "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset",
            [(topic, partition, offset) for topic, offset in next_offsets.items()],
        )

    async def retained_runs(self, partition: int) -> list[RunRow]:
        """Runs of `partition` whose rows are still in the changelog."""
        async with self._db.execute(
            f"SELECT {_COLUMNS} FROM runs WHERE partition = ? AND retained = 1", (partition,)
        ) as cursor:
            rows = await cursor.fetchall()
        return [_row(r) for r in rows]

    async def apply_events(self, partition: int, events: Sequence[StatusEvent]) -> None:
        """Update run history from status events (as replayed from the status topic); commit."""
        async with self._lock:
            await self._apply(partition, events)
            await self._db.commit()

    async def _apply(self, partition: int, events: Sequence[StatusEvent]) -> None:
        # Fold the batch first (a run often starts and ends within one), then write each
        # run once: replay speed is bounded by SQLite statements, not by events.
        fresh: dict[str, RunRow] = {}
        changes: dict[str, dict[str, Any]] = {}
        for event in events:
            run_id = event.run_id
            if run_id is None:
                continue
            if event.type is EventType.STARTED:
                fresh[run_id] = started_row(event, partition)
                changes.pop(run_id, None)
                continue
            change = run_change(event)
            if change is None:
                continue
            if run_id in fresh:
                fresh[run_id] = replace(fresh[run_id], **change)
            else:
                changes.setdefault(run_id, {}).update(change)
        if fresh:
            await self._upsert_runs(fresh.values(), retained=False)
        if changes:
            await self._db.executemany(
                "UPDATE runs SET status = COALESCE(?, status), ended_at = COALESCE(?, ended_at), "
                "metrics = COALESCE(?, metrics), reason = COALESCE(?, reason) WHERE run_id = ?",
                [
                    (
                        c.get("status"),
                        c["ended_at"].isoformat() if "ended_at" in c else None,
                        _dumps(c.get("metrics")),
                        c.get("reason"),
                        run_id,
                    )
                    for run_id, c in changes.items()
                ],
            )

    async def runs(
        self,
        *,
        job_type: str | None = None,
        client_id: str | None = None,
        status: RunStatus | None = None,
        limit: int | None = None,
    ) -> list[RunRow]:
        """Run history, newest first, optionally filtered."""
        clauses, params = [], []
        for column, value in (("job_type", job_type), ("client_id", client_id), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(str(value))
        sql = f"SELECT {_COLUMNS} FROM runs"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY started_at DESC, run_id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        async with self._db.execute(sql, params) as cursor:
            rows = await cursor.fetchall()
        return [_row(r) for r in rows]

    async def count_runs(self) -> int:
        """How many runs the store records."""
        async with self._db.execute("SELECT COUNT(*) FROM runs") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0

    async def run(self, run_id: str) -> RunRow | None:
        """One run by ID."""
        async with self._db.execute(
            f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", (run_id,)
        ) as cursor:
            row = await cursor.fetchone()
        return None if row is None else _row(row)


def _row(r: Any) -> RunRow:
    return RunRow(
        run_id=r[0],
        job_type=r[1],
        client_id=r[2],
        request_id=r[3],
        status=RunStatus(r[4]),
        partition=r[5],
        started_at=datetime.fromisoformat(r[6]),
        ended_at=None if r[7] is None else datetime.fromisoformat(r[7]),
        initial_data=json.loads(r[8]),
        metrics=None if r[9] is None else json.loads(r[9]),
        reason=r[10],
    )
