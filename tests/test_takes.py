"""A worker restoring a long history stays in its group while another joins.

aiokafka heartbeats only once the rebalance listener has returned, so a restore taken inside
it outlives a short session: the restoring worker was dropped from the group, the newcomer
got every partition and restored the same history, and the two fenced each other until the
group settled. Partitions are now taken after the listener has returned."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime

import pytest
import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from structlog.testing import capture_logs

from schemas import RunStatus
from tests.conftest import RunningWorker, create_topics
from worker.client import JobClient
from worker.core.runs import RunRow
from worker.engine import changelog
from worker.engine.codec import partition_for
from worker.engine.partitions import PartitionManager
from worker.kafkaio import connection
from worker.settings import Settings

HISTORY = 200_000  # ended runs in partition 0 of the changelog: a restore of a few seconds


async def _write_history(settings: Settings) -> None:
    producer = AIOKafkaProducer(**connection(settings), linger_ms=20, max_batch_size=1_000_000)
    await producer.start()
    at = datetime.now(UTC)
    try:
        sent = []
        for n in range(HISTORY):
            row = RunRow(
                f"old-{n}", "old", None, f"q{n}", RunStatus.COMPLETED, 0, at, at, {}, None, None
            )
            key, value = changelog.run_row(row)
            sent.append(await producer.send(settings.topics.state, value, key=key, partition=0))
        await asyncio.gather(*sent)
    finally:
        await producer.stop()


@pytest.mark.kafka
async def test_a_restoring_worker_stays_in_the_group_while_another_joins(
    settings: Settings,
) -> None:
    """A restores partition 0's long history; B joins meanwhile. One settled assignment
    (disjoint, both partitions owned), nobody fenced, partition 0 restored to the end once,
    and both partitions answer."""
    await create_topics(settings, 2)
    await _write_history(settings)
    a = RunningWorker(settings.model_copy(update={"db_path": settings.db_path.with_name("a.db")}))
    b = RunningWorker(settings.model_copy(update={"db_path": settings.db_path.with_name("b.db")}))
    with capture_logs() as logs:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.INFO))
        await _join_while_restoring(settings, a, b)
    restores = [e["partition"] for e in logs if e["event"] == "partition restored from changelog"]
    assert restores.count(0) == 1, restores  # not once per worker
    assert not [e for e in logs if e["event"].startswith("fenced")]


async def _join_while_restoring(settings: Settings, a: RunningWorker, b: RunningWorker) -> None:
    starting_a = asyncio.create_task(a.start())
    try:
        async with asyncio.timeout(60):
            # Polling the worker's own counter: B joins while A is restoring.
            while a.worker._partitions is None or a.worker._partitions.taking == 0:  # noqa: ASYNC110
                await asyncio.sleep(0.01)
        await b.start()
        await starting_a
        owned = [set(w.worker._partitions.owned) for w in (a, b) if w.worker._partitions]
        assert sorted(len(o) for o in owned) == [1, 1]
        assert owned[0] | owned[1] == {0, 1}
        async with JobClient(settings) as client:
            kinds = {}
            n = 0
            while len(kinds) < 2:
                kinds.setdefault(partition_for(f"probe-{n}".encode(), 2), f"probe-{n}")
                n += 1
            for job_type in kinds.values():
                decision = await client.start_job(job_type, timeout=30)
                assert decision.started
    finally:
        if not starting_a.done():
            starting_a.cancel()
        await asyncio.gather(a.stop(), b.stop(), return_exceptions=True)


class _Collector:
    """Opening never completes, as with a broker that is away."""

    def __init__(self) -> None:
        self.opening: list[int] = []

    async def open(self, number: int) -> None:
        self.opening.append(number)
        await asyncio.Event().wait()


class _Consumer:
    def pause(self, *tps: object) -> None:
        pass


async def test_shutdown_is_not_held_by_a_take_waiting_for_the_broker(
    settings: Settings,
) -> None:
    """SIGTERM while a partition is being taken and the broker does not answer: the take is
    cancelled and the shutdown goes on, with nothing owned."""
    collector = _Collector()
    manager = PartitionManager(
        settings,
        _Consumer(),  # type: ignore[arg-type]
        collector,  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # never reached: the take waits in `open`
        lambda: None,  # type: ignore[arg-type, return-value]
        lambda exc: None,
        asyncio.Event(),
        asyncio.Event(),
    )
    await manager.assigned([TopicPartition(settings.topics.requests, 0)])
    await asyncio.sleep(0)  # the take starts and waits in `open`
    assert manager.taking == 1
    assert not manager.ready.is_set()
    async with asyncio.timeout(5):
        await manager.close_all()
    assert collector.opening == [0]
    assert manager.taking == 0
    assert manager.owned == {}


@pytest.mark.kafka
async def test_a_changelog_read_leaves_no_fetch_waiting_at_the_broker(settings: Settings) -> None:
    """Once a partition's changelog is read, its reader is assigned nothing, so no fetch of
    it waits at the broker for new records. The broker answers a connection's requests in
    order: each partition taken after a restore waited out such a fetch to learn its
    changelog's end offset (half a second apiece), and the reader can still read the next
    partition it is given."""
    await create_topics(settings, 2)
    producer = AIOKafkaProducer(**connection(settings))
    await producer.start()
    at = datetime.now(UTC)
    try:
        for partition in (0, 1):
            row = RunRow(
                f"r{partition}", "job", None, "q", RunStatus.COMPLETED, 0, at, at, {}, None, None
            )
            key, value = changelog.run_row(row)
            await producer.send_and_wait(settings.topics.state, value, key=key, partition=partition)
    finally:
        await producer.stop()
    reader = AIOKafkaConsumer(
        **connection(settings), enable_auto_commit=False, isolation_level="read_committed"
    )
    await reader.start()
    try:
        for partition in (0, 1):
            snapshot = await changelog.read_partition(reader, settings.topics.state, partition)
            assert set(snapshot.runs) == {f"r{partition}"}
            assert reader.assignment() == set()
    finally:
        await reader.stop()


class _ClosedCollector:
    """Opening fails as a client closed by the worker's stop fails a request in flight."""

    def __init__(self, stopping: asyncio.Event) -> None:
        self.stopping = stopping

    async def open(self, number: int) -> None:
        await self.stopping.wait()
        raise KafkaConnectionError("Connection at 127.0.0.1:9092 closed")

    async def close(self, number: int) -> None:
        pass


async def test_a_take_cut_short_by_stopping_does_not_fail_the_worker(
    settings: Settings,
) -> None:
    """SIGTERM while a partition is being taken: stopping closes the clients, the take's
    request fails with a closed connection, and that is the end of the take, not a
    partition left unserved (which would make the stop exit 1)."""
    stopping = asyncio.Event()
    failures: list[BaseException] = []
    manager = PartitionManager(
        settings,
        _Consumer(),  # type: ignore[arg-type]
        _ClosedCollector(stopping),  # type: ignore[arg-type]
        None,  # type: ignore[arg-type]  # never reached: the take fails in `open`
        lambda: None,  # type: ignore[arg-type, return-value]
        failures.append,
        stopping,
        asyncio.Event(),
    )
    await manager.assigned([TopicPartition(settings.topics.requests, 0)])
    await asyncio.sleep(0)  # the take starts and waits in `open`
    assert manager.taking == 1
    stopping.set()
    async with asyncio.timeout(5):
        while manager.taking:  # noqa: ASYNC110 (the take's end is a counter, not an event)
            await asyncio.sleep(0)
        await manager.close_all()
    assert failures == []
    assert manager.owned == {}
