"""No input stops a partition: poison pills, records that always fail, hostile input at volume.

Every test sends its records to a real broker and then checks that valid records behind them
on the same partition are decided.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from schemas import DeadLetter, EventType, StatusEvent
from tests.chaos import WorkerProcess, read_topic
from tests.conftest import RunningWorker, create_topics
from tests.hostile import RawProducer, hostile_records
from worker.client.watch import StatusTail
from worker.devtools.faults import Faults
from worker.settings import Settings

pytestmark = pytest.mark.kafka


def _start(job_type: str, request_id: str, **fields: object) -> bytes:
    return json.dumps({"job_type": job_type, "request_id": request_id, **fields}).encode()


async def _one_partition(settings: Settings) -> Settings:
    await create_topics(settings, 1)
    return settings


@pytest.fixture
async def one_partition(settings: Settings) -> AsyncIterator[tuple[Settings, StatusTail]]:
    """Topics of one partition, a worker on them, and a tail of its output."""
    topics = await _one_partition(settings)
    running = await RunningWorker(topics).start()
    try:
        async with StatusTail(topics.bootstrap_servers, topics.topics) as tail:
            yield topics, tail
    finally:
        await running.stop()


async def test_a_start_nested_5000_deep_is_dead_lettered_and_the_next_start_decided(
    one_partition: tuple[Settings, StatusTail], producer: AIOKafkaProducer
) -> None:
    """`initial_data` nested 5,000 deep is dead-lettered `too_deep`; the start after it runs."""
    topics, tail = one_partition
    # Written as text: json.dumps itself would recurse too deep to build it.
    value = _start("etl", "deep").replace(
        b"}", b', "initial_data": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    )
    poison = await producer.send_and_wait(topics.topics.requests, value, key=b"etl")
    await producer.send_and_wait(topics.topics.requests, _start("etl", "after"), key=b"etl")
    assert (await tail.wait_event(request_id="after")).type is EventType.STARTED
    letter = await tail.wait_for(
        lambda i: isinstance(i, DeadLetter) and i.source.offset == poison.offset
    )
    assert isinstance(letter, DeadLetter)
    assert letter.reason.code == "too_deep"
    assert "JOBS_MAX_NESTING_DEPTH" in letter.reason.message


async def test_a_900kb_job_type_on_results_is_dead_lettered_and_the_next_start_decided(
    one_partition: tuple[Settings, StatusTail], producer: AIOKafkaProducer
) -> None:
    """A result with a 900,000-character job type is dead-lettered without its value."""
    topics, tail = one_partition
    value = json.dumps(
        {
            "job_type": "j" * 900_000,
            "run_id": "261202-010203-0.1",
            "status": "COMPLETED",
            "request_id": "huge",
        }
    ).encode()
    poison = await producer.send_and_wait(topics.topics.results, value, key=b"big")
    await producer.send_and_wait(topics.topics.requests, _start("etl", "after"), key=b"etl")
    assert (await tail.wait_event(request_id="after")).type is EventType.STARTED
    letter = await tail.wait_for(
        lambda i: isinstance(i, DeadLetter) and i.source.offset == poison.offset
    )
    assert isinstance(letter, DeadLetter)
    assert letter.reason.code == "schema_invalid"
    assert letter.value is None
    assert f"the {len(value)}-byte value is not copied here" in letter.reason.message
    # The sender is answered under the job type the key names.
    rejected = await tail.wait_event(request_id="huge")
    assert rejected.type is EventType.REJECTED
    assert rejected.job_type == "big"


async def test_a_record_that_always_fails_is_dead_lettered_once_and_the_rest_flow(
    settings: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """A record whose processing fails every time is tried alone, then dead-lettered
    `unprocessable` exactly once; the valid records of its batch are decided exactly once."""
    topics = await _one_partition(settings)
    # Sent before the worker starts, so that all of them arrive in one batch.
    sent = {}
    for name in ("before", "poison", "after"):
        data = {"marker": "poison-marker"} if name == "poison" else {}
        meta = await producer.send_and_wait(
            topics.topics.requests,
            _start(f"job-{name}", name, initial_data=data),
            key=f"job-{name}".encode(),
        )
        sent[name] = meta.offset
    running = await RunningWorker(topics, Faults(record="poison-marker").hooks()).start()
    try:
        async with StatusTail(topics.bootstrap_servers, topics.topics) as tail:
            for name in ("before", "after"):
                assert (await tail.wait_event(request_id=name)).type is EventType.STARTED
            letter = await tail.wait_for(
                lambda i: isinstance(i, DeadLetter) and i.source.offset == sent["poison"]
            )
            assert isinstance(letter, DeadLetter)
            assert letter.reason.code == "unprocessable"
            assert "InjectedFault" in letter.reason.message
            assert letter.value is not None  # the original is kept for whoever looks
        # More traffic after it flows in whole batches again.
        await producer.send_and_wait(
            topics.topics.requests, _start("job-later", "later"), key=b"job-later"
        )
        async with StatusTail(topics.bootstrap_servers, topics.topics) as tail:
            assert (await tail.wait_event(request_id="later")).type is EventType.STARTED
    finally:
        await running.stop()
    status = [
        StatusEvent.model_validate_json(r.value)
        for r in (await read_topic(topics.bootstrap_servers, topics.topics.status))[0]
    ]
    letters = [
        DeadLetter.model_validate_json(r.value)
        for r in (await read_topic(topics.bootstrap_servers, topics.topics.dlq))[0]
    ]
    assert Counter(e.request_id for e in status) == {"before": 1, "after": 1, "later": 1}
    assert [(d.reason.code, d.source.offset) for d in letters] == [
        ("unprocessable", sent["poison"])
    ]


def _hostile_count() -> int:
    return int(os.environ.get("JOBS_HOSTILE_RECORDS", "3000"))


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


@pytest.mark.timeout(900)
async def test_hostile_input_at_volume(settings: Settings, tmp_path: Path) -> None:
    """Thousands of hostile records on both input topics, interleaved with valid starts:
    each hostile one ends as a dead letter or `rejected` event naming its coordinates, every
    valid one is decided, and the worker keeps running in bounded memory.

    JOBS_HOSTILE_RECORDS sets how many (3,000 by default; the README's figures are from
    100,000).
    """
    partitions = 2
    await create_topics(settings, partitions)
    worker = WorkerProcess(settings, "hostile", tmp_path)
    worker.start()
    records = hostile_records(settings.topics, partitions, _hostile_count())
    raw = RawProducer(settings.bootstrap_servers)
    try:
        await raw.send(records)
        assert len(raw.sent) == len(records)
        valid = {r.request_id for r in records if r.valid}
        hostile = {raw.sent[i]: r for i, r in enumerate(records) if not r.valid}
        dead: dict[tuple[str, int, int], str] = {}  # coordinates -> reason code
        rejected: set[tuple[str, int, int]] = set()
        decided: set[str] = set()

        def take(item: StatusEvent | DeadLetter) -> None:
            if isinstance(item, DeadLetter):
                s = item.source
                dead[(s.topic, s.partition, s.offset)] = item.reason.code
            elif item.type is EventType.REJECTED and item.source is not None:
                s = item.source
                rejected.add((s.topic, s.partition, s.offset))
            if isinstance(item, StatusEvent) and item.request_id in valid:
                decided.add(item.request_id)

        def accounted() -> bool:
            return all(c in dead or c in rejected for c in hostile)

        async with StatusTail(settings.bootstrap_servers, settings.topics, on_item=take):
            async with asyncio.timeout(600):
                while not (decided == valid and accounted()):
                    assert worker.alive(), worker.log_text()[-4000:]
                    await asyncio.sleep(0.2)
        peak = _peak_rss_mb(worker.proc.pid)  # type: ignore[union-attr]
        assert worker.alive()
        by_kind = Counter(h.kind for h in hostile.values())
        codes = Counter(dead[c] for c in hostile if c in dead)
        print(
            f"\nhostile records by kind: {dict(sorted(by_kind.items()))}"
            f"\n{len(hostile)} hostile: {sum(codes.values())} dead-lettered {dict(codes)}, "
            f"{sum(c in rejected for c in hostile)} answered with `rejected`, "
            f"{sum(c in rejected and c not in dead for c in hostile)} rejected only, lost 0"
            f"\n{len(valid)} valid starts decided; worker peak RSS {peak:.1f} MB"
        )
        # Each kind has its own reason: none needed the last resort.
        assert not [
            (h.kind, worker.log_text()[-3000:])
            for c, h in hostile.items()
            if dead.get(c) == "unprocessable"
        ]
        assert peak < 400, f"worker peak RSS {peak:.1f} MB"
        assert await worker.terminate() == 0
    finally:
        worker.ensure_dead()


async def test_a_queue_cannot_grow_past_what_one_changelog_record_carries(
    settings: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """Starts queued with large `initial_data` fill the job type up to JOBS_MAX_RUN_BYTES;
    the rest are rejected, and no batch fails on a job state too large to publish."""
    topics = await _one_partition(settings)
    config = tmp_path / "jobs.toml"
    config.write_text('[defaults]\npolicy = "queue"\n')
    queueing = topics.model_copy(update={"config": config})
    running = await RunningWorker(queueing).start()
    try:
        async with StatusTail(topics.bootstrap_servers, topics.topics) as tail:
            blob = {"blob": "x" * 60_000}  # under JOBS_MAX_DATA_BYTES
            for i in range(20):
                await producer.send(
                    topics.topics.requests,
                    _start("bulk", f"bulk-{i}", initial_data=blob),
                    key=b"bulk",
                )
            await producer.send_and_wait(topics.topics.requests, _start("etl", "after"), key=b"etl")
            assert (await tail.wait_event(request_id="after")).type is EventType.STARTED
            answers = [(await tail.wait_event(request_id=f"bulk-{i}")).type for i in range(20)]
            accepted = answers.count(EventType.STARTED) + answers.count(EventType.QUEUED)
            # 60 KB requests and 384 KiB allowed: six runs, the rest rejected.
            assert accepted == 6
            assert answers[6:] == [EventType.REJECTED] * 14
            rejected = await tail.wait_event(request_id="bulk-6")
            assert rejected.reason is not None
            assert "JOBS_MAX_RUN_BYTES" in rejected.reason
            assert tail.dead_letters == []
    finally:
        await running.stop()
