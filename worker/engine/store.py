"""SQLite store (aiosqlite, WAL): run history, each job type's core state, applied offsets.

Run rows come from status events through the core's `new_row` and `run_change`, whether
the events were just decided or are being replayed from the status topic (`fold_events`),
so a store rebuilt from the decision log equals the live one by construction. Rows are
tagged with their partition. Job states are kept as `worker.engine.stored` says: a head
row and one row per window entry. The file's schema and opening are `worker.engine.sqlfile`;
the worker's committed batches go through the write-behind queue (`worker.engine.writer`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite

from schemas import RunStatus, StatusEvent
from worker.clientkey import client_clause, register_key_async
from worker.core.lifecycle import JobState, load_state
from worker.core.runs import RunRow, new_row, run_change
from worker.engine import stored
from worker.engine.sqlfile import (
    BUSY,
    CHANGED,
    CHUNK,
    COLUMNS,
    JOB_ENTRIES,
    PARTITION_ENTRIES,
    PUT_ENTRY,
    PUT_OFFSET,
    PUT_STATE,
    SCHEMA_VERSION,
    UPDATE_RUN,
    UPSERT_RUN,
    DamagedFile,
    StoreError,
    chunks,
    hold_lock,
    lock_exists,
    open_file,
    read_states,
    release_lock,
    run_row,
    upsert_runs,
    writing,
)
from worker.engine.stored import run_params
from worker.engine.writer import WriteBehind

__all__ = [
    "SCHEMA_VERSION",
    "Abandoned",
    "DamagedFile",
    "DamagedState",
    "RunWrites",
    "Store",
    "StoreError",
    "fold_events",
]


@dataclass(slots=True)
class RunWrites:
    """Run rows folded from a batch of status events, as `Store.write_runs` writes them."""

    fresh: dict[str, list[Any]] = field(default_factory=dict)  # `UPSERT_RUN` parameters
    changes: list[tuple[Any, ...]] = field(default_factory=list)  # `UPDATE_RUN` parameters


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
            fresh[run_id] = run_params(created, retained=False)
            continue
        change = run_change(event)
        if change is None:
            continue
        row = fresh.get(run_id)
        if row is not None:  # started in this batch
            for name, value in change.items():
                at, _, stored = CHANGED[name]
                row[at] = None if value is None else stored(value)
            continue
        update: list[Any] = [None, None, None, None, run_id]
        for name, value in change.items():
            if value is not None:
                _, at, stored = CHANGED[name]
                update[at] = stored(value)
        writes.changes.append(tuple(update))
    return writes


class Abandoned(Exception):
    """A restore stopped on its way because its partition was revoked; nothing written."""


class DamagedState(StoreError):
    """A job state row of the file that SQLite or pydantic cannot read (a damaged byte that
    `PRAGMA quick_check` does not see, since the page itself is sound): damage of the file,
    confined to the partition's rows, which a restore from the changelog replaces."""

    def __init__(self, path: str, partition: int, job_type: str | None, error: str) -> None:
        named = "a job type" if job_type is None else f"job type {job_type!r}"
        super().__init__(
            f"the SQLite file {path} holds a damaged state of {named} on partition "
            f"{partition} ({error}); move the file aside and start the worker again: every "
            "partition is restored from the changelog"
        )
        self.path = path
        self.partition = partition
        self.job_type = job_type
        self.error = error


class Store:
    """The worker's SQLite file. Open with `await Store.open(path)`; close with `close()`."""

    def __init__(self, db: aiosqlite.Connection, path: str, lock: int | None = None) -> None:
        self._db = db
        self._path = path
        self._lock_fd = lock  # `<path>.lock`, held while open (a worker's store)
        # Each SQLite transaction is a sequence of awaits on one connection (queued writes,
        # a restore, replay), so they must not interleave.
        self._lock = asyncio.Lock()
        # Committed batches queued for writing (`WriteBehind.record_batch`).
        self.writes = WriteBehind(db, path, self._lock)
        # `load_states` reads through a connection (and thread) of its own, so a batch that
        # needs states does not queue behind the writes (WAL readers never wait for them).
        self._reader: aiosqlite.Connection | None = None
        self._reader_opening = asyncio.Lock()

    @classmethod
    async def open(cls, path: Path | str, *, exclusive: bool = False) -> Store:
        """Open (creating if needed) the store at `path`, in WAL mode.

        `exclusive` is the worker's open: hold `<path>.lock` until `close`, check every page,
        and move a damaged file aside to start empty. Otherwise (readers, replay) a damaged
        file is refused. Either way a file from a newer schema version is refused, untouched;
        every refusal is a `StoreError`.
        """
        path = Path(path)
        made = not lock_exists(path)
        lock = hold_lock(path) if exclusive else None
        try:
            db = await open_file(path, repair=exclusive)
        except BaseException:
            if lock is not None:
                # A path refused leaves no lock file this open made.
                release_lock(path, lock, remove=made)
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
                    release_lock(Path(self._path), self._lock_fd, remove=False)
                    self._lock_fd = None

    async def busy_states(self, partition: int) -> dict[str, JobState]:
        """The state of each job type of `partition` that has an active or queued run.

        SQLite looks into each state's JSON, so the idle ones (nearly all, with a long
        history) are neither sent over nor parsed. A state SQLite cannot read as JSON, or
        pydantic as a job state, raises `DamagedState` naming its job type.
        """
        try:
            found = await read_states(self._db, f"partition = ? AND ({BUSY})", [partition])
        except sqlite3.OperationalError as exc:
            if "JSON" not in str(exc):  # locked, busy, I/O: not the file's content
                raise
            async with self._db.execute(
                "SELECT job_type FROM job_states "
                "WHERE partition = ? AND NOT json_valid(CAST(state AS TEXT))",
                (partition,),
            ) as cursor:
                row = await cursor.fetchone()
            named = None if row is None else str(row[0])
            raise DamagedState(self._path, partition, named, str(exc)) from exc
        states = {}
        for job_type, state in found.items():
            try:
                states[job_type] = load_state(state)
            except ValueError as exc:  # pydantic's ValidationError among them
                error = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
                raise DamagedState(self._path, partition, job_type, error) from exc
        return states

    async def job_types(self, partition: int) -> AsyncIterator[list[str]]:
        """Every job type recorded on `partition`, a chunk at a time."""
        async with self._db.execute(
            "SELECT job_type FROM job_states WHERE partition = ?", (partition,)
        ) as cursor:
            while rows := await cursor.fetchmany(CHUNK):
                yield [job_type for (job_type,) in rows]

    async def load_states(self, job_types: Iterable[str]) -> dict[str, JobState | bytes]:
        """The state of those of `job_types` that have one: as queued (a `JobState`), or
        serialized (`dump_state`'s shape) from the file.

        Queued states count: the latest queued or being-written state wins over the file's.
        """
        found: dict[str, JobState | bytes] = {}
        rest: list[str] = []
        for job_type in job_types:
            if (queued := self.writes.queued_state(job_type)) is not None:
                found[job_type] = queued
            else:
                rest.append(job_type)
        if not rest:
            return found
        reader = await self._reading_connection()
        # What is not queued was committed before this call (`writing` is cleared only after
        # the commit), so the reader's snapshot has it.
        for i in range(0, len(rest), 500):
            chunk = rest[i : i + 500]
            marks = ", ".join("?" * len(chunk))
            found.update(await read_states(reader, f"job_type IN ({marks})", chunk))
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

    async def identity(self) -> str:
        """This file's worker ID, made (random) the first time it is asked for: a worker
        restarted on its file is the same worker to the broker (its transactional ID)."""
        async with self._lock:
            async with self._db.execute("SELECT id FROM worker_identity") as cursor:
                row = await cursor.fetchone()
            if row is not None:
                return str(row[0])
            made = uuid.uuid4().hex
            await self._db.execute("INSERT INTO worker_identity (id) VALUES (?)", (made,))
            await self._db.commit()
            return made

    async def partitions_decided_with(self, partitions: int) -> int:
        """The topics' partition count this file's rows were decided with: `partitions`,
        recorded now, the first time it is asked; afterwards as recorded, which the caller
        compares with the topics' count."""
        async with self._lock:
            async with self._db.execute("SELECT partitions FROM decided_with") as cursor:
                row = await cursor.fetchone()
            if row is not None:
                return int(row[0])
            await self._db.execute(
                "INSERT INTO decided_with (partitions) VALUES (?)", (partitions,)
            )
            await self._db.commit()
            return partitions

    async def flush(self) -> None:
        """Wait until every queued batch is written; raise the error of a failed write."""
        await self.writes.flush()

    @property
    def failure(self) -> BaseException | None:
        """The error of the last queued write, if it failed (nothing queued is written after)."""
        return self.writes.failure

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
        async with self._lock, writing(self._db, self._path):
            await self._db.execute(PARTITION_ENTRIES, (partition,))
            await self._db.execute("DELETE FROM job_states WHERE partition = ?", (partition,))
            await self._db.execute("UPDATE runs SET retained = 0 WHERE partition = ?", (partition,))
            try:
                for chunk in chunks(runs, CHUNK):
                    if wanted is not None:
                        wanted()
                    await upsert_runs(self._db, chunk, retained=True)
                cursor = await self._db.execute(
                    "DELETE FROM runs WHERE partition = ? AND retained = 0 AND status IN (?, ?)",
                    (partition, RunStatus.RUNNING, RunStatus.QUEUED),
                )
                stale = cursor.rowcount
                for some in chunks(states, CHUNK):
                    await self._db.executemany(
                        PUT_STATE, [(job_type, partition, head) for job_type, head, _ in some]
                    )
                    await self._db.executemany(  # a job type that moved here from another
                        JOB_ENTRIES, [(job_type,) for job_type, _, _ in some]
                    )
                    await self._db.executemany(
                        PUT_ENTRY,
                        [(job_type, *e) for job_type, _, entries in some for e in entries],
                    )
            except (Abandoned, ValueError):  # stopped, or a damaged state: nothing written
                await self._db.rollback()
                raise
            await self._db.execute("DELETE FROM applied_offsets WHERE partition = ?", (partition,))
            await self._put_offsets(partition, next_offsets)
            await self._db.commit()
        return stale

    async def _put_offsets(self, partition: int, next_offsets: Mapping[str, int]) -> None:
        await self._db.executemany(
            PUT_OFFSET, [(topic, partition, offset) for topic, offset in next_offsets.items()]
        )

    async def active_runs(self, partition: int) -> list[RunRow]:
        """The rows of `partition`'s running and queued runs."""
        async with self._db.execute(
            f"SELECT {COLUMNS} FROM runs WHERE partition = ? AND retained = 1 AND status IN (?, ?)",
            (partition, RunStatus.RUNNING, RunStatus.QUEUED),
        ) as cursor:
            return [run_row(r) async for r in cursor]

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
            while rows := await cursor.fetchmany(CHUNK):
                yield [(datetime.fromisoformat(ended), run_id) for ended, run_id in rows]

    async def write_runs(self, writes: RunWrites) -> None:
        """Write rows folded by `fold_events`, in one SQLite transaction."""
        async with self._lock:
            # Replay processes share the file: take the write lock first (waiting for
            # another's transaction) rather than upgrade a read, which fails at once when
            # another process wrote in between.
            await self._db.execute("BEGIN IMMEDIATE")
            if writes.fresh:
                await self._db.executemany(UPSERT_RUN, writes.fresh.values())
            if writes.changes:
                await self._db.executemany(UPDATE_RUN, writes.changes)
            await self._db.commit()

    async def runs(
        self,
        *,
        job_type: str | None = None,
        client_id: str | None = None,
        status: RunStatus | None = None,
        since: datetime | None = None,
        limit: int | None = None,
    ) -> list[RunRow]:
        """Run history, newest first, optionally filtered; `since` keeps the runs started
        at or after it (an aware time). SQLite filters and limits, so a long history is not
        read whole for the last few runs."""
        clauses, params = [], []
        for column, value in (("job_type", job_type), ("status", status)):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(str(value))
        if client_id is not None:
            # As the worker compares client IDs: `Acme` and `acme` are one client.
            clause, key = client_clause(client_id)
            await register_key_async(self._db)
            clauses.append(clause)
            params.append(key)
        if since is not None:
            # Start times are stored as UTC ISO strings, which sort as text.
            clauses.append("started_at >= ?")
            params.append(since.astimezone(UTC).isoformat())
        sql = f"SELECT {COLUMNS} FROM runs"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY started_at DESC, run_id DESC"
        if limit is not None:
            sql += f" LIMIT {int(limit)}"
        async with self._db.execute(sql, params) as cursor:
            rows = await cursor.fetchall()
        return [run_row(r) for r in rows]

    async def count_runs(self) -> int:
        """How many runs the store records."""
        async with self._db.execute("SELECT COUNT(*) FROM runs") as cursor:
            row = await cursor.fetchone()
        return int(row[0]) if row else 0
