"""The status topic as the client reads it: answers to its requests and the ends of runs.

Read from the end resolved when the client opens, so an answer to any request sent after
that is seen; older events are not (a retried request is answered again by the
orchestrator, with the original decision).
"""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaConsumer

from schemas import ENDING_EVENTS, EventType, StatusEvent, read_status_event
from worker.kafkaio import assign_all, start_client, stop_task

_Waiter = tuple[frozenset[EventType], "asyncio.Future[StatusEvent]"]


class Replies:
    """Futures for answers by request ID, and for the events that end runs by run ID."""

    def __init__(self, topic: str, connection: dict[str, object]) -> None:
        self.topic = topic
        self._consumer = AIOKafkaConsumer(
            isolation_level="read_committed", enable_auto_commit=False, **connection
        )
        self._answers: dict[str, list[_Waiter]] = {}
        self._ends: dict[str, list[asyncio.Future[StatusEvent]]] = {}
        self._task: asyncio.Task[None] | None = None

    async def open(self) -> None:
        """Connect and start reading from the topic's end, resolved now."""
        await start_client(self._consumer)
        # The end resolved now: answers to requests sent after this count.
        await assign_all(self._consumer, self.topic, at="end")
        self._task = asyncio.create_task(self._read())

    async def close(self) -> None:
        """Stop reading and disconnect; safe on replies that never opened."""
        await stop_task(self._task)
        self._task = None
        await self._consumer.stop()

    async def _read(self) -> None:
        while True:
            batch = await self._consumer.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    try:
                        event = read_status_event(record.value)
                    except ValueError:
                        continue
                    self._deliver(event)

    def _deliver(self, event: StatusEvent) -> None:
        if event.request_id is not None:
            for types, future in self._answers.get(event.request_id, ()):
                if event.type in types and not future.done():
                    future.set_result(event)
        if event.run_id is not None and event.type in ENDING_EVENTS:
            for future in self._ends.pop(event.run_id, ()):
                if not future.done():
                    future.set_result(event)

    def answer(self, request_id: str, types: frozenset[EventType]) -> asyncio.Future[StatusEvent]:
        """A future for the first event of `types` answering `request_id`; cancel to forget."""
        future: asyncio.Future[StatusEvent] = asyncio.get_running_loop().create_future()
        self._answers.setdefault(request_id, []).append((types, future))

        def forget(done: asyncio.Future[StatusEvent]) -> None:
            left = [w for w in self._answers.get(request_id, ()) if w[1] is not done]
            if left:
                self._answers[request_id] = left
            else:
                self._answers.pop(request_id, None)

        future.add_done_callback(forget)
        return future

    def run_end(self, run_id: str) -> asyncio.Future[StatusEvent]:
        """A future for the event that ends `run_id`; cancel to forget."""
        future: asyncio.Future[StatusEvent] = asyncio.get_running_loop().create_future()
        self._ends.setdefault(run_id, []).append(future)

        def forget(done: asyncio.Future[StatusEvent]) -> None:
            left = [f for f in self._ends.get(run_id, ()) if f is not done]
            if left:
                self._ends[run_id] = left
            else:
                self._ends.pop(run_id, None)

        future.add_done_callback(forget)
        return future
