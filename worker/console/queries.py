"""The reading side of the console's file: the API's questions, each answered from an index.

A read-only connection of its own (WAL: readers never wait for the folding writer). Every
list is keyset-paginated, newest first: `ORDER BY started_at DESC, run_id DESC` walks one
of the console's `runs` indexes backwards from the cursor, so a page costs the same at the
first run as at the 100,000th, whatever the filters.
"""

from __future__ import annotations

import asyncio
import json
import math
import sqlite3
from collections.abc import AsyncIterator
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aiosqlite

from schemas import ENDED_STATUSES
from worker.clientkey import client_clause, register_key_async
from worker.console.db import DURATION
from worker.console.params import DEFAULT_LIMIT, RunFilter, make_cursor, make_type_cursor

_COLUMNS = (
    "run_id, job_type, client_id, request_id, status, partition, started_at, ended_at, "
    "initial_data, metrics, reason"
)
_EVENT_CHUNK = 1_000
_HAS_TYPE = "SELECT 1 FROM runs WHERE job_type = ? LIMIT 1"
_NEXT_TYPE = "SELECT MIN(job_type) FROM runs WHERE job_type > ?"
_COUNTS = "SELECT status, COUNT(*) FROM runs WHERE job_type = ? GROUP BY status"
_LAST_ENDED = (
    "SELECT run_id, status, started_at, ended_at FROM runs "
    "WHERE job_type = ? AND ended_at IS NOT NULL "
    "ORDER BY started_at DESC, run_id DESC LIMIT ?"
)
_ENDED = frozenset(s.value for s in ENDED_STATUSES)


def _duration(started_at: str, ended_at: str | None) -> float | None:
    if ended_at is None:
        return None
    seconds = (
        datetime.fromisoformat(ended_at) - datetime.fromisoformat(started_at)
    ).total_seconds()
    return round(seconds, 6)


def run_json(r: Any) -> dict[str, Any]:
    """A `runs` row (`_COLUMNS`) as the API shows it."""
    return {
        "run_id": r[0],
        "job_type": r[1],
        "client_id": r[2],
        "request_id": r[3],
        "status": r[4],
        "partition": r[5],
        "started_at": r[6],
        "ended_at": r[7],
        "duration_s": _duration(r[6], r[7]),
        "initial_data": json.loads(r[8]),
        "metrics": None if r[9] is None else json.loads(r[9]),
        "reason": r[10],
    }


def event_json(topic: str, seq: int, partition: int, offset: int, body: str) -> dict[str, Any]:
    """A stored status event as a run's history shows it."""
    event = json.loads(body)
    return {
        "seq": seq,
        "event_id": event.get("event_id"),
        "type": event.get("type"),
        "status": event.get("status"),
        "from_status": event.get("from_status"),
        "occurred_at": event.get("occurred_at"),
        "request_id": event.get("request_id"),
        "reason": event.get("reason"),
        "metrics": event.get("metrics"),
        "source": event.get("source"),
        "record": {"topic": topic, "partition": partition, "offset": offset},
    }


def _where(f: RunFilter, after: tuple[str, str] | None) -> tuple[str, list[Any]]:
    clauses: list[str] = []
    params: list[Any] = []
    for column, value in (("job_type", f.job_type), ("status", f.status)):
        if value is not None:
            clauses.append(f"{column} = ?")
            params.append(str(value))
    if f.client_id is not None:
        # As the worker compares client IDs (`Acme` and `acme` are one client), on the
        # indexes of `lower(client_id)`.
        clause, key = client_clause(f.client_id)
        clauses.append(clause)
        params.append(key)
    if f.since is not None:
        clauses.append("started_at >= ?")
        params.append(f.since)
    if f.until is not None:
        clauses.append("started_at < ?")
        params.append(f.until)
    if after is not None:
        clauses.append("(started_at, run_id) < (?, ?)")
        params.extend(after)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", params


def _type_page(
    db: sqlite3.Connection, job_type: str | None, limit: int, after: str | None
) -> tuple[list[str], str | None]:
    """A page of job type names, by name, after `after` (or only `job_type`), and the cursor
    of the next page (None on the last). Each name is one seek in the job type index, so a
    page costs the same whatever the runs of the types before it."""
    if job_type is not None:
        return ([job_type] if db.execute(_HAS_TYPE, [job_type]).fetchone() else []), None
    names: list[str] = []
    last = "" if after is None else after  # no job type is empty
    while len(names) <= limit and (name := db.execute(_NEXT_TYPE, [last]).fetchone()[0]):
        names.append(name)
        last = name
    if len(names) <= limit:
        return names, None
    return names[:limit], make_type_cursor(names[limit - 1])


def _job_types(
    uri: str, job_type: str | None, limit: int, after: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    db = sqlite3.connect(uri, uri=True, timeout=10.0)
    try:
        names, following = _type_page(db, job_type, limit, after)
        return [_summary(db, name) for name in names], following
    finally:
        db.close()


def _summary(db: sqlite3.Connection, job_type: str) -> dict[str, Any]:
    by_status: dict[str, int] = dict(db.execute(_COUNTS, [job_type]).fetchall())
    ended = sum(n for status, n in by_status.items() if status in _ENDED)

    def nearest_rank(fraction: float) -> float | None:
        if not ended:
            return None
        row = db.execute(
            f"SELECT {DURATION} FROM runs WHERE job_type = ? AND ended_at IS NOT NULL "
            f"ORDER BY {DURATION} LIMIT 1 OFFSET ?",
            [job_type, max(0, math.ceil(fraction * ended) - 1)],
        ).fetchone()
        return None if row is None or row[0] is None else round(float(row[0]), 3)

    last = db.execute(
        "SELECT run_id, status, started_at, ended_at FROM runs WHERE job_type = ? "
        "ORDER BY started_at DESC, run_id DESC LIMIT 1",
        [job_type],
    ).fetchone()
    return {
        "job_type": job_type,
        "runs": sum(by_status.values()),
        "running": by_status.get("RUNNING", 0),
        "queued": by_status.get("QUEUED", 0),
        "completed": by_status.get("COMPLETED", 0),
        "failures": by_status.get("FAILED", 0),
        "timeouts": by_status.get("TIMED_OUT", 0),
        "cancelled": by_status.get("CANCELLED", 0),
        "median_duration_s": nearest_rank(0.5),
        "p95_duration_s": nearest_rank(0.95),
        "last_run": None
        if last is None
        else dict(zip(("run_id", "status", "started_at", "ended_at"), last, strict=True)),
    }


def _durations(
    uri: str, job_type: str | None, limit: int, types: int, after: str | None
) -> tuple[list[dict[str, Any]], str | None]:
    db = sqlite3.connect(uri, uri=True, timeout=10.0)
    try:
        names, following = _type_page(db, job_type, types, after)
        found = []
        for name in names:
            rows = db.execute(_LAST_ENDED, [name, limit]).fetchall()
            runs = [
                {
                    "run_id": run_id,
                    "status": status,
                    "started_at": started_at,
                    "ended_at": ended_at,
                    "duration_s": _duration(started_at, ended_at),
                }
                for run_id, status, started_at, ended_at in reversed(rows)
            ]
            found.append({"job_type": name, "runs": runs})
        return found, following
    finally:
        db.close()


class Queries:
    """The API's reads. `await Queries.open(path, topic)`; `close()`."""

    def __init__(self, db: aiosqlite.Connection, topic: str, uri: str) -> None:
        self._db = db
        self.topic = topic
        self._uri = uri

    @classmethod
    async def open(cls, path: Path, topic: str) -> Queries:
        """A read-only connection to the console's file (made by `ConsoleDb.open`)."""
        uri = f"file:{quote(str(path))}?mode=ro"
        db = await aiosqlite.connect(uri, uri=True, timeout=10.0)
        await db.execute("PRAGMA query_only = 1")
        await register_key_async(db)
        return cls(db, topic, uri)

    async def close(self) -> None:
        """Close the connection."""
        await self._db.close()

    async def runs(
        self, f: RunFilter, limit: int, after: tuple[str, str] | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of runs passing `f`, newest first, after the cursor position `after`; and
        the cursor of the next page (None on the last)."""
        where, params = _where(f, after)
        sql = f"SELECT {_COLUMNS} FROM runs{where} ORDER BY started_at DESC, run_id DESC LIMIT ?"
        rows = list(await self._db.execute_fetchall(sql, [*params, limit + 1]))
        page = [run_json(r) for r in rows[:limit]]
        more = len(rows) > limit
        return page, make_cursor(page[-1]["started_at"], page[-1]["run_id"]) if more else None

    async def explain_runs(self, f: RunFilter, after: tuple[str, str] | None = None) -> str:
        """SQLite's plan for `runs(f, ...)` (the tests check that an index serves it)."""
        where, params = _where(f, after)
        sql = f"SELECT {_COLUMNS} FROM runs{where} ORDER BY started_at DESC, run_id DESC LIMIT 51"
        rows = await self._db.execute_fetchall(f"EXPLAIN QUERY PLAN {sql}", params)
        return "\n".join(str(r[3]) for r in rows)

    async def run_row(self, run_id: str) -> dict[str, Any] | None:
        """One run, without its events; None when unknown."""
        rows = list(
            await self._db.execute_fetchall(
                f"SELECT {_COLUMNS} FROM runs WHERE run_id = ?", [run_id]
            )
        )
        return run_json(rows[0]) if rows else None

    async def run(self, run_id: str) -> dict[str, Any] | None:
        """One run with every status event that named it, in order; None when unknown."""
        found = await self.run_row(run_id)
        if found is None:
            return None
        events = await self._db.execute_fetchall(
            "SELECT seq, partition, record_offset, body FROM console_events "
            "WHERE run_id = ? ORDER BY seq",
            [run_id],
        )
        found["events"] = [event_json(self.topic, *e) for e in events]
        return found

    async def job_types(
        self, job_type: str | None = None, limit: int = DEFAULT_LIMIT, after: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of job types by name, after the job type `after` (or only `job_type`): runs,
        how they ended, median and p95 duration (nearest rank, over ended runs, start to
        end), and the last run to start; and the cursor of the next page (None on the last).

        Its statements run one after another in a thread with a connection of their own:
        a few index lookups a job type are cheap in SQLite and dear as trips to a thread.
        """
        return await asyncio.to_thread(_job_types, self._uri, job_type, limit, after)

    async def durations(
        self, job_type: str | None, limit: int, types: int = DEFAULT_LIMIT, after: str | None = None
    ) -> tuple[list[dict[str, Any]], str | None]:
        """A page of `types` job types by name, after `after` (or only `job_type`), each with
        its last `limit` ended runs by start, oldest first, and their durations (what the page
        charts); and the cursor of the next page."""
        return await asyncio.to_thread(_durations, self._uri, job_type, limit, types, after)

    async def events_after(self, seq: int) -> AsyncIterator[list[Any]]:
        """Stored events after stream ID `seq`, in order, a chunk at a time:
        (seq, partition, offset, job_type, status, client_id, occurred_at, body)."""
        while True:
            rows = list(
                await self._db.execute_fetchall(
                    "SELECT seq, partition, record_offset, job_type, status, client_id, "
                    "occurred_at, body FROM console_events WHERE seq > ? ORDER BY seq LIMIT ?",
                    [seq, _EVENT_CHUNK],
                )
            )
            if not rows:
                return
            yield rows
            seq = rows[-1][0]
