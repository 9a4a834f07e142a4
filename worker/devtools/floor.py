"""The contract floor: the least the worker's contract asks of each record, deciding nothing.

For every input record of a partition batch, in one transaction per batch with the input
offsets, as the worker's exactly-once loop does: validate it (pydantic: bad input must be
dead-lettered), serialize one status event, send it and two changelog records, and write one
run row to SQLite behind the commit (pausing after a write, as the worker's writer does).
One transactional producer per partition; a partition is paused while its transaction is in
flight and the others keep flowing; the worker's client settings and produce path
(`worker.engine.collector.Outbox`). No worker on this stack can do less per record, so what the
floor reaches on a machine bounds what a worker can reach there.

`jobctl bench` runs it as `python -m worker.devtools.floor`, configured through the same
`JOBS_*` variables as the worker and stopped with SIGTERM, so that its throughput, its CPU
time and the latency its readers see are measured exactly as the worker's are. Its events
carry what a reader of the worker's events reads (type, job type, run ID, request ID).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import sys
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiosqlite
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.coordinator.assignors.range import RangePartitionAssignor
from pydantic import ValidationError

from schemas import EventType, JobRequest, JobResult, RunStatus, StatusEvent
from worker import compat
from worker.engine.codec import InputRecord, TopicRole, dead_letter, dead_letter_key, summarize
from worker.engine.collector import Outbox
from worker.engine.records import RecordBatches
from worker.engine.writer import GATHER_S
from worker.kafkaio import connection
from worker.settings import Settings, Topics

Row = tuple[str, str, str, str]


class FloorWork:
    """The floor's work per record, and its SQLite rows written behind the commits."""

    def __init__(self, topics: Topics, db: aiosqlite.Connection) -> None:
        self.topics = topics
        self.db = db
        self.now = datetime.now(UTC)
        self.written = 0
        self._rows: list[Row] = []
        self._writer: asyncio.Task[None] | None = None
        self._closing = asyncio.Event()  # the writer stops pausing

    @classmethod
    async def open(cls, topics: Topics, path: Path) -> FloorWork:
        db = await aiosqlite.connect(path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.execute(
            "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, job_type TEXT NOT NULL, "
            "status TEXT NOT NULL, event TEXT NOT NULL)"
        )
        await db.commit()
        return cls(topics, db)

    def add(self, out: RecordBatches, partition: int, record: Any) -> Row | None:
        """Validate `record`, send its event and two changelog records to `out`; its row.
        A record that is not a valid request or result goes to the dead-letter topic with
        its reason, as the worker's contract asks (no row)."""
        message: JobRequest | JobResult
        request_id: str | None = None
        try:
            if record.topic == self.topics.requests:
                message = JobRequest.model_validate_json(record.value or b"")
                event_type, status = EventType.STARTED, RunStatus.RUNNING
                run_id, request_id = f"{partition}.{record.offset}", message.request_id
            else:
                message = JobResult.model_validate_json(record.value or b"")
                event_type, status = EventType.COMPLETED, RunStatus.COMPLETED
                run_id = message.run_id
        except ValidationError as exc:
            # The worker's own dead letter: reason, source, what fits of the original.
            role: TopicRole = "requests" if record.topic == self.topics.requests else "results"
            source = InputRecord.of(role, record)
            reason = f"invalid {role[:-1]}: {summarize(exc)}"
            letter = dead_letter(source, "schema_invalid", reason, datetime.now(UTC))
            out.add(
                self.topics.dlq,
                partition,
                dead_letter_key(source),
                letter.model_dump_json().encode(),
            )
            return None
        event = StatusEvent(
            event_id=f"{record.topic}:{partition}:{record.offset}",
            type=event_type,
            status=status,
            job_type=message.job_type,
            run_id=run_id,
            request_id=request_id,
            occurred_at=self.now,
        )
        value = event.model_dump_json().encode()
        out.add(self.topics.status, partition, record.key, value)
        out.add(self.topics.state, partition, record.key, value)
        out.add(self.topics.state, partition, run_id.encode(), value)
        return run_id, message.job_type, status, value.decode()

    def committed(self, rows: list[Row]) -> None:
        """Write the rows of a committed batch behind, one SQLite transaction at a time,
        pausing `GATHER_S` after each as the worker's writer does, so that the batches of a
        steady trickle share one."""
        self._rows.extend(rows)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._write())

    async def _write(self) -> None:
        while self._rows:
            rows, self._rows = self._rows, []
            await self.db.executemany(
                "INSERT INTO runs VALUES (?, ?, ?, ?) ON CONFLICT (run_id) DO UPDATE SET "
                "status = excluded.status, event = excluded.event",
                rows,
            )
            await self.db.commit()
            self.written += len(rows)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._closing.wait(), GATHER_S)

    async def close(self) -> int:
        """Finish writing; how many rows were written."""
        self._closing.set()
        try:
            if self._writer is not None:
                await self._writer
            return self.written
        finally:
            await self.db.close()


class PassThrough:
    """The worker's transactions, minus the worker: each partition batch through
    `FloorWork` (or copied as it is, without one) in one transaction with its offsets."""

    def __init__(
        self,
        kafka: dict[str, Any],
        topics: Topics,
        group: str,
        partitions: int,
        batch_max_records: int,
        work: FloorWork | None,
        listener: ConsumerRebalanceListener | None = None,
    ) -> None:
        client = Settings.model_construct()  # the worker's client defaults
        self.topics = topics
        self.group = group
        self.work = work
        self.committed = 0
        self.batch_max_records = batch_max_records
        self.listener = listener
        self.producers = {
            n: AIOKafkaProducer(
                **kafka,
                transactional_id=f"{group}.{n}",
                linger_ms=client.linger_ms,
                max_batch_size=client.producer_batch_bytes,
            )
            for n in range(partitions)
        }
        self.consumer = AIOKafkaConsumer(
            **kafka,
            group_id=group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            isolation_level="read_committed",
            partition_assignment_strategy=(RangePartitionAssignor,),
            max_poll_records=batch_max_records,
            fetch_max_wait_ms=client.fetch_max_wait_ms,
        )
        self._tasks: list[asyncio.Task[None]] = []

    def _inputs(self, n: int) -> tuple[TopicPartition, TopicPartition]:
        return TopicPartition(self.topics.requests, n), TopicPartition(self.topics.results, n)

    async def start(self) -> None:
        """Connect the producers, subscribe to the input topics."""
        await asyncio.gather(*(p.start() for p in self.producers.values()))
        topics = [self.topics.requests, self.topics.results]
        if self.listener is None:
            self.consumer.subscribe(topics)
        else:
            self.consumer.subscribe(topics, listener=self.listener)
        await self.consumer.start()

    async def step(self, timeout_ms: int = 100) -> None:
        """Fetch once; start a transaction for each partition that has records."""
        batch = await self.consumer.getmany(timeout_ms=timeout_ms)
        by_partition: dict[int, list[Any]] = {}
        for tp, records in batch.items():
            by_partition.setdefault(tp.partition, []).extend(records)
        for n, records in by_partition.items():
            # Like the worker: N is paused while its transaction is in flight, and the
            # other partitions keep flowing.
            self.consumer.pause(*self._inputs(n))
            self._tasks.append(asyncio.create_task(self._pass_through(n, records)))
        for task in self._tasks:
            if task.done() and task.exception() is not None:
                raise RuntimeError(f"pass-through transaction failed: {task.exception()!r}")
        self._tasks = [t for t in self._tasks if not t.done()]

    async def _pass_through(self, n: int, records: Sequence[Any]) -> None:
        """One partition's batch in one transaction."""
        producer, work = self.producers[n], self.work
        rows: list[Row] = []
        await producer.begin_transaction()
        try:
            out = Outbox(producer)
            for r in records:
                if work is None:
                    out.batches.add(self.topics.status, n, r.key, r.value)
                elif (row := work.add(out.batches, n, r)) is not None:
                    rows.append(row)
            offsets: dict[TopicPartition, int] = {}
            for r in records:
                tp = TopicPartition(r.topic, n)
                offsets[tp] = max(offsets.get(tp, 0), r.offset + 1)
            await compat.send_with_offsets(producer, out.flush(), offsets, self.group)
            await producer.commit_transaction()
        except BaseException:
            with contextlib.suppress(Exception):
                await producer.abort_transaction()
            raise
        finally:
            self.consumer.resume(*self._inputs(n))
        self.committed += len(records)
        if work is not None:
            work.committed(rows)

    async def stop(self) -> int:
        """Finish the transactions in flight, disconnect; SQLite rows written (or records
        passed through, without `FloorWork`)."""
        try:
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.consumer.stop()
        finally:
            await asyncio.gather(
                *(p.stop() for p in self.producers.values()), return_exceptions=True
            )
        return await self.work.close() if self.work is not None else self.committed


def _log(event: str, **fields: Any) -> None:
    """One JSON log line on stderr, in the worker's shape (`event` names it)."""
    print(json.dumps({"event": event, **fields}), file=sys.stderr, flush=True)


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    async def on_partitions_revoked(self, revoked: Any) -> None:
        return None

    async def on_partitions_assigned(self, assigned: Any) -> None:
        _log("partitions assigned", partitions=sorted(tp.partition for tp in assigned))


async def serve(settings: Settings, partitions: int) -> int:
    """Run the floor on `settings`' topics until SIGTERM; SQLite rows written."""
    compat.install()  # records with header names that are not UTF-8, as the worker reads them
    topics = settings.topics
    work = await FloorWork.open(topics, settings.db_path)
    floor = PassThrough(
        connection(settings),
        topics,
        settings.group_id,
        partitions,
        settings.batch_max_records,
        work,
        _Assigned(),
    )
    stopping = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stopping.set)
    try:
        await floor.start()
        while not stopping.is_set():
            await floor.step()
    finally:
        written = await floor.stop()
    _log("floor stopped", rows=written, records=floor.committed)
    return written


def main() -> None:
    """`python -m worker.devtools.floor [PARTITIONS]`: the floor on `JOBS_*`'s cluster."""
    partitions = int(sys.argv[1]) if len(sys.argv) > 1 else 4
    asyncio.run(serve(Settings(), partitions))


if __name__ == "__main__":
    main()
