"""Shared fixtures: one real Kafka broker per test session, a unique topic prefix per test."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import pytest
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from schemas import StatusEvent
from worker.client.watch import StatusTail
from worker.devtools.localkafka import LocalKafka
from worker.engine import topics as topic_admin
from worker.engine.codec import partition_for
from worker.engine.hooks import Hooks
from worker.engine.loop import Worker
from worker.kafkaio import connection
from worker.settings import Settings


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """JOBS_BOOTSTRAP_SERVERS when set, else a local broker started for this session."""
    configured = os.environ.get("JOBS_BOOTSTRAP_SERVERS")
    if configured:
        yield configured
        return
    # A low minimum session timeout lets kill tests move partitions in seconds.
    with LocalKafka(extra_config={"group.min.session.timeout.ms": "1000"}) as kafka:
        yield kafka.bootstrap_servers


def session_timeout_ms() -> int:
    """Session timeout for tests: low on the local broker, the broker default's minimum else."""
    return 6_000 if os.environ.get("JOBS_BOOTSTRAP_SERVERS") else 2_000


@pytest.fixture
def prefix() -> str:
    """A topic prefix no other test uses."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
def settings(kafka_bootstrap: str, prefix: str, tmp_path: Path) -> Settings:
    """Worker settings on the session broker with this test's prefix and SQLite file."""
    return Settings(
        bootstrap_servers=kafka_bootstrap,
        topic_prefix=prefix,
        db_path=tmp_path / "worker.db",
        poll_timeout_ms=100,
        http_port=0,
        session_timeout_ms=session_timeout_ms(),
        heartbeat_interval_ms=session_timeout_ms() // 4,
    )


async def create_topics(settings: Settings, partitions: int) -> None:
    """Create the five topics of `settings` with `partitions` partitions each."""
    admin = AIOKafkaAdminClient(**connection(settings))
    await admin.start()
    try:
        await topic_admin.create(admin, settings.topics, partitions)
    finally:
        await admin.close()


@pytest.fixture
async def topics(settings: Settings) -> Settings:
    """The five topics, two partitions each."""
    await create_topics(settings, 2)
    return settings


async def publish_status(
    settings: Settings,
    events: Sequence[StatusEvent],
    partitions: int,
    at: datetime | None = None,
) -> None:
    """Write `events` to the status topic as the worker does: keyed and placed by job type
    (stamped `at`, when given)."""
    producer = AIOKafkaProducer(**connection(settings))
    await producer.start()
    try:
        for event in events:
            key = event.job_type.encode()
            await producer.send(
                settings.topics.status,
                event.model_dump_json().encode(),
                key=key,
                partition=partition_for(key, partitions),
                timestamp_ms=None if at is None else int(at.timestamp() * 1000),
            )
        await producer.flush()
    finally:
        await producer.stop()


class RunningWorker:
    """A worker running as a task of the test's event loop."""

    def __init__(self, settings: Settings, hooks: Hooks | None = None) -> None:
        self.worker = Worker(settings, hooks)
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> RunningWorker:
        """Start and wait until the worker owns its partitions."""
        self._task = asyncio.create_task(self.worker.run(self._stop))
        ready = asyncio.create_task(self.worker.ready.wait())
        await asyncio.wait({self._task, ready}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if self._task.done():
            self._task.result()  # start-up failed: raise its error here
        assert self.worker.ready.is_set(), "the worker got no partitions within 60 s"
        return self

    async def stop(self) -> None:
        """Stop after the batch in flight (which is then fully recorded) and wait for exit."""
        if self._task is not None:
            self._stop.set()
            await asyncio.wait_for(self._task, 30)
            self._task = None


@pytest.fixture
async def worker(topics: Settings) -> AsyncIterator[RunningWorker]:
    """A running worker on this test's topics, stopped cleanly after the test."""
    running = await RunningWorker(topics).start()
    yield running
    await running.stop()


@pytest.fixture
async def producer(kafka_bootstrap: str) -> AsyncIterator[AIOKafkaProducer]:
    """A plain producer with aiokafka's default (murmur2) partitioner."""
    instance = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
    await instance.start()
    yield instance
    await instance.stop()


@pytest.fixture
async def tail(topics: Settings) -> AsyncIterator[StatusTail]:
    """A read_committed tail of this test's status and dead-letter topics."""
    instance = StatusTail(topics.bootstrap_servers, topics.topics)
    await instance.start()
    yield instance
    await instance.stop()


def _quiet_structlog() -> None:
    # Warnings and up, to the real stderr: in-process workers must not write into the
    # output of a CLI command that a test captures.
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(file=sys.__stderr__),
    )


@pytest.fixture(autouse=True)
def _reset_structlog() -> Iterator[None]:
    """Quiet logging for each test; undo any configuration a test (or its CLI) made."""
    _quiet_structlog()
    yield
    structlog.reset_defaults()
