"""`jobctl replay` on a real broker: parallel processes, resuming from a time, failures."""

from __future__ import annotations

import asyncio
import contextlib
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas import EventType, RunStatus, StatusEvent
from tests.conftest import RunningWorker, create_topics, publish_status
from worker.audit.replay import ReplayError, _follow, replay
from worker.core.runs import RunRow
from worker.engine.store import Store
from worker.settings import Settings

PARTITIONS = 4
T0 = datetime(2026, 11, 29, 6, 0, tzinfo=UTC)


def lifecycle(n: int, at: datetime) -> list[StatusEvent]:
    """Run `n`'s events: started, a progress report for some, and an ending of each kind."""
    job_type = f"report-{n % 13}"
    run_id = f"{job_type}:{n}"
    started = StatusEvent(
        event_id=f"s{n}",
        type=EventType.STARTED,
        status=RunStatus.RUNNING,
        request_id=f"req-{n}",
        job_type=job_type,
        client_id=f"c{n % 3}" if n % 2 else None,
        run_id=run_id,
        initial_data={"n": n, "day": "monday"},
        started_at=at,
        occurred_at=at,
    )
    events = [started]
    if n % 3 == 0:
        events.append(
            started.model_copy(
                update={"event_id": f"p{n}", "type": EventType.PROGRESS, "metrics": {"done": n}}
            )
        )
    ending, status = [
        (EventType.COMPLETED, RunStatus.COMPLETED),
        (EventType.FAILED, RunStatus.FAILED),
        (EventType.CANCELLED, RunStatus.CANCELLED),
        (EventType.TIMED_OUT, RunStatus.TIMED_OUT),
    ][n % 4]
    if n % 5 != 0:  # every fifth run stays running
        events.append(
            StatusEvent(
                event_id=f"e{n}",
                type=ending,
                status=status,
                from_status=RunStatus.RUNNING,
                job_type=job_type,
                run_id=run_id,
                metrics={"rows": n} if n % 2 else None,
                reason=None if ending is EventType.COMPLETED else f"because {n}",
                started_at=at,
                occurred_at=at + timedelta(seconds=1),
            )
        )
    return events


async def publish(settings: Settings, events: list[StatusEvent], at: datetime) -> None:
    """Write `events` to the status topic as the worker does, stamped `at`."""
    await publish_status(settings, events, PARTITIONS, at)


async def rows(path: Path) -> list[RunRow]:
    store = await Store.open(path)
    try:
        return await store.runs()
    finally:
        await store.close()


async def test_parallel_replay_and_a_replay_resumed_from_a_time_equal_one_process(
    settings: Settings, tmp_path: Path
) -> None:
    """Runs started before the resume point and ended after it are updated, not lost."""
    await create_topics(settings, PARTITIONS)
    first = [e for n in range(0, 300) for e in lifecycle(n, T0)]
    # The second half ends runs of the first (their endings come later) and starts new ones.
    later = T0 + timedelta(hours=1)
    opened = [e for e in first if e.type is EventType.STARTED and e.run_id]
    closers = [e for n in range(300, 400) for e in lifecycle(n, later)]
    first_half = [e for e in first if e.type is not EventType.COMPLETED]
    second_half = [e for e in first if e.type is EventType.COMPLETED] + closers
    await publish(settings, first_half, T0)

    resumed = tmp_path / "resumed.db"
    report = await replay(settings, resumed, from_offset=0, processes=2)
    assert report.processes == 2
    assert report.events == len(first_half)
    await publish(settings, second_half, later)
    progress: list[tuple[int, int]] = []
    await replay(
        settings,
        resumed,
        from_timestamp=later,
        processes=3,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert progress[-1] == (len(second_half), len(second_half))

    alone, parallel = tmp_path / "alone.db", tmp_path / "parallel.db"
    # A time before any record's (before 1970, which Kafka's lookup refuses): all of them.
    one = await replay(
        settings, alone, from_timestamp=datetime(1969, 12, 31, 23, 59, tzinfo=UTC), processes=1
    )
    default = await replay(settings, parallel, from_offset=0)
    assert (one.processes, one.events, one.runs) == (1, len(first) + len(closers), 400)
    assert (default.events, default.runs) == (one.events, one.runs)

    expected = await rows(alone)
    assert {r.status for r in expected} == set(RunStatus) - {RunStatus.QUEUED}
    assert len({r.partition for r in expected}) == PARTITIONS
    assert await rows(parallel) == expected
    assert await rows(resumed) == expected
    completed = {r.run_id: r for r in expected if r.status is RunStatus.COMPLETED}
    assert completed, "no run completed after the resume point"
    for event in opened:
        row = next(r for r in expected if r.run_id == event.run_id)
        assert row.initial_data == event.initial_data
    assert not await asyncio.to_thread(lambda: list(tmp_path.glob(".*.replay-lock")))


async def test_a_failed_replay_process_names_its_partitions_and_reason() -> None:
    """The parent relays progress up to the failure, then the child's last error line."""
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        'import sys; print(\'{"records": 7, "events": 5}\', flush=True); '
        "sys.exit('KafkaConnectionError: Unable to bootstrap from [(\"nowhere\", 9092)]')",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    seen: list[tuple[int, int]] = []
    with pytest.raises(ReplayError) as failed:
        await _follow(child, [1, 3], lambda records, events: seen.append((records, events)))
    assert seen == [(7, 5)]
    assert str(failed.value) == (
        "replaying status partitions [1, 3] failed: "
        'KafkaConnectionError: Unable to bootstrap from [("nowhere", 9092)]'
    )


async def test_progress_ends_at_its_total_on_a_transactional_log(
    worker: RunningWorker, topics: Settings, tmp_path: Path
) -> None:
    """A worker's status topic holds a commit marker per transaction: offsets the replay
    reads no record for. The progress it reports still ends at its total."""
    from worker.client import JobClient

    async with JobClient(topics) as jobs:
        for n in range(5):
            decision = await jobs.start_job(f"marked-{n}")
            await jobs.complete_job(f"marked-{n}", decision.run_id or "")
    progress: list[tuple[int, int]] = []
    report = await replay(
        topics,
        tmp_path / "marked.db",
        from_offset=0,
        processes=1,
        progress=lambda done, total: progress.append((done, total)),
    )
    assert report.events == 10
    done, total = progress[-1]
    assert done == total
    assert total > report.events  # the markers are counted in the total


def test_the_progress_bar_says_it_counts_offsets_read(monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar counts the status topic's offsets (transaction markers among them), the
    summary after it events: the bar says what it counts."""
    from rich.console import Console

    from worker import cli

    shown = Console(record=True, force_terminal=True, width=100)
    monkeypatch.setattr(cli, "err", shown)
    bar, update = cli._progress_bar("replaying")
    with bar:
        update(19_205, 19_205)
    assert "19205/19205 offsets read" in shown.export_text()


@pytest.mark.kafka
async def test_a_read_of_ranges_leaves_nothing_assigned(topics: Settings) -> None:
    """`replay` and `verify` read one topic after another through one consumer: a read that
    left its partitions assigned kept a fetch waiting at the broker, and the next topic's
    offsets request waited it out (a `verify` of five records took 7 s, 0.5 s once nothing
    is left assigned). After a whole read, and after a read stopped early, none is."""
    from aiokafka import AIOKafkaProducer

    from worker.audit.replay import consumer_for, read_ranges, whole_topic
    from worker.kafkaio import connection, start_client

    producer = AIOKafkaProducer(**connection(topics))
    await producer.start()
    try:
        for partition in (0, 1):
            await producer.send_and_wait(topics.topics.dlq, b"{}", key=b"k", partition=partition)
    finally:
        await producer.stop()
    consumer = consumer_for(topics)
    await start_client(consumer)
    try:
        ranges = await whole_topic(consumer, topics.topics.dlq)
        read = [r async for _, rs in read_ranges(consumer, ranges, topics.topics.dlq) for r in rs]
        assert len(read) == 2
        assert consumer.assignment() == set()
        async with contextlib.aclosing(read_ranges(consumer, ranges, topics.topics.dlq)) as rows:
            async for _ in rows:
                break  # a reader that stops early, and closes the read
        assert consumer.assignment() == set()
    finally:
        await consumer.stop()
