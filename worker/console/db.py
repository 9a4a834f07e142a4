"""The console's SQLite file: the worker's run history, folded from the whole status topic.

The file is a `Store` (the worker's schema: `runs`, `applied_offsets`, ...), written as
`replay` writes it: status events folded by `store.fold_events` and written with
`Store.write_runs`. Next to it the console keeps, in tables of its own:

- `console_events`: every status event folded, in folding order (`seq`, the ID the event
  stream gives it), with its record's coordinates, so a run's whole history can be shown
  and a reconnecting stream can be replayed;
- the status topic's next offset per partition, in the store's `applied_offsets`, written
  in the same transaction as the events; the console resumes from there;
- `console_meta`: which status topic the file follows (a file follows one fleet);
- indexes on `runs` for the API's filters, newest first (the worker's schema has only
  those the worker needs).

Runs are written before their events and offsets, in a transaction of their own: a stop in
between reads those records again, and folding them again ends in the same rows.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiosqlite

from schemas import StatusEvent
from worker.console.params import stored_time
from worker.engine.sqlfile import StoreError, hold_lock, lock_exists, release_lock
from worker.engine.store import DamagedFile, RunWrites, Store, fold_events

# An ended run's duration in seconds, as the duration index computes it (the queries must
# spell it the same way for SQLite to use the index).
DURATION = "((julianday(ended_at) - julianday(started_at)) * 86400.0)"

_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS console_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS console_events (
    seq           INTEGER PRIMARY KEY,
    partition     INTEGER NOT NULL,
    record_offset INTEGER NOT NULL,
    run_id        TEXT,
    job_type      TEXT NOT NULL,
    client_id     TEXT,
    type          TEXT NOT NULL,
    status        TEXT,
    occurred_at   TEXT NOT NULL,
    body          TEXT NOT NULL,
    UNIQUE (partition, record_offset)
);
CREATE INDEX IF NOT EXISTS console_events_by_run ON console_events (run_id, seq)
    WHERE run_id IS NOT NULL;
CREATE INDEX IF NOT EXISTS console_runs_recent ON runs (started_at, run_id);
CREATE INDEX IF NOT EXISTS console_runs_by_type ON runs (job_type, started_at, run_id);
CREATE INDEX IF NOT EXISTS console_runs_by_status ON runs (status, started_at, run_id);
CREATE INDEX IF NOT EXISTS console_runs_by_type_status
    ON runs (job_type, status, started_at, run_id);
-- client IDs are filtered as the worker compares them, in any case (`worker.clientkey`);
-- files made before that have indexes on the client ID as sent, which no query uses
DROP INDEX IF EXISTS console_runs_by_client;
DROP INDEX IF EXISTS console_runs_by_type_client;
DROP INDEX IF EXISTS console_runs_by_client_status;
DROP INDEX IF EXISTS console_runs_by_type_client_status;
CREATE INDEX IF NOT EXISTS console_runs_by_client_key
    ON runs (lower(client_id), started_at, run_id);
CREATE INDEX IF NOT EXISTS console_runs_by_type_client_key
    ON runs (job_type, lower(client_id), started_at, run_id);
CREATE INDEX IF NOT EXISTS console_runs_by_client_key_status
    ON runs (lower(client_id), status, started_at, run_id);
-- all three filters: a pair's index would walk every run of the pair to find the third
CREATE INDEX IF NOT EXISTS console_runs_by_type_client_key_status
    ON runs (job_type, lower(client_id), status, started_at, run_id);
CREATE INDEX IF NOT EXISTS console_runs_durations ON runs (job_type, {DURATION})
    WHERE ended_at IS NOT NULL;
"""

_PUT_POSITION = (
    "INSERT INTO applied_offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
    "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset"
)
_PUT_EVENT = (
    "INSERT OR IGNORE INTO console_events (seq, partition, record_offset, run_id, job_type, "
    "client_id, type, status, occurred_at, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ANALYZE_EVERY = 100_000  # events folded between two refreshes of the planner's statistics


class ConsoleError(RuntimeError):
    """The console cannot use its SQLite file; the message is one line naming it."""


@dataclass(frozen=True, slots=True)
class Folded:
    """One status event as the console folded it: its stream ID, record and event."""

    seq: int
    partition: int
    offset: int
    event: StatusEvent
    body: str  # the record's value, the event's JSON

    @property
    def occurred_at(self) -> str:
        """When it occurred, as stored (sortable text)."""
        return stored_time(self.event.occurred_at)


def _lock(path: Path) -> int:
    """Hold `<path>.lock`, the lock a worker takes on its file: one process per file."""
    try:
        return hold_lock(path, advice="give the console a SQLite file of its own (--db)")
    except StoreError as exc:
        raise ConsoleError(str(exc)) from None


class ConsoleDb:
    """The writing side: fold batches of status records into the file. `await open(...)`."""

    def __init__(self, path: Path, topic: str, store: Store, db: aiosqlite.Connection) -> None:
        self.path = path
        self.topic = topic
        self._store = store
        self._db = db
        self._lock_fd: int | None = None
        self.last_seq = 0  # the seq of the last event written
        self._since_analyze = 0

    @classmethod
    async def open(cls, path: Path, topic: str) -> ConsoleDb:
        """Open (creating) the file at `path` to follow the status topic `topic`."""
        made = not lock_exists(path)
        fd = _lock(path)
        try:
            store = await Store.open(path)
        except DamagedFile as exc:
            release_lock(path, fd, remove=made)  # a path refused leaves no lock file made
            # A console's file holds only what it folded: it can be folded again.
            raise ConsoleError(
                exc.rebuilt("the console folds the status topic again from its start")
            ) from None
        except BaseException:
            release_lock(path, fd, remove=made)
            raise
        db: aiosqlite.Connection | None = None
        try:
            db = await aiosqlite.connect(str(path), timeout=60.0)
            await db.executescript(_SCHEMA)
            await cls._claim(db, path, topic)
            await db.commit()
            console = cls(path, topic, store, db)
            console._lock_fd = fd
            async with db.execute("SELECT COALESCE(MAX(seq), 0) FROM console_events") as cur:
                row = await cur.fetchone()
            console.last_seq = int(row[0]) if row else 0
            return console
        except BaseException:
            if db is not None:
                await db.close()
            await store.close()
            release_lock(path, fd, remove=False)
            raise

    @staticmethod
    async def _claim(db: aiosqlite.Connection, path: Path, topic: str) -> None:
        """Record that the file follows `topic`; refuse a file that follows another."""
        await db.execute(
            "INSERT OR IGNORE INTO console_meta (key, value) VALUES ('status_topic', ?)", (topic,)
        )
        async with db.execute("SELECT value FROM console_meta WHERE key = 'status_topic'") as cur:
            row = await cur.fetchone()
        if row is not None and row[0] != topic:
            raise ConsoleError(
                f"{path} follows {row[0]}, not {topic}: give each prefix a console file "
                "of its own (--db)"
            )

    async def close(self) -> None:
        """Close the connections and release the file."""
        try:
            await self._db.close()
            await self._store.close()
        finally:
            if self._lock_fd is not None:
                release_lock(self.path, self._lock_fd, remove=False)
                self._lock_fd = None

    async def positions(self) -> dict[int, int]:
        """Status partition -> next offset to fold, as stored."""
        async with self._db.execute(
            "SELECT partition, next_offset FROM applied_offsets WHERE topic = ?", (self.topic,)
        ) as cursor:
            return {int(p): int(o) async for p, o in cursor}

    async def write(
        self,
        batches: Sequence[tuple[int, Sequence[tuple[int, StatusEvent, str]]]],
        positions: dict[int, int],
    ) -> list[Folded]:
        """Fold (partition, [(offset, event, body)]) batches in; store `positions` with them.

        Returns the events as folded, with their stream IDs.
        """
        writes = RunWrites()
        for partition, items in batches:
            folded = fold_events(partition, (event for _, event, _ in items))
            writes.fresh.update(folded.fresh)  # a run's events all sit in one partition
            writes.changes.extend(folded.changes)
        await self._store.write_runs(writes)
        out: list[Folded] = []
        seq = self.last_seq
        for partition, items in batches:
            for offset, event, body in items:
                seq += 1
                out.append(Folded(seq, partition, offset, event, body))
        await self._db.executemany(_PUT_EVENT, (_event_row(f) for f in out))
        await self._db.executemany(
            _PUT_POSITION, [(self.topic, p, o) for p, o in positions.items()]
        )
        await self._db.commit()
        self.last_seq = seq
        self._since_analyze += len(out)
        return out

    async def analyze(self, *, unless_fresh: bool = False) -> None:
        """Refresh the query planner's statistics (a sample of each index: fast)."""
        if unless_fresh and self._since_analyze < _ANALYZE_EVERY:
            return
        await self._db.execute("PRAGMA analysis_limit = 1000")
        await self._db.execute("ANALYZE")
        await self._db.commit()
        self._since_analyze = 0


def _event_row(f: Folded) -> tuple[Any, ...]:
    e = f.event
    status = None if e.status is None else e.status.value
    return (
        f.seq,
        f.partition,
        f.offset,
        e.run_id,
        e.job_type,
        e.client_id,
        e.type.value,
        status,
        f.occurred_at,
        f.body,
    )


def positions_after(records: Iterable[tuple[int, int]]) -> dict[int, int]:
    """(partition, offset) of records read -> the next offset of each partition."""
    after: dict[int, int] = {}
    for partition, offset in records:
        after[partition] = max(after.get(partition, 0), offset + 1)
    return after
