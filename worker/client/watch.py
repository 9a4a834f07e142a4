"""A read_committed tail of the status and dead-letter topics, for the demo, the CLI and tests."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer, TopicPartition

from schemas import DeadLetter, StatusEvent, read_status_event
from worker.kafkaio import partitions_of, start_client, stop_task
from worker.settings import Topics

log = structlog.get_logger("watch")

Item = StatusEvent | DeadLetter


class StatusTail:
    """Collects every committed status event and dead letter, in arrival order (`items`).

    With `keep=False` each one goes to `on_item` and nothing is kept: a follower that runs
    for days, or reads a long history from its beginning (`jobctl watch`), holds no more
    than one fetch's worth; `wait_for` is then refused, and `wait_until` waits instead.

    Should reading stop (`on_item` raised, or Kafka failed), the waiters get its exception
    rather than waiting for items that will never come.
    """

    def __init__(
        self,
        kafka: str | Mapping[str, Any],
        topics: Topics,
        *,
        from_beginning: bool = True,
        dead_letters: bool = True,
        on_item: Callable[[Item], None] | None = None,
        keep: bool = True,
    ) -> None:
        if not keep and on_item is None:
            raise ValueError("a tail that keeps nothing needs on_item")
        self._topics = topics
        # A reader's principal may read status only: without dead letters, only status.
        self._read_topics = (topics.status, topics.dlq) if dead_letters else (topics.status,)
        self._consumer = AIOKafkaConsumer(
            enable_auto_commit=False,
            isolation_level="read_committed",
            auto_offset_reset="earliest" if from_beginning else "latest",
            **({"bootstrap_servers": kafka} if isinstance(kafka, str) else kafka),
        )
        self._from_beginning = from_beginning
        self._on_item = on_item
        self._keep = keep
        self.items: list[Item] = []
        self._changed = asyncio.Condition()
        self._task: asyncio.Task[None] | None = None
        self._failure: BaseException | None = None
        self._failure_raised = False  # to a waiter; else `stop` raises it

    @property
    def events(self) -> list[StatusEvent]:
        """Status events seen so far."""
        return [i for i in self.items if isinstance(i, StatusEvent)]

    @property
    def dead_letters(self) -> list[DeadLetter]:
        """Dead letters seen so far."""
        return [i for i in self.items if isinstance(i, DeadLetter)]

    async def start(self) -> None:
        """Assign every partition of the topics and start reading; closed again on failure."""
        await start_client(self._consumer)
        try:
            await self._assign()
        except BaseException:
            await self._consumer.stop()
            raise
        self._task = asyncio.create_task(self._read())

    async def _assign(self) -> None:
        parts: list[TopicPartition] = []
        for topic in self._read_topics:
            parts.extend(await partitions_of(self._consumer, topic))
        self._consumer.assign(parts)
        if self._from_beginning:
            await self._consumer.seek_to_beginning(*parts)
        else:
            await self._consumer.seek_to_end(*parts)
            for tp in parts:  # resolve the end position now, not at the first fetch
                await self._consumer.position(tp)

    async def _read(self) -> None:
        try:
            await self._follow()
        except asyncio.CancelledError:
            raise  # `stop`
        except BaseException as exc:  # SystemExit too: rich's, when its pipe is closed
            # Nobody awaits this task until `stop`: kept and handed to every waiter (woken
            # now), the exception ends their wait instead of leaving it to hang; and one that
            # exits does not break out of the event loop from a task nobody is waiting on.
            self._failure = exc
            async with self._changed:
                self._changed.notify_all()

    def _raise_failure(self) -> None:
        if self._failure is not None:
            self._failure_raised = True
            raise self._failure

    async def _follow(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=500)
            fresh: list[Item] = []
            for tp, records in batch.items():
                # Status events as every reader reads them (`read_status_event`: what cannot
                # be folded is skipped); dead letters by their model.
                read: Callable[[Any], Item] = (
                    read_status_event
                    if tp.topic == self._topics.status
                    else DeadLetter.model_validate_json
                )
                for record in records:
                    try:
                        fresh.append(read(record.value))
                    except ValueError as exc:
                        log.warning("unreadable record", topic=tp.topic, error=str(exc))
            if fresh and self._keep:
                async with self._changed:
                    self.items.extend(fresh)
                    self._changed.notify_all()
            if self._on_item is not None:
                for item in fresh:
                    self._on_item(item)

    async def wait_for(self, predicate: Callable[[Item], bool], timeout: float = 30.0) -> Item:
        """The first item (seen or to come) matching `predicate`; TimeoutError after `timeout`."""
        if not self._keep:
            raise RuntimeError("this tail keeps no items (keep=False): follow them with on_item")

        def find() -> Item | None:
            return next((i for i in self.items if predicate(i)), None)

        async with asyncio.timeout(timeout), self._changed:
            while (found := find()) is None:
                self._raise_failure()
                await self._changed.wait()
            return found

    async def wait_until(self, done: asyncio.Event) -> None:
        """Wait until `done` is set (by `on_item`, say); if reading stops first, raise why
        (the exception of `on_item`, or of Kafka)."""
        if self._task is None:
            raise RuntimeError("the tail is not started")
        waiting = asyncio.ensure_future(done.wait())
        try:
            await asyncio.wait({waiting, self._task}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiting.cancel()
        if not done.is_set():
            self._raise_failure()
            raise RuntimeError("the tail was stopped")

    async def wait_event(self, timeout: float = 30.0, **fields: object) -> StatusEvent:
        """The first status event whose attributes equal `fields`."""

        def match(item: Item) -> bool:
            return isinstance(item, StatusEvent) and all(
                getattr(item, k) == v for k, v in fields.items()
            )

        found = await self.wait_for(match, timeout)
        assert isinstance(found, StatusEvent)
        return found

    async def stop(self) -> None:
        """Stop reading; raise why reading stopped early, unless a waiter was told."""
        await stop_task(self._task)
        await self._consumer.stop()
        if not self._failure_raised:
            self._raise_failure()

    async def __aenter__(self) -> StatusTail:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()
