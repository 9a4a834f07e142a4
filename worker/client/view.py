"""The client's running view: every RUNNING run, folded from the run rows of `<prefix>.state`.

The orchestrator publishes one `schemas.RunRecord` per run change in `<prefix>.state`, in the
same transaction as the run's status event, and a tombstone once the run has ended for a
while. Folding those rows (later rows win) gives every running run; job-type rows, the
orchestrator's private state, are skipped unread.

`sync()` brings the view up to everything committed so far: it asks the broker for the end
offsets (on a connection of their own, so the reader's long poll does not hold the request
back) and waits until the reader's positions reach them.
"""

from __future__ import annotations

import asyncio

import structlog
from aiokafka import AIOKafkaConsumer

from schemas import RunRecord, RunStatus, is_run_row, parse_run_row
from worker.kafkaio import assign_all, stop_task

log = structlog.get_logger("client")

_RUNNING = b'"status":"RUNNING"'


class RunningView:
    """Every running run, brought up to date on demand."""

    def __init__(self, topic: str, connection: dict[str, object]) -> None:
        self.topic = topic
        self._reader = AIOKafkaConsumer(
            isolation_level="read_committed", enable_auto_commit=False, **connection
        )
        # Only for end offsets: its connection never carries a parked fetch.
        self._offsets = AIOKafkaConsumer(isolation_level="read_committed", **connection)
        self._runs: dict[str, RunRecord] = {}
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect and start reading the state topic from its beginning."""
        await self._reader.start()
        await self._offsets.start()
        await assign_all(self._reader, self.topic, at="beginning")
        self._task = asyncio.create_task(self._read())

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
                for records in batch.values():
                    for record in records:
                        if record.key is not None:
                            self.fold(record.key, record.value)
                self._changed.notify_all()

    def fold(self, key: bytes, value: bytes | None) -> None:
        """One `<prefix>.state` record into the view (later rows win)."""
        run_id = key.decode("utf-8", "replace")
        if value is None:  # an ended run's tombstone
            self._runs.pop(run_id, None)
            return
        if not is_run_row(value):
            return  # a job type's row: the orchestrator's own state
        # Ended runs are most rows of a long history; only running ones are parsed.
        if _RUNNING in value:
            try:
                run = parse_run_row(value)
            except ValueError:
                log.warning("unreadable run row", run_id=run_id)
                return
            if run.status is RunStatus.RUNNING:
                self._runs[run_id] = run
                return
        self._runs.pop(run_id, None)

    async def sync(self, timeout: float) -> None:
        """Wait until the view includes everything committed so far (`TimeoutError` if not)."""
        async with asyncio.timeout(timeout):
            tps = list(self._reader.assignment())
            ends = await self._offsets.end_offsets(tps)

            async def caught_up() -> bool:
                for tp in tps:
                    if await self._reader.position(tp) < ends[tp]:
                        return False
                return True

            while not await caught_up():
                async with self._changed:
                    await self._changed.wait()

    def get(self, run_id: str) -> RunRecord | None:
        """The running run `run_id`, or None (ended, or never started)."""
        return self._runs.get(run_id)

    def runs(self) -> list[RunRecord]:
        """Every running run, by job type, start time and run ID."""
        return sorted(self._runs.values(), key=lambda r: (r.job_type, r.started_at, r.run_id))
