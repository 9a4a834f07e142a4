"""The intake: what each poll fetched for the owned partitions, handed to the batch runner
one batch per partition at a time, and the ticks of idle partitions.

With worker-wide transactions (`JOBS_TRANSACTIONS=worker`) a partition stays resumed while
its batch is in flight: what the next polls bring for it waits in its queue (`Owned.queued`)
and is its next batch as soon as this one ends (and `JOBS_BATCH_INTERVAL_MS` has passed
since it began), so the partitions whose outcomes one transaction carried begin their next
batches together and share the next transaction. Paused instead, aiokafka would drop what it
had fetched for them and fetch it again behind the fetch in flight (one per broker), and the
partitions would take turns at the fetch, two groups a transaction each. A queue of
`JOBS_BATCH_MAX_RECORDS` records pauses its partition until the queue is handed out. With a
producer per partition, each partition is paused while its batch is in flight: kept
fetching, its batches were smaller and its latency higher at 1,000 starts/s
(docs/performance.md, "Fetching while a batch is in flight").

Whatever seeks a partition clears its queue at the same moment (`PartitionManager.reposition`,
`PartitionManager.reset`): its records are fetched again from there. A partition that
takes one record per batch (after a failed batch) is paused while that record is decided.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime
from typing import Any

from aiokafka import TopicPartition

from worker.core.lifecycle import merge_inputs
from worker.engine.codec import InputRecord, TopicRole
from worker.engine.collector import RecordCollector
from worker.engine.partitions import Owned, PartitionManager
from worker.engine.processing import BatchRunner
from worker.settings import Settings


class Intake:
    """Queues each owned partition's fetched records and starts its batches."""

    def __init__(
        self,
        settings: Settings,
        partitions: PartitionManager,
        runner: BatchRunner,
        collector: RecordCollector,
        roles: Mapping[str, TopicRole],
        halted: Callable[[], bool],
    ) -> None:
        self._interval = settings.batch_interval_ms / 1000
        self._fetching = settings.worker_transactions  # during a batch
        self._most = settings.batch_max_records
        self._partitions = partitions
        self._runner = runner
        self._collector = collector
        self._roles = roles
        # Whether the worker is stopping (draining, or after a failure): no batch starts
        # then, so none commits offsets past a batch that failed for good.
        self._halted = halted

    def offer(self, fetched: Mapping[TopicPartition, Sequence[Any]]) -> None:
        """Queue one poll's records (aiokafka's) by partition; a partition with no batch in
        flight starts one with them at once."""
        owned_now = self._partitions.owned
        offered: dict[int, Owned] = {}
        for tp, records in fetched.items():
            owned = owned_now.get(tp.partition)
            if owned is None or owned.fenced:
                continue  # not ours (any more); whoever owns it reads from the committed offset
            role = self._roles[tp.topic]
            owned.queued.extend(InputRecord.of(role, r) for r in records)
            offered[tp.partition] = owned
        for number, owned in offered.items():
            if not _busy(owned) and owned.resuming is None:
                self._start(owned)
            elif len(owned.queued) >= self._most:
                self._partitions.pause(number)  # until its queue is handed out

    def tick(self, now: datetime) -> None:
        """Time out overdue runs of idle partitions by the wall clock."""
        for owned in self._partitions.owned.values():
            if _busy(owned) or owned.queued or owned.fenced or not owned.task.due(now):
                continue
            self._start(owned, wall_clock=now)

    def _start(self, owned: Owned, wall_clock: datetime | None = None) -> None:
        """Start a batch of `owned` with its whole queue, in decision order (or its first
        record alone while it is isolating a failure)."""
        if self._halted():
            return
        number = owned.task.number
        records, owned.queued = merge_inputs(owned.queued), []
        if self._runner.isolating(number):
            # One record per batch until the failed batch is behind; the rest are read
            # again (the partition is re-positioned after the batch).
            records = records[:1]
            self._partitions.pause(number)
        elif self._fetching:
            self._partitions.resume(number)  # when its full queue had paused it
        else:
            self._partitions.pause(number)
        # Begun now, in the step that ended the batch before it, if one did: a worker-wide
        # transaction about to start waits for this batch instead of going without it.
        self._collector.begin(number)
        owned.batch = asyncio.create_task(self._run(owned, records, wall_clock))

    async def _run(self, owned: Owned, records: list[InputRecord], wall: datetime | None) -> None:
        began = time.perf_counter()
        await self._runner.run(owned, records, wall)
        if self._partitions.owned.get(owned.task.number) is not owned or owned.fenced:
            return  # revoked (closed after this batch) or fenced: nothing more for it here
        if owned.resuming is not None:
            owned.resuming.cancel()
            owned.resuming = None
        wait = self._interval - (time.perf_counter() - began)
        if wait > 0:
            owned.resuming = asyncio.get_running_loop().call_later(wait, self._next, owned)
        else:
            self._next(owned)

    def _next(self, owned: Owned) -> None:
        """After a batch (and the batch interval): the next from the queue, or fetch again."""
        owned.resuming = None
        if self._partitions.owned.get(owned.task.number) is not owned:
            return
        if _busy(owned) and owned.batch is not asyncio.current_task():
            return  # a tick's batch began meanwhile: it goes on when that one ends
        if owned.queued:
            self._start(owned)
        else:
            self._partitions.resume(owned.task.number)


def _busy(owned: Owned) -> bool:
    return owned.batch is not None and not owned.batch.done()
