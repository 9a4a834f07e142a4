"""The client's running view: every RUNNING and QUEUED run, folded from the run rows of
`<prefix>.state`.

The orchestrator publishes one `schemas.RunRecord` per run change in `<prefix>.state`, in the
same transaction as the run's status event, and a tombstone once the run has ended for a
while. Folding those rows (later rows win) gives every running and every queued run; job-type
rows, the orchestrator's private state, are skipped unread.

Not from the topic's start: every `JOBS_VIEW_REFRESH_S` the orchestrator writes each
partition a fresh row of its running and queued runs followed by a view mark
(`schemas.ViewMark`): every run not ended then has a row stamped at or after the mark's
`since`. So the view starts each partition at its first record stamped within the last
`window` (two periods and 10 s) and reads on from there once it meets a mark vouching
for that start. A mark whose `since` is earlier sends it back to `since`; no mark in the
window (no orchestrator for a while, or marks switched off) sends it back to the partition's
start. Clocks only decide how much is read, never what is seen: the mark's `since` and its
rows' stamps come from one clock.

`sync()` brings the view up to everything committed so far: it asks the broker for the end
offsets (on a connection of their own, so the reader's long poll does not hold the request
back) and waits until every partition's start is vouched for and the reader's positions
reach them.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import (
    VIEW_ROW_KEY,
    RunRecord,
    RunStatus,
    is_run_row,
    parse_run_row,
    parse_view_row,
)
from worker.kafkaio import assign_all, stop_task

log = structlog.get_logger("client")

_UNENDED = (b'"status":"RUNNING"', b'"status":"QUEUED"')
_MARGIN = timedelta(seconds=10)


def window_of(view_refresh_s: float) -> timedelta | None:
    """How far back the view starts for marks written every `view_refresh_s` (0: never,
    so no window: the whole topic)."""
    return 2 * timedelta(seconds=view_refresh_s) + _MARGIN if view_refresh_s else None


@dataclass
class _Unvouched:
    """A partition read from within the window, not yet vouched for by a mark."""

    since: datetime  # the window's start
    end: int  # the end offset when the view opened: no mark before it, the whole partition
    back_to: datetime | None = None  # a mark's earlier `since`: start again from there


class RunningView:
    """Every running and queued run, brought up to date on demand."""

    def __init__(
        self, topic: str, connection: dict[str, object], window: timedelta | None = None
    ) -> None:
        self.topic = topic
        self.window = window
        self._reader = AIOKafkaConsumer(
            isolation_level="read_committed", enable_auto_commit=False, **connection
        )
        # Only for offsets: its connection never carries a parked fetch.
        self._offsets = AIOKafkaConsumer(isolation_level="read_committed", **connection)
        self._runs: dict[str, RunRecord] = {}  # RUNNING and QUEUED, by run ID
        self._unvouched: dict[TopicPartition, _Unvouched] = {}
        self.records_read = 0
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect and start reading the state topic: within the window, or from its start."""
        await self._reader.start()
        await self._offsets.start()
        partitions = await assign_all(self._reader, self.topic, at="beginning")
        if self.window is not None:
            await self._start_in_window(partitions, datetime.now(UTC) - self.window)
        self._task = asyncio.create_task(self._read())

    async def _start_in_window(self, partitions: list[TopicPartition], since: datetime) -> None:
        found = await self._offsets.offsets_for_times(
            # Kafka's times start in 1970: a window reaching before it reads from there.
            dict.fromkeys(partitions, max(0, int(since.timestamp() * 1000)))
        )
        ends = await self._offsets.end_offsets(partitions)
        for tp in partitions:
            at = found.get(tp)
            if at is None or at.offset <= await self._reader.position(tp):
                continue  # nothing within the window, or all of it is: from the start
            self._reader.seek(tp, at.offset)
            self._unvouched[tp] = _Unvouched(since, ends[tp])

    async def close(self) -> None:
        """Stop reading and disconnect; safe on a view that never opened."""
        await stop_task(self._task)
        self._task = None
        await self._offsets.stop()
        await self._reader.stop()

    async def _read(self) -> None:
        while True:
            # Short polls: the position also moves past transaction markers, which yield no
            # records, and `sync` waits on positions.
            batch = await self._reader.getmany(timeout_ms=50)
            async with self._changed:
                for tp, records in batch.items():
                    self._fold_records(tp, records)
                if self._unvouched:
                    await self._settle()
                self._changed.notify_all()

    def _fold_records(self, tp: TopicPartition, records: list[Any]) -> None:
        check = self._unvouched.get(tp)
        for record in records:
            key, value = record.key, record.value
            self.records_read += 1
            if key is None:
                continue
            if check is not None and key == VIEW_ROW_KEY and value is not None:
                try:
                    mark = parse_view_row(value)
                except ValueError:
                    log.warning("unreadable view mark", partition=tp.partition)
                    continue
                if mark is None:
                    continue
                if mark.since >= check.since:
                    del self._unvouched[tp]  # everything unended is at or after our start
                    check = None
                else:
                    check.back_to = mark.since
                    return  # the rest is read again from `since`
                continue
            self.fold(key, value)

    async def _settle(self) -> None:
        """Send each partition a mark sent back, or that has no mark in the window, back."""
        for tp, check in list(self._unvouched.items()):
            if check.back_to is not None:
                found = await self._offsets.offsets_for_times(
                    {tp: int(check.back_to.timestamp() * 1000)}
                )
                at = found.get(tp)
                offset = 0 if at is None else at.offset
            elif await self._reader.position(tp) >= check.end:
                offset = 0  # no mark in the window: the partition from its start
            else:
                continue
            for run_id in [r for r, run in self._runs.items() if run.partition == tp.partition]:
                del self._runs[run_id]
            if offset == 0:
                await self._reader.seek_to_beginning(tp)
            else:
                self._reader.seek(tp, offset)
            del self._unvouched[tp]

    def fold(self, key: bytes, value: bytes | None) -> None:
        """One `<prefix>.state` record into the view (later rows win)."""
        run_id = key.decode("utf-8", "replace")
        if value is None:  # an ended run's tombstone
            self._runs.pop(run_id, None)
            return
        if not is_run_row(value):
            return  # a job type's row: the orchestrator's own state
        # Ended runs are most rows of a long history; only running and queued ones are parsed.
        if any(status in value for status in _UNENDED):
            try:
                run = parse_run_row(value)
            except ValueError:
                log.warning("unreadable run row", run_id=run_id)
                return
            if run.status in (RunStatus.RUNNING, RunStatus.QUEUED):
                self._runs[run_id] = run
                return
        self._runs.pop(run_id, None)

    async def sync(self, timeout: float) -> None:
        """Wait until the view includes everything committed so far.

        `TimeoutError` once the read has not moved for `timeout` seconds: a long history
        read at full speed is waited for, a reader that is stuck is not.
        """
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            tps = list(self._reader.assignment())
            ends = await self._offsets.end_offsets(tps)
        moved: tuple[int, ...] = ()
        deadline = loop.time() + timeout
        while True:
            positions = tuple([await self._reader.position(tp) for tp in tps])
            behind = [tp for tp, at in zip(tps, positions, strict=True) if at < ends[tp]]
            if not self._unvouched and not behind:
                return
            if positions != moved:
                moved, deadline = positions, loop.time() + timeout
            async with asyncio.timeout_at(deadline), self._changed:
                await self._changed.wait()

    def get(self, run_id: str) -> RunRecord | None:
        """The running run `run_id`, or None (queued, ended, or never started)."""
        run = self._runs.get(run_id)
        return run if run is not None and run.status is RunStatus.RUNNING else None

    def runs(self, status: RunStatus = RunStatus.RUNNING) -> list[RunRecord]:
        """Every run with `status` (RUNNING or QUEUED), by job type, time and run ID: for a
        queued run, the time it was queued."""
        return sorted(
            (r for r in self._runs.values() if r.status is status),
            key=lambda r: (r.job_type, r.started_at, r.run_id),
        )
