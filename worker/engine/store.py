"""SQLite store (aiosqlite, WAL): run history, each job type's core state, applied offsets.

Run rows come from status events through the core's `new_row` and `run_change`, whether
the events were just decided or are being replayed from the status topic (`fold_events`),
so a store rebuilt from the decision log equals the live one by construction. Rows are
tagged with their partition.

The file carries its schema version (`PRAGMA user_version`, `SCHEMA_VERSION`). The worker
opens it `exclusive`ly: it locks `<file>.lock` (one worker per file), checks the whole file
(`PRAGMA quick_check`), and moves a damaged one aside (`<file>.damaged-<UTC time>`, with its
-wal and -shm) to start empty: the file holds only a prefix of what Kafka committed, so
every partition is then restored from the changelog. A file from a newer schema version,
or locked by another worker, is refused with a `StoreError`, left as it is. A failed write
raises a `StoreError` too; nothing queued after it is written.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import json
import os
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import structlog
from pydantic_core import to_json

from schemas import RunStatus, StatusEvent
from worker.core.lifecycle import JobState, load_state
from worker.core.runs import RunRow, new_row, run_change
from worker.engine import stored

log = structlog.get_logger("worker")

# `PRAGMA user_version` of the files this code writes. A file reading 0 is new, or was made
# before versions were recorded (with version 1's schema); it is stamped on open. Version 2
# keeps each job state's window entries as rows (`worker.engine.stored`); a version 1 file
# is converted when it is opened (`_migrate`).
SCHEMA_VERSION = 2

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
-- a job state's window entries (`worker.engine.stored`): kind d (idempotency), e (ended runs)
CREATE TABLE IF NOT EXISTS window_entries (
    job_type TEXT NOT NULL,
    kind     TEXT NOT NULL,
    number   INTEGER NOT NULL,
    entry    BLOB NOT NULL,
    PRIMARY KEY (job_type, kind, number)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS applied_offsets (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""

# A job state's JSON with an active or queued run (`dump_state` writes both lists).
_BUSY = (
    "json_array_length(CAST(state AS TEXT), '$.active') > 0 "
    "OR json_array_length(CAST(state AS TEXT), '$.queue') > 0"
)
_CHUNK = 5_000  # rows a time when a partition's history is read or restored


T = TypeVar("T")


def _chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# How long a statement waits for another connection's write lock (a replay process's
# transaction, a restore) before failing.
_BUSY_TIMEOUT_S = 60.0
_PUT_STATE = (
    "INSERT INTO job_states (job_type, partition, state) VALUES (?, ?, ?) "
    "ON CONFLICT (job_type) DO UPDATE SET partition = excluded.partition, state = excluded.state"
)
_PUT_ENTRY = (
    "INSERT OR REPLACE INTO window_entries (job_type, kind, number, entry) VALUES (?, ?, ?, ?)"
)
_DROP_ENTRY = "DELETE FROM window_entries WHERE job_type = ? AND kind = ? AND number = ?"
_JOB_ENTRIES = "DELETE FROM window_entries WHERE job_type = ?"
_PARTITION_ENTRIES = (
    "DELETE FROM window_entries "
    "WHERE job_type IN (SELECT job_type FROM job_states WHERE partition = ?)"
)
_PUT_OFFSET = (
    "INSERT INTO applied_offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
    "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset"
)

_COLUMNS = (
    "run_id, job_type, client_id, request_id, status, partition, started_at, ended_at, "
    "initial_data, metrics, reason"
)


def _dumps(value: object) -> str | None:
    # pydantic-core's encoder: a seventh of the stdlib's time for these small dicts. Keys keep
    # the order they arrived in, which the live worker, a restore and a replay all preserve.
    return None if value is None else to_json(value).decode()


# A run's identity columns never change; updating only the others leaves the by-type index
# alone (INSERT OR REPLACE deleted and re-inserted the row and every index entry).
_UPSERT_RUN = (
    f"INSERT INTO runs ({_COLUMNS}, retained) VALUES ({', '.join('?' * 12)}) "
    "ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, "
    "started_at = excluded.started_at, partition = excluded.partition, "
    "ended_at = excluded.ended_at, metrics = excluded.metrics, reason = excluded.reason, "
    "retained = excluded.retained"
)
_UPDATE_RUN = (
    "UPDATE runs SET status = COALESCE(?, status), ended_at = COALESCE(?, ended_at), "
    "metrics = COALESCE(?, metrics), reason = COALESCE(?, reason) WHERE run_id = ?"
)
# An ended run's row, over the row its start wrote: only the columns an end changes, so
# neither the insert's key lookup nor the other indexes are touched (half an upsert's time).
_END_RUN = (
    "UPDATE runs SET status = ?, ended_at = ?, metrics = ?, reason = ?, retained = 1 "
    "WHERE run_id = ?"
)


def _params(r: RunRow, *, retained: bool) -> list[Any]:
    """`_UPSERT_RUN` parameters of a row."""
    return [
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
    ]


# Each `run_change` field: its position in an `_UPSERT_RUN` row and in an `_UPDATE_RUN` one,
# and how it is stored.
_CHANGED: dict[str, tuple[int, int, Callable[[Any], Any]]] = {
    "status": (4, 0, str),
    "ended_at": (7, 1, datetime.isoformat),
    "metrics": (9, 2, _dumps),
    "reason": (10, 3, str),
}


@dataclass(slots=True)
class RunWrites:
    """Run rows folded from a batch of status events, as `Store.write_runs` writes them."""

    fresh: dict[str, list[Any]] = field(default_factory=dict)  # `_UPSERT_RUN` parameters
    changes: list[tuple[Any, ...]] = field(default_factory=list)  # `_UPDATE_RUN` parameters


def fold_events(partition: int, events: Iterable[StatusEvent]) -> RunWrites:
    """The rows `events` write, each run once (a run often starts and ends in one batch).

    Runs started or queued in the batch become whole rows (a queued run's row is replaced
    whole when it starts); changes to runs started before it become
    updates in event order (a None keeps the column). Replay speed is bounded by this fold
    and SQLite's statements, so rows are built as plain parameter lists.
    """
    writes = RunWrites()
    fresh = writes.fresh
    for event in events:
        run_id = event.run_id
        if run_id is None:
            continue
        if (created := new_row(event, partition)) is not None:  # started or queued
            fresh[run_id] = _params(created, retained=False)
            continue
        change = run_change(event)
        if change is None:
            continue
        row = fresh.get(run_id)
        if row is not None:  # started in this batch
            for name, value in change.items():
                at, _, stored = _CHANGED[name]
                row[at] = None if value is None else stored(value)
            continue
        update: list[Any] = [None, None, None, None, run_id]
        for name, value in change.items():
            if value is not None:
                _, at, stored = _CHANGED[name]
                update[at] = stored(value)
        writes.changes.append(tuple(update))
    return writes


@dataclass
class _Pending:
    """Batches queued for writing, merged: later rows win, tombstones apply after rows."""

    runs: dict[str, RunRow] = field(default_factory=dict)
    # Runs that ended, whose start was queued before these batches: their row is in the file
    # (or is being written), so the end is written as an update (`_END_RUN`).
    ended: set[str] = field(default_factory=set)
    states: dict[str, tuple[int, JobState]] = field(default_factory=dict)  # (partition, state)
    # (job type, kind, number) -> entry JSON, or None: it left its window
    entries: dict[tuple[str, str, int], bytes | None] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition)
    tombstoned: list[str] = field(default_factory=list)


class Abandoned(Exception):
    """A restore stopped on its way because its partition was revoked; nothing written."""


class StoreError(sqlite3.DatabaseError):
    """The SQLite file cannot be used, or a write to it failed; the message is one line
    naming the file. A `sqlite3.Error`, so a batch failing with it is the machine's fault,
    never an input record's."""


class _Damaged(Exception):
    """The file is not a database, or is corrupt."""


# SQLite's primary result codes for a file that is not a database or is corrupt; anything
# else (locked, unreadable, a full disk) says nothing about the file's content.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SIDE_FILES = ("-wal", "-shm", "-journal")


def _hold_lock(path: Path) -> int:
    """Hold `<path>.lock` (flock, released when the descriptor closes): one worker per file."""
    lock = Path(f"{path}.lock")
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreError(f"cannot create the lock file {lock}: {exc.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if not isinstance(exc, BlockingIOError):
            raise StoreError(f"cannot lock {lock}: {exc.strerror}") from None
        by = f" (process {holder})" if holder.isdigit() else ""
        raise StoreError(
            f"{path} is in use by another worker: {lock} is locked{by}; "
            "give each worker a SQLite file of its own (JOBS_DB_PATH)"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


async def _prepare(db: aiosqlite.Connection, path: Path, *, check: bool) -> None:
    """Check `db`'s version (and with `check`, every page), then put the schema in place."""
    try:
        async with db.execute("PRAGMA user_version") as cursor:  # the first read of the file
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}; this build knows versions up to "
                f"{SCHEMA_VERSION}: run the build that wrote it (the file is left as it is)"
            )
        if check:
            found = [str(r[0]) for r in await db.execute_fetchall("PRAGMA quick_check")]
            if found != ["ok"]:
                raise _Damaged("; ".join(found[:3]))
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(_SCHEMA)
        if version < SCHEMA_VERSION:
            await db.execute("BEGIN IMMEDIATE")
            await _migrate(db, path)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.commit()
    except StoreError:
        raise
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorcode & 0xFF in _DAMAGE_CODES:
            raise _Damaged(str(exc)) from exc
        raise StoreError(f"cannot open the SQLite file {path}: {exc}") from exc


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Version 1 to 2: each job state whose windows are numbered keeps its head in
    `job_states` and its entries as rows; one that does not validate, or is not numbered
    yet, stays whole (`stored.split`), as a version 2 file may hold it."""
    moved, after = 0, ""
    while chunk := list(
        await db.execute_fetchall(  # a chunk at a time: states may be large
            "SELECT job_type, state FROM job_states WHERE job_type > ? ORDER BY job_type LIMIT ?",
            (after, _CHUNK),
        )
    ):
        after = chunk[-1][0]
        heads: list[tuple[bytes, str]] = []
        entries: list[tuple[str, str, int, bytes]] = []
        for job_type, state in chunk:
            try:
                head, found = stored.split(bytes(state))
            except ValueError:
                continue
            if found:
                heads.append((head, job_type))
                entries.extend((job_type, kind, number, e) for kind, number, e in found)
        await db.executemany("UPDATE job_states SET state = ? WHERE job_type = ?", heads)
        await db.executemany(_PUT_ENTRY, entries)
        moved += len(heads)
    if moved:
        log.info(
            "SQLite file converted to schema version 2: window entries as rows",
            path=str(path),
            job_types=moved,
        )


async def _connect(path: Path, *, check: bool) -> aiosqlite.Connection:
    """A connection to `path` with the schema in place; `_Damaged` or `StoreError` if not."""
    db = await aiosqlite.connect(str(path), timeout=_BUSY_TIMEOUT_S)
    try:
        await _prepare(db, path, check=check)
    except BaseException:
        await db.close()
        raise
    return db


def _move_aside(path: Path) -> Path:
    """Rename `path` (its -wal, -shm and -journal first) to `<path>.damaged-<UTC time>`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for n in itertools.count(1):
        if not any(Path(f"{target}{s}").exists() for s in ("", *_SIDE_FILES)):
            break
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    # Side files first: a main file left without its WAL is an older, consistent snapshot
    # (behind Kafka, so restored), where a WAL left without its file would be read into a
    # new one.
    for suffix in (*_SIDE_FILES, ""):
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(f"{target}{suffix}")
    return target


async def _open_file(path: Path, *, repair: bool) -> aiosqlite.Connection:
    """Connect to `path`; with `repair`, check every page and move a damaged file aside."""
    try:
        return await _connect(path, check=repair)
    except _Damaged as damage:
        if not repair:
            raise StoreError(
                f"{path} is damaged ({damage}); a worker started on it moves it aside and "
                "restores its partitions from the changelog"
            ) from None
        reason = str(damage)
    moved = _move_aside(path)
    log.warning(
        "the SQLite file is damaged: moved it aside and started an empty one; every "
        "partition is restored from the changelog",
        path=str(path),
        moved_to=str(moved),
        error=reason,
    )
    return await _connect(path, check=False)


@contextlib.asynccontextmanager
async def _writing(db: aiosqlite.Connection, path: str) -> AsyncIterator[None]:
    """A transaction of the worker's on `db`: rolled back if it fails, raised as a
    `StoreError` (disk full, I/O error, corruption found while writing)."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        with contextlib.suppress(sqlite3.Error, ValueError):
            await db.rollback()
        raise StoreError(
            f"writing the SQLite file {path} failed ({exc}); the worker stops without "
            "committing more to Kafka, and its next start restores what the file lacks from "
            "the changelog"
        ) from exc


async def _read_states(db: aiosqlite.Connection, where: str, params: list[Any]) -> dict[str, bytes]:
    """The JSON (`dump_state`'s shape) of the job states `where` selects, from their heads
    and window entries, read in one statement (one snapshot, one trip to `db`'s thread)."""
    rows = await db.execute_fetchall(
        f"WITH h AS (SELECT job_type, state FROM job_states WHERE {where}) "
        "SELECT job_type, '', 0, state FROM h UNION ALL "
        "SELECT job_type, kind, number, entry FROM window_entries JOIN h USING (job_type) "
        "ORDER BY 1, 2, 3",
        params,
    )
    found: dict[str, bytes] = {}
    entries: list[tuple[str, bytes]] = []
    job_type = ""
    for name, kind, _, value in rows:
        if not kind:  # a head: the entries of the one before are complete
            if entries:
                found[job_type] = stored.whole(found[job_type], entries)
                entries = []
            job_type = name
            found[name] = bytes(value)
        else:
            entries.append((kind, bytes(value)))
    if entries:
        found[job_type] = stored.whole(found[job_type], entries)
    return found


class Store:
    """The worker's SQLite file. Open with `await Store.open(path)`; close with `close()`."""

    def __init__(self, db: aiosqlite.Connection, path: str, lock: int | None = None) -> None:
        self._db = db
        self._path = path
        self._lock_fd = lock  # `<path>.lock`, held while open (a worker's store)
        # Each SQLite transaction is a sequence of awaits on one connection (queued writes,
        # a restore, replay), so they must not interleave.
        self._lock = asyncio.Lock()
        self._pending: _Pending | None = None
        self._writing: _Pending | None = None  # being written by `_write_pending`
        # `load_states` reads through a connection (and thread) of its own, so a batch that
        # needs states does not queue behind the writes (WAL readers never wait for them).
        self._reader: aiosqlite.Connection | None = None
        self._reader_opening = asyncio.Lock()
        self._writer: asyncio.Task[None] | None = None

    @classmethod
    async def open(cls, path: Path | str, *, exclusive: bool = False) -> Store:
        """Open (creating if needed) the store at `path`, in WAL mode.

        `exclusive` is the worker's open: hold `<path>.lock` until `close`, check every page,
        and move a damaged file aside to start empty. Otherwise (readers, replay) a damaged
        file is refused. Either way a file from a newer schema version is refused, untouched;
        every refusal is a `StoreError`.
        """
        path = Path(path)
        lock = _hold_lock(path) if exclusive else None
        try:
            db = await _open_file(path, repair=exclusive)
        except BaseException:
            if lock is not None:
                os.close(lock)
            raise
        return cls(db, str(path), lock)

    async def close(self) -> None:
        """Write what is queued, then close (after a restore's write in progress)."""
        try:
            await self.flush()
        finally:
            try:
                if self._reader is not None:
                    await self._reader.close()
                async with self._lock:
                    await self._db.close()
            finally:
                if self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    async def busy_states(self, partition: int) -> dict[str, JobState]:
        """The state of each job type of `partition` that has an active or queued run.

        SQLite looks into each state's JSON, so the idle ones (nearly all, with a long
        history) are neither sent over nor parsed.
        """
        found = await _read_states(self._db, f"partition = ? AND ({_BUSY})", [partition])
        return {job_type: load_state(state) for job_type, state in found.items()}

    async def job_types(self, partition: int) -> AsyncIterator[list[str]]:
        """Every job type recorded on `partition`, a chunk at a time."""
        async with self._db.execute(
            "SELECT job_type FROM job_states WHERE partition = ?", (partition,)
        ) as cursor:
            while rows := await cursor.fetchmany(_CHUNK):
                yield [job_type for (job_type,) in rows]

    async def load_states(self, job_types: Iterable[str]) -> dict[str, JobState | bytes]:
        """The state of those of `job_types` that have one: as queued (a `JobState`), or
        serialized (`dump_state`'s shape) from the file.

        Queued states count: the latest queued or being-written state wins over the file's.
        """
        found: dict[str, JobState | bytes] = {}
        rest: list[str] = []
        for job_type in job_types:
            for queued in (self._pending, self._writing):
                if queued is not None and job_type in queued.states:
                    found[job_type] = queued.states[job_type][1]
                    break
            else:
                rest.append(job_type)
        if not rest:
            return found
        reader = await self._reading_connection()
        # What is not queued was committed before this call (`_writing` is cleared only after
        # the commit), so the reader's snapshot has it.
        for i in range(0, len(rest), 500):
            chunk = rest[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            found.update(await _read_states(reader, f"job_type IN ({marks})", chunk))
        return found

    async def _reading_connection(self) -> aiosqlite.Connection:
        # Opened once, under a lock: two batches asking at once must not both open one (an
        # unclosed connection's thread would keep the process from exiting).
        async with self._reader_opening:
            if self._reader is None:
                self._reader = await aiosqlite.connect(self._path)
            return self._reader

    async def applied_offsets(self, partition: int) -> dict[str, int]:
        """Topic -> next offset to apply, for input topics of `partition`."""
        async with self._db.execute(
            "SELECT topic, next_offset FROM applied_offsets WHERE partition = ?", (partition,)
        ) as cursor:
            return {topic: offset async for topic, offset in cursor}

    def record_batch(
        self,
        partition: int,
        runs: Iterable[RunRow],
        states: Iterable[tuple[str, JobState]],
        next_offsets: Mapping[str, int],
        tombstoned: Iterable[str] = (),
        entries: Iterable[tuple[str, bytes, int, bytes | None]] = (),
    ) -> None:
        """Queue one processed batch of `partition` for writing; `flush` waits for it.

        `states` are the job states the batch changed, `entries` the window changes they
        took: (job type, kind, number, entry JSON or None: it left), `changelog.Change`s.

        Batches queued while a write is in progress are merged (later rows win) and written
        together in one SQLite transaction, with their applied offsets, so the file always
        holds a prefix of what was committed to Kafka.
        """
        if (failure := self.failure) is not None:
            raise failure  # a write failed: what follows it must not be written either
        pending = self._pending
        if pending is None:
            pending = self._pending = _Pending()
        held = pending.runs
        for row in runs:
            run_id = row.run_id
            if row.ended_at is not None and run_id not in held:
                pending.ended.add(run_id)
            held[run_id] = row
        for job_type, state in states:
            pending.states[job_type] = (partition, state)
        queued = pending.entries
        for job_type, kind, number, entry in entries:
            queued[(job_type, kind.decode(), number)] = entry
        for topic, offset in next_offsets.items():
            pending.offsets[(topic, partition)] = offset
        pending.tombstoned.extend(tombstoned)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write_pending())

    async def flush(self) -> None:
        """Wait until every queued batch is written; raise the error of a failed write."""
        while self._writer is not None:
            writer = self._writer
            await asyncio.shield(writer)  # raises the writer's error
            if self._writer is writer:
                return

    @property
    def backlog(self) -> int:
        """Rows queued and not yet being written."""
        pending = self._pending
        return 0 if pending is None else len(pending.runs) + len(pending.states)

    @property
    def failure(self) -> BaseException | None:
        """The error of the last queued write, if it failed (nothing queued is written after)."""
        writer = self._writer
        if writer is None or not writer.done() or writer.cancelled():
            return None
        return writer.exception()

    async def _write_pending(self) -> None:
        while (pending := self._pending) is not None:
            self._pending = None
            self._writing = pending
            async with self._lock, _writing(self._db, self._path):
                await self._write_runs(pending)
                if pending.tombstoned:
                    await self._db.executemany(
                        "UPDATE runs SET retained = 0 WHERE run_id = ?",
                        [(r,) for r in pending.tombstoned],
                    )
                await self._db.executemany(
                    _PUT_STATE,
                    [(j, p, stored.head(state)) for j, (p, state) in pending.states.items()],
                )
                await self._write_entries(pending.entries)
                await self._db.executemany(
                    _PUT_OFFSET, [(t, p, o) for (t, p), o in pending.offsets.items()]
                )
                await self._db.commit()
            self._writing = None

    async def _write_entries(self, entries: Mapping[tuple[str, str, int], bytes | None]) -> None:
        if not entries:
            return
        gone = [key for key, entry in entries.items() if entry is None]
        if gone:
            await self._db.executemany(_DROP_ENTRY, gone)
        await self._db.executemany(
            _PUT_ENTRY, [(*key, entry) for key, entry in entries.items() if entry is not None]
        )

    async def _write_runs(self, pending: _Pending) -> None:
        """The queued run rows: whole, or as an end over the row of a run's start."""
        ended = pending.ended
        rows = pending.runs
        await self._upsert_runs(
            (row for run_id, row in rows.items() if run_id not in ended), retained=True
        )
        if not ended:
            return
        ends = [rows[run_id] for run_id in ended]
        cursor = await self._db.executemany(
            _END_RUN,
            [
                (
                    r.status,
                    r.ended_at.isoformat() if r.ended_at else None,
                    _dumps(r.metrics),
                    r.reason,
                    r.run_id,
                )
                for r in ends
            ],
        )
        if cursor.rowcount < len(ends):
            # A run started and ended in one batch has no row yet: write the ends whole
            # (an upsert leaves the rows that were updated as they are now).
            await self._upsert_runs(ends, retained=True)

    async def replace_partition(
        self,
        partition: int,
        states: Iterable[tuple[str, bytes, list[stored.Entry]]],
        runs: Iterable[RunRow],
        next_offsets: Mapping[str, int],
        wanted: Callable[[], None] | None = None,
    ) -> int:
        """Replace what is known of `partition` by a snapshot restored from the changelog:
        job states as stored (job type, head JSON, window entries:
        `PartitionSnapshot.for_sqlite`) and run rows, consumed a chunk at a time.

        A run this file still shows RUNNING or QUEUED that the snapshot does not hold ended
        under another owner longer than the run retention ago (its row was tombstoned): how
        it ended is only in the status topic, so its row is deleted rather than left
        unended for ever. Returns how many were. `wanted`, called between chunks, raises
        `Abandoned` to stop; that and a state that does not validate roll the write back.
        """
        async with self._lock, _writing(self._db, self._path):
            await self._db.execute(_PARTITION_ENTRIES, (partition,))
            await self._db.execute("DELETE FROM job_states WHERE partition = ?", (partition,))
            await self._db.execute("UPDATE runs SET retained = 0 WHERE partition = ?", (partition,))
            try:
                for chunk in _chunks(runs, _CHUNK):
                    if wanted is not None:
                        wanted()
                    await self._upsert_runs(chunk, retained=True)
                cursor = await self._db.execute(
                    "DELETE FROM runs WHERE partition = ? AND retained = 0 AND status IN (?, ?)",
                    (partition, RunStatus.RUNNING, RunStatus.QUEUED),
                )
                stale = cursor.rowcount
                for some in _chunks(states, _CHUNK):
                    await self._db.executemany(
                        _PUT_STATE, [(job_type, partition, head) for job_type, head, _ in some]
                    )
                    await self._db.executemany(  # a job type that moved here from another
                        _JOB_ENTRIES, [(job_type,) for job_type, _, _ in some]
                    )
                    await self._db.executemany(
                        _PUT_ENTRY,
                        [(job_type, *e) for job_type, _, entries in some for e in entries],
                    )
            except (Abandoned, ValueError):  # stopped, or a damaged state: nothing written
                await self._db.rollback()
                raise
            await self._db.execute("DELETE FROM applied_offsets WHERE partition = ?", (partition,))
            await self._put_offsets(partition, next_offsets)
            await self._db.commit()
        return stale

    async def _upsert_runs(self, runs: Iterable[RunRow], *, retained: bool) -> None:
        await self._db.executemany(_UPSERT_RUN, [_params(r, retained=retained) for r in runs])

    async def _put_offsets(self, partition: int, next_offsets: Mapping[str, int]) -> None:
        await self._db.executemany(
            _PUT_OFFSET, [(topic, partition, offset) for topic, offset in next_offsets.items()]
        )

    async def active_runs(self, partition: int) -> list[RunRow]:
        """The rows of `partition`'s running and queued runs."""
        async with self._db.execute(
            f"SELECT {_COLUMNS} FROM runs "
            "WHERE partition = ? AND retained = 1 AND status IN (?, ?)",
            (partition, RunStatus.RUNNING, RunStatus.QUEUED),
        ) as cursor:
            return [_row(r) async for r in cursor]

    async def retained_ends(self, partition: int) -> AsyncIterator[list[tuple[datetime, str]]]:
        """(end time, run ID) of `partition`'s ended runs still in the changelog, in end order,
        a chunk at a time: their rows await a tombstone, so they may be many."""
        # The worker's times are UTC ISO strings, which sort as text; a row out of order would
        # only leave the retention list late (`runner.Retained`), never early.
        async with self._db.execute(
            "SELECT ended_at, run_id FROM runs "
            "WHERE partition = ? AND retained = 1 AND ended_at IS NOT NULL "
            "ORDER BY ended_at, run_id",
            (partition,),
        ) as cursor:
            while rows := await cursor.fetchmany(_CHUNK):
                yield [(datetime.fromisoformat(ended), run_id) for ended, run_id in rows]

    async def write_runs(self, writes: RunWrites) -> None:
        """Write rows folded by `fold_events`, in one SQLite transaction."""
        async with self._lock:
            # Replay processes share the file: take the write lock first (waiting for
            # another's transaction) rather than upgrade a read, which fails at once when
            # another process wrote in between.
            await self._db.execute("BEGIN IMMEDIATE")
            if writes.fresh:
                await self._db.executemany(_UPSERT_RUN, writes.fresh.values())
            if writes.changes:
                await self._db.executemany(_UPDATE_RUN, writes.changes)
            await self._db.commit()

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
