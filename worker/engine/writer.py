"""The store's write-behind queue: committed batches merged and written in order.

A batch is queued only after its Kafka commit; one writer task writes what accumulated in one
SQLite transaction with the batches' applied offsets, so the file always holds a prefix of
what Kafka committed. A failed write raises a `StoreError`, and nothing queued after it is
written.

A write is one trip to the store connection's thread (`sqlfile.write_in_thread`): its
statements, their parameters and the commit all run there (`_Pending.write`), so the event
loop only hands it over and is told when it is done, rather than being woken once for each
of a dozen statements.

After a write the writer waits `GATHER_S` before the next, so that at a steady trickle of
batches (at 1,000 starts/s each partition commits a batch every 10-15 ms) several share one
SQLite transaction instead of each paying for its own: the commit, the trip to the thread
and the GIL handed back and forth, on the two cores the event loop and the broker share. A
batch after a quiet spell is written at once (a failing write is known as soon as it can
be), and `flush` cuts the wait short (a batch that leaves more than `batch_max_records`
rows queued flushes, so a backlog does not wait).
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiosqlite
import structlog

from worker.core.lifecycle import JobState
from worker.core.runs import RunRow
from worker.engine import stored
from worker.engine.sqlfile import (
    DROP_ENTRY,
    END_RUN,
    END_RUNS,
    PUT_ENTRIES,
    PUT_OFFSET,
    PUT_STATE,
    PUT_STATES_IN_PLACE,
    UPDATE_FROM,
    UPSERT_RUNS,
    Many,
    write_in_thread,
)
from worker.engine.stored import NULL, dumps, run_params, status_text

log = structlog.get_logger("worker")

GATHER_S = 0.02  # how long the writer lets batches gather after a write; `flush` does not wait


@dataclass
class _Pending:
    """Batches queued for writing, merged: later rows win, tombstones apply after rows."""

    runs: dict[str, RunRow] = field(default_factory=dict)
    # Runs that ended, whose start was queued before these batches: their row is in the file
    # (or is being written), so the end is written as an update (`END_RUN`).
    ended: set[str] = field(default_factory=set)
    states: dict[str, tuple[int, JobState]] = field(default_factory=dict)  # (partition, state)
    heads: dict[str, bytes] = field(default_factory=dict)  # of `states`, where serialized
    # (job type, kind, number) -> entry JSON, or None: it left its window
    entries: dict[tuple[str, str, int], bytes | None] = field(default_factory=dict)
    offsets: dict[tuple[str, int], int] = field(default_factory=dict)  # (topic, partition)
    tombstoned: list[str] = field(default_factory=list)

    def write(self, db: sqlite3.Connection) -> None:
        """Every statement of these batches, on the connection's own thread (not committed)."""
        self._write_runs(db)
        if self.tombstoned:
            db.executemany(
                "UPDATE runs SET retained = 0 WHERE run_id = ?", [(r,) for r in self.tombstoned]
            )
        heads = self.heads
        # Blobs as bytearrays, which sqlite3 binds without looking for an adapter (`NULL`).
        states: list[Any] = []  # each state's parameters, one after another
        for j, (p, state) in self.states.items():
            states += (j, p, bytearray(heads.get(j) or stored.head(state)))
        if execute_many(db, PUT_STATES_IN_PLACE, states) < len(self.states):
            # some job type moved to another partition
            db.executemany(PUT_STATE, [states[i : i + 3] for i in range(0, len(states), 3)])
        if gone := [key for key, entry in self.entries.items() if entry is None]:
            db.executemany(DROP_ENTRY, gone)  # (a row-value IN over many rows scans)
        entries: list[Any] = []
        for key, entry in self.entries.items():
            if entry is not None:
                entries += (*key, bytearray(entry))
        execute_many(db, PUT_ENTRIES, entries)
        db.executemany(PUT_OFFSET, [(t, p, o) for (t, p), o in self.offsets.items()])

    def _write_runs(self, db: sqlite3.Connection) -> None:
        """The queued run rows: whole, or as an end over the row of a run's start."""
        ended, rows = self.ended, self.runs
        upsert_runs_now(
            db, (row for run_id, row in rows.items() if run_id not in ended), retained=True
        )
        if not ended:
            return
        ends = [rows[run_id] for run_id in ended]
        params: list[Any] = []  # each end's, one after another
        for r in ends:
            params += (
                status_text(r.status),
                stored.time_text(r.ended_at) if r.ended_at else None,
                NULL if r.metrics is None else dumps(r.metrics),
                NULL if r.reason is None else r.reason,
                r.run_id,
            )
        if UPDATE_FROM:
            updated = execute_many(db, END_RUNS, params)
        else:
            one_a_row = [params[i : i + 5] for i in range(0, len(params), 5)]
            updated = db.executemany(END_RUN, one_a_row).rowcount
        if updated < len(ends):
            # A run started and ended in one batch has no row yet: write the ends whole
            # (an upsert leaves the rows that were updated as they are now).
            upsert_runs_now(db, ends, retained=True)


class WriteBehind:
    """The queue of one store's connection; `lock` is the store's, for its transactions."""

    def __init__(self, db: aiosqlite.Connection, path: str, lock: asyncio.Lock) -> None:
        self._db = db
        self._path = path
        self._lock = lock
        self._hurry = asyncio.Event()  # set by `flush`: the writer stops gathering
        self._pending: _Pending | None = None
        self._writing: _Pending | None = None  # being written by `_write_pending`
        self._writer: asyncio.Task[None] | None = None

    def queued_state(self, job_type: str) -> JobState | None:
        """The latest state of `job_type` queued or being written, if any."""
        for queued in (self._pending, self._writing):
            if queued is not None and (held := queued.states.get(job_type)) is not None:
                return held[1]
        return None

    def record_batch(
        self,
        partition: int,
        runs: Iterable[RunRow],
        states: Iterable[tuple[str, JobState]],
        next_offsets: Mapping[str, int],
        tombstoned: Iterable[str] = (),
        entries: Iterable[tuple[str, bytes, int, bytes | None]] = (),
        heads: Mapping[str, bytes | None] | None = None,
    ) -> None:
        """Queue one processed batch of `partition` for writing; `flush` waits for it.

        `states` are the job states the batch changed, `entries` the window changes they
        took: (job type, kind, number, entry JSON or None: it left), `stored.Change`s.
        `heads` are some of those states' head rows (`stored.head`), already serialized.

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
            head = heads.get(job_type) if heads else None
            if head is None:
                pending.heads.pop(job_type, None)  # an earlier batch's head is not this one's
            else:
                pending.heads[job_type] = head
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
            if not writer.done():
                self._hurry.set()
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
        try:
            while (pending := self._pending) is not None:
                self._pending = None
                self._writing = pending
                async with self._lock:
                    try:
                        await write_in_thread(self._db, self._path, pending.write)
                    except Exception as exc:
                        # Logged when it happens (no await between here and `failure`):
                        # from now on no batch is committed to Kafka (`StateManager.check`).
                        log.error("the SQLite write failed", path=self._path, error=repr(exc))
                        raise
                self._writing = None
                # Batches that come meanwhile share the next write (`GATHER_S`).
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._hurry.wait(), GATHER_S)
        finally:
            self._hurry.clear()  # a flush hurries the writer it found, to its end


def upsert_runs_now(db: sqlite3.Connection, runs: Iterable[RunRow], *, retained: bool) -> None:
    """`sqlfile.upsert_runs` on the connection's own thread (`write_in_thread`)."""
    params: list[Any] = []  # each run's, one after another
    for r in runs:
        params += run_params(r, retained=retained)
    execute_many(db, UPSERT_RUNS, params)


MOST_ROWS = 256  # rows a statement of `execute_many` at most


def execute_many(db: sqlite3.Connection, many: Many, params: list[Any]) -> int:
    """`many`'s statement over rows whose parameters `params` holds one row after another
    (`many.width` a row), in order, in a few statements of many rows each; how many rows
    they changed (as `executemany`'s `rowcount`).

    Each statement takes a power of two rows, at most `MOST_ROWS` and as many parameters
    as SQLite allows: a batch's rows go in a few statements of a few sizes, each prepared
    once and then found in the connection's statement cache.
    """
    width = many.width
    total = len(params) // width
    most = MOST_ROWS
    limit = db.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
    while most > 1 and most * width > limit:
        most //= 2
    changed = 0
    start = 0
    while start < total:
        size = most
        while size > total - start:
            size //= 2
        rows = params if size == total else params[start * width : (start + size) * width]
        changed += db.execute(many.sql(size), rows).rowcount
        start += size
    return changed
