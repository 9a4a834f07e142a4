"""Following `<prefix>.status`: fold every committed status event into the console's file,
then hand it to the event streams.

The console reads every partition of the status topic itself (no consumer group, nothing
committed to Kafka: it only reads), read_committed, from the offsets stored in its file;
a partition it has never read starts at its beginning, so the file holds the whole fleet's
history. Partitions added to the topic later are picked up within two minutes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import StatusEvent, read_status_event
from worker.console.db import ConsoleDb, Folded
from worker.console.params import RunFilter
from worker.kafkaio import connection, partitions_of, start_client
from worker.settings import Settings

log = structlog.get_logger("worker")

_MAX_RECORDS = 5_000  # records a poll
_POLL_MS = 500
_REFRESH_PARTITIONS_S = 60.0
_LAG_WAIT_S = 0.5  # the longest /api/status waits for a partition's position
_QUEUE_DEPTH = 10_000  # events a slow stream may fall behind before it is closed


class Subscription:
    """One event stream's queue of folded events that pass its filter.

    `None` in the queue ends the stream: the console is stopping, or the stream fell
    `_QUEUE_DEPTH` events behind (`overflowed`; its client reconnects and resumes from the
    file with `Last-Event-ID`).
    """

    def __init__(self, f: RunFilter) -> None:
        self.filter = f
        self.queue: asyncio.Queue[Folded | None] = asyncio.Queue(_QUEUE_DEPTH + 1)
        self.overflowed = False
        self.ended = False
        # The stream ID of the last event offered, passed or not: once the queue is empty,
        # the stream has sent everything of its filter up to it.
        self.offered = 0

    def offer(self, items: Iterable[Folded]) -> None:
        """Queue those of `items` that pass the filter."""
        if self.ended:
            return
        for item in items:
            self.offered = item.seq
            e = item.event
            if not self.filter.matches(e.job_type, e.status, e.client_id, item.occurred_at):
                continue
            if self.queue.qsize() >= _QUEUE_DEPTH:
                self.overflowed = True
                self.end()
                return
            self.queue.put_nowait(item)

    def end(self) -> None:
        """End the stream after what is queued (or at once, when it overflowed)."""
        if self.ended:
            return
        self.ended = True
        if self.overflowed:
            while not self.queue.empty():
                self.queue.get_nowait()
        self.queue.put_nowait(None)


class Hub:
    """The event streams that are open; `publish` hands each its share of a folded batch."""

    def __init__(self) -> None:
        self._subscriptions: set[Subscription] = set()

    def subscribe(self, f: RunFilter) -> Subscription:
        """A new stream's subscription (`unsubscribe` it when the stream ends)."""
        subscription = Subscription(f)
        self._subscriptions.add(subscription)
        return subscription

    def unsubscribe(self, subscription: Subscription) -> None:
        """Forget a stream."""
        self._subscriptions.discard(subscription)

    def publish(self, items: Sequence[Folded]) -> None:
        """Offer folded events to every stream."""
        if items:
            for subscription in list(self._subscriptions):
                subscription.offer(items)

    def close(self) -> None:
        """End every stream (the console is stopping)."""
        for subscription in list(self._subscriptions):
            subscription.end()

    @property
    def streams(self) -> int:
        """How many streams are open."""
        return len(self._subscriptions)


def _parse(value: bytes | None) -> StatusEvent | None:
    if not value:
        return None
    try:
        return read_status_event(value)
    except ValueError:
        return None  # not a status event: skipped, as replay skips it


class Follower:
    """Reads the status topic into `ConsoleDb` and `Hub`. `await start()`, `run()`, `stop()`."""

    def __init__(self, settings: Settings, db: ConsoleDb, hub: Hub) -> None:
        self._settings = settings
        self._db = db
        self._hub = hub
        self.topic = settings.topics.status
        self._consumer = AIOKafkaConsumer(
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
            max_partition_fetch_bytes=8 * 1024 * 1024,
            metadata_max_age_ms=int(_REFRESH_PARTITIONS_S * 1000),
            **connection(settings),
        )
        self._next: dict[int, int] = {}  # partition -> next offset to fold
        self._partitions: list[TopicPartition] = []
        self._refreshed = 0.0
        self.folded = 0  # events folded since start
        self.caught_up = asyncio.Event()  # set once every partition was read to its end

    async def start(self) -> None:
        """Connect, and position every partition at its stored offset (else its beginning).

        Raises `LookupError` when the status topic does not exist."""
        await start_client(self._consumer)
        try:
            self._next = await self._db.positions()
            await self._assign()
        except BaseException:
            await self._consumer.stop()
            raise

    async def stop(self) -> None:
        """Disconnect."""
        await self._consumer.stop()

    async def _assign(self) -> None:
        partitions = await partitions_of(self._consumer, self.topic)
        self._refreshed = time.monotonic()
        if partitions == self._partitions:
            return
        self._consumer.assign(partitions)
        for tp in partitions:
            at = self._next.get(tp.partition)
            if at is None:
                await self._consumer.seek_to_beginning(tp)
            else:
                self._consumer.seek(tp, at)
        if self._partitions:
            log.info("the status topic has new partitions", partitions=len(partitions))
        self._partitions = partitions

    async def run(self) -> None:
        """Fold until cancelled; a Kafka or SQLite failure is raised (the console stops)."""
        while True:
            batch = await self._consumer.getmany(timeout_ms=_POLL_MS, max_records=_MAX_RECORDS)
            if batch:
                await self._fold(batch)
                continue
            if not self.caught_up.is_set() and await self._at_end():
                self.caught_up.set()
                await self._db.analyze()
                log.info("caught up with the status topic", topic=self.topic, events=self.folded)
            elif self.caught_up.is_set():
                await self._db.analyze(unless_fresh=True)
            if time.monotonic() - self._refreshed > _REFRESH_PARTITIONS_S:
                await self._assign()

    async def _fold(self, batch: dict[TopicPartition, list[Any]]) -> None:
        batches: list[tuple[int, list[tuple[int, StatusEvent, str]]]] = []
        positions: dict[int, int] = {}
        for tp, records in batch.items():
            items = []
            for record in records:
                event = _parse(record.value)
                if event is not None:
                    items.append((record.offset, event, record.value.decode("utf-8", "replace")))
            positions[tp.partition] = records[-1].offset + 1
            batches.append((tp.partition, items))
        folded = await self._db.write(batches, positions)
        self._next.update(positions)
        self.folded += len(folded)
        self._hub.publish(folded)

    async def _at_end(self) -> bool:
        for tp in self._partitions:
            end = self._consumer.last_stable_offset(tp)
            if end is None or await self._consumer.position(tp) < end:
                return False
        return True

    async def lag(self) -> int | None:
        """Committed status records not yet folded (None before the first fetch answers, or
        while a partition's position is being looked up: the status endpoint does not wait
        for the broker)."""
        total = 0
        for tp in self._partitions:
            end = self._consumer.last_stable_offset(tp)
            if end is None:
                return None
            try:
                position = await asyncio.wait_for(self._consumer.position(tp), _LAG_WAIT_S)
            except TimeoutError:
                return None
            total += max(0, end - position)
        return total
