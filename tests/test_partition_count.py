"""Partitions added to the topics: the worker refuses to decide rather than start a run twice.

A job type's records go to the partition its name hashes to, among as many as the topics
have; its state lives on that partition. Partitions added to the five topics send some job
types' records to another partition than their state, where a start of a running job type
would start a second run. A worker restarted on its file, and a new worker restoring the
changelog, both stop with one line saying so, and decide nothing.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewPartitions

from schemas import EventType
from tests.chaos import WorkerProcess
from tests.test_damaged_state import START_S, refusal, start
from worker.client.watch import StatusTail
from worker.engine.codec import partition_for
from worker.kafkaio import connection
from worker.settings import Settings


def moved_job_type(prefix: str) -> str:
    """A job type whose partition of two is not its partition of three."""
    for i in range(100):
        name = f"{prefix}-moves-{i}"
        if partition_for(name.encode(), 2) != partition_for(name.encode(), 3):
            return name
    raise AssertionError("no job type moves")


async def add_a_partition(s: Settings) -> None:
    """Grow each of the five topics from two partitions to three."""
    admin = AIOKafkaAdminClient(**connection(s))
    await admin.start()
    try:
        await admin.create_partitions({name: NewPartitions(3) for name in s.topics.all()})
    finally:
        await admin.close()


@pytest.mark.kafka
@pytest.mark.timeout(300)
async def test_partitions_added_stop_the_worker_on_its_file_and_on_the_changelog(
    topics: Settings, producer: AIOKafkaProducer, tail: StatusTail, tmp_path: Path
) -> None:
    job_type = moved_job_type(topics.topic_prefix)
    first = WorkerProcess(topics, "worker", tmp_path)
    first.start()
    try:
        started = await tail.wait_event(START_S, request_id=await start(producer, topics, job_type))
        assert started.type is EventType.STARTED
        assert await first.terminate() == 0
    finally:
        first.ensure_dead()

    await add_a_partition(topics)
    # A second start of the running job type, now on the partition it hashes to among three.
    await producer.client.force_metadata_update()
    await producer.send_and_wait(
        topics.topics.requests,
        f'{{"job_type": "{job_type}", "request_id": "again"}}'.encode(),
        key=job_type.encode(),
        partition=partition_for(job_type.encode(), 3),
    )

    # Restarted on its file: the file says it was decided with two partitions.
    first.start()
    try:
        line = await refusal(first)
    finally:
        first.ensure_dead()
    assert "the SQLite file" in line, line
    assert "decided with 2 partitions and the topics have 3 now" in line, line

    # A new worker with an empty file: the changelog's settings rows say the same.
    fresh = WorkerProcess(topics, "fresh", tmp_path)
    fresh.start()
    try:
        line = await refusal(fresh)
    finally:
        fresh.ensure_dead()
    assert f"of {topics.topics.state} was decided with 2 partitions" in line, line

    # Nothing was decided after the partitions were added: one start, no second run.
    decided = [e for e in tail.events if e.job_type == job_type]
    assert [(e.type, e.run_id) for e in decided] == [(EventType.STARTED, started.run_id)]
