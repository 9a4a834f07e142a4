"""Shared fixtures: one real Kafka broker per test session, a unique topic prefix per test."""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import sys
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient

from schemas import StatusEvent
from worker.client.watch import StatusTail
from worker.console.service import Console
from worker.devtools.containers import KafkaInDocker, docker_unavailable
from worker.devtools.localkafka import (
    KAFKA_VERSION,
    SCALA_VERSION,
    LocalKafka,
    LocalKafkaError,
    cache_dir,
)
from worker.engine import topics as topic_admin
from worker.engine.codec import partition_for
from worker.engine.hooks import Hooks
from worker.engine.loop import Worker
from worker.kafkaio import connection
from worker.settings import Settings

# The session's broker: JOBS_BOOTSTRAP_SERVERS when set; else JOBS_TEST_BROKER=docker, a
# container (testcontainers), or the default JOBS_TEST_BROKER=jars, a LocalKafka.
BROKER_CHOICES = ("jars", "docker")
# A low minimum session timeout lets kill tests move partitions in seconds.
SESSION_BROKER_CONFIG = {
    "group.min.session.timeout.ms": "1000",
    # Transactions past their timeout (a killed worker's) are aborted within a second of it,
    # not Kafka's 10 s sweep: the worker-wide transactions' takeover tests wait for it.
    "transaction.abort.timed.out.transaction.cleanup.interval.ms": "1000",
}


def session_broker() -> str:
    """Where the session's broker comes from: `external`, `docker` or `jars`."""
    if os.environ.get("JOBS_BOOTSTRAP_SERVERS"):
        return "external"
    choice = os.environ.get("JOBS_TEST_BROKER") or "jars"
    if choice not in BROKER_CHOICES:
        raise pytest.UsageError(
            f"JOBS_TEST_BROKER={choice!r}: use one of {', '.join(BROKER_CHOICES)}"
        )
    return choice


def pytest_configure(config: pytest.Config) -> None:
    """Fail at once, in one line, when the broker asked for cannot be had."""
    if session_broker() == "docker":
        reason = docker_unavailable()
        if reason is not None:
            raise pytest.UsageError(f"JOBS_TEST_BROKER=docker, but {reason}")


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """The session's broker (see session_broker()), started for this session unless given."""
    source = session_broker()
    if source == "external":
        yield os.environ["JOBS_BOOTSTRAP_SERVERS"]
    elif source == "docker":
        with KafkaInDocker(extra_config=SESSION_BROKER_CONFIG) as container:
            yield container.bootstrap_servers
    else:
        with LocalKafka(extra_config=SESSION_BROKER_CONFIG) as kafka:
            yield kafka.bootstrap_servers


def own_broker_unavailable(version: str = KAFKA_VERSION) -> str | None:
    """Why a test cannot start a LocalKafka of its own here (no Java, or no cached jars and
    no Maven to fetch them); None when it can."""
    if shutil.which("java") is None:
        return "starts a Kafka broker of its own from the jars, and `java` is not on PATH"
    jars = cache_dir() / f"kafka_{SCALA_VERSION}-{version}" / ".complete"
    if not jars.exists() and shutil.which("mvn") is None:
        return (
            f"starts a Kafka broker of its own, and Kafka {version}'s jars are not cached "
            "and `mvn` is not on PATH to fetch them"
        )
    return None


# Tests that run `jobctl broker` or `java` themselves, in a child process.
NEEDS_JAVA = frozenset(
    {
        "tests/test_cli.py::test_broker_prints_its_address_and_stops_on_ctrl_c",
        "tests/test_cli.py::test_failed_download_is_reported",
        "tests/test_localkafka.py::test_jobctl_broker_secure_prints_a_login_per_role",
    }
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Where the session's broker is given or in Docker and no broker can be started from
    the jars, the tests that start one in a child process are skipped, saying why."""
    reason = None if session_broker() == "jars" else own_broker_unavailable()
    if reason is None:
        return
    for item in items:
        if item.nodeid in NEEDS_JAVA:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session", autouse=True)
def _skip_own_brokers_without_java() -> Iterator[None]:
    """Where the session's broker is given (JOBS_BOOTSTRAP_SERVERS) or in Docker, so that
    the session needs no Java, a test (or fixture) whose LocalKafka cannot start for want
    of Java or Maven is skipped with the reason instead of failing. With the session's
    broker from the jars, such a failure stays one."""
    start = LocalKafka.start
    jars = session_broker() == "jars"

    def start_or_skip(self: LocalKafka) -> LocalKafka:
        try:
            return start(self)
        except LocalKafkaError:
            reason = None if jars else own_broker_unavailable(self.version)
            if reason is not None:
                pytest.skip(reason)
            raise

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(LocalKafka, "start", start_or_skip)
        yield


def session_timeout_ms() -> int:
    """Session timeout for tests: low on a broker of this session (SESSION_BROKER_CONFIG),
    the broker default's minimum on a given one."""
    return 6_000 if session_broker() == "external" else 2_000


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

    async def stopped(self, within: float = 30) -> None:
        """Wait for the worker to stop by itself; raise the error it stopped with."""
        assert self._task is not None
        task, self._task = self._task, None
        async with asyncio.timeout(within):
            await task

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


@pytest.fixture
async def console(topics: Settings, tmp_path: Path) -> AsyncIterator[Console]:
    """A console on this test's topics as `jobctl serve` starts it by default (it may not
    cancel), on a free port, with its own file."""
    instance = await Console(topics, tmp_path / "console.db", port=0).start()
    yield instance
    await instance.stop()


@pytest.fixture
async def cancelling(topics: Settings, tmp_path: Path) -> AsyncIterator[Console]:
    """A console started with --allow-cancel."""
    instance = await Console(topics, tmp_path / "cancelling.db", port=0, allow_cancel=True).start()
    yield instance
    await instance.stop()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    """An HTTP client session."""
    async with aiohttp.ClientSession() as instance:
        yield instance
