"""The client's running view starts each partition of `<prefix>.state` at the orchestrator's
last view mark, not at the topic's start: far fewer records read, the same runs seen."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import ValidationError

from schemas import (
    RUN_ROW_PREFIX,
    VIEW_ROW_KEY,
    RunRecord,
    RunStatus,
    ViewMark,
    parse_run_row,
    parse_view_row,
    view_row,
)
from tests.conftest import RunningWorker
from worker.client import JobClient, JobConnectionError
from worker.client.view import RunningView
from worker.engine.codec import partition_for
from worker.kafkaio import assign_all, connection, read_until
from worker.settings import LONGEST_S, Settings

HISTORY = 3_000  # ended runs of an hour ago
PARTITIONS = 2

HOSTILE = [
    os.urandom(200),
    b'{"row":"view","v":1,"mark":\xff\xfe}',
    b'{"row":"view","v":1,"mark":' + b"[" * 5_000 + b"}",
    b'{"row":"view","mark":{"since":"yesterday","every_s":-1}}',
    b'{"row":"view","mark":{"since":"' + b"9" * 1_000_000 + b'","every_s":1}}',
    b'{"row":"view","mark":' + b'{"a":' * 5_000 + b"1" + b"}" * 5_001,
    b'{"row":"run","run":{"status":"RUNNING","x":' + b"[" * 5_000 + b"}}",
    b'{"row":"run","run":{"status":"RUNNING","run_id":7}}',
    b'{"row":"run","v":1,"run":{"status":"RUNNING",\xc3\x28}',
    # times no reader can use: without an offset, before Kafka's 1970, out of range in UTC
    b'{"row":"view","v":1,"mark":{"since":"2026-12-02T10:00:00","every_s":60}}',
    b'{"row":"view","v":1,"mark":{"since":"0001-01-01T00:00:00+05:00","every_s":60}}',
    b'{"row":"run","v":1,"run":{"run_id":"t","job_type":"t","client_id":null,'
    b'"request_id":null,"status":"RUNNING","partition":0,"started_at":"1960-01-01T00:00:00Z",'
    b'"ended_at":null,"initial_data":{},"metrics":null,"reason":null}}',
    b'{"row":"run","v":1,"run":{"run_id":"u","job_type":"u","client_id":null,'
    b'"request_id":null,"status":"RUNNING","partition":0,"started_at":"2026-12-02T10:00:00",'
    b'"ended_at":null,"initial_data":{},"metrics":null,"reason":null}}',
]


def test_hostile_view_and_run_rows_are_errors_not_crashes() -> None:
    """Whatever the bytes, a view or run row parses or raises ValidationError."""
    for value in HOSTILE:
        if value.startswith(b'{"row":"view"'):
            with pytest.raises(ValidationError):
                parse_view_row(value)
        elif value.startswith(b'{"row":"run"'):
            with pytest.raises(ValidationError):
                parse_run_row(value)
    mark = ViewMark(since=datetime(2026, 12, 2, tzinfo=UTC), every_s=300)
    key, value = view_row(mark)
    assert (key, parse_view_row(value)) == (VIEW_ROW_KEY, mark)
    assert parse_view_row(b'{"row":"run"}') is None


def _run_row(run_id: str, job_type: str, status: RunStatus, at: datetime) -> bytes:
    run = RunRecord(
        run_id=run_id,
        job_type=job_type,
        client_id=None,
        request_id=f"r-{run_id}",
        status=status,
        partition=partition_for(job_type.encode(), PARTITIONS),
        started_at=at,
        ended_at=None if status is RunStatus.RUNNING else at,
        initial_data={},
        metrics=None,
        reason=None,
    )
    return RUN_ROW_PREFIX + run.model_dump_json().encode() + b"}"


@pytest.fixture
async def history(topics: Settings) -> Settings:
    """An hour-old history in the state topic: HISTORY ended runs and one still RUNNING
    (`ancient`), then hostile rows stamped now (under the view's key, run IDs and keys that
    are not UTF-8), as anyone who may write the topic could."""
    an_hour_ago = datetime.now(UTC) - timedelta(hours=1)
    stamp = int(an_hour_ago.timestamp() * 1000)
    producer = AIOKafkaProducer(**connection(topics))
    await producer.start()
    try:
        rows = [(f"old-{n}", f"type-{n % 50}", RunStatus.COMPLETED) for n in range(HISTORY)]
        rows.append(("ancient", "ancient", RunStatus.RUNNING))
        for run_id, job_type, status in rows:
            await producer.send(
                topics.topics.state,
                _run_row(run_id, job_type, status, an_hour_ago),
                key=run_id.encode(),
                partition=partition_for(job_type.encode(), PARTITIONS),
                timestamp_ms=stamp,
            )
        for n, value in enumerate(HOSTILE):  # neither a restore nor a view stops on them
            for key in (VIEW_ROW_KEY, f"bad-{n}".encode(), b"\xff\xfe" + bytes([n])):
                await producer.send(topics.topics.state, value, key=key, partition=n % 2)
        await producer.flush()
    finally:
        await producer.stop()
    return topics


async def _marks(settings: Settings) -> dict[int, ViewMark]:
    """The latest readable view mark of each partition of the state topic."""
    consumer = AIOKafkaConsumer(isolation_level="read_committed", **connection(settings))
    await consumer.start()
    try:
        partitions = await assign_all(consumer, settings.topics.state, at="beginning")
        ends = await consumer.end_offsets(partitions)
        marks: dict[int, ViewMark] = {}
        async for tp, records in read_until(consumer, ends, max_records=10_000):
            for record in records:
                if record.key == VIEW_ROW_KEY and record.value is not None:
                    try:
                        mark = parse_view_row(record.value)
                    except ValidationError:
                        continue
                    if mark is not None:
                        marks[tp.partition] = mark
        return marks
    finally:
        await consumer.stop()


async def _until_marked(settings: Settings, after: datetime) -> dict[int, ViewMark]:
    """Every partition's mark, once each has one made after `after`."""
    async with asyncio.timeout(60):
        while True:
            marks = await _marks(settings)
            if len(marks) == PARTITIONS and all(m.since > after for m in marks.values()):
                return marks
            await asyncio.sleep(0.2)  # polling the topic for the worker's next mark


async def _seen(settings: Settings, window: timedelta | None) -> tuple[set[str], int]:
    """(running run IDs, records read) of a view opened now with `window`."""
    view = RunningView(settings.topics.state, connection(settings), window=window)
    await view.open()
    try:
        await view.sync(60)
        return {r.run_id for r in view.runs()}, view.records_read
    finally:
        await view.close()


@pytest.mark.kafka
async def test_the_view_starts_at_the_last_mark_and_sees_every_running_run(
    history: Settings,
) -> None:
    """A restored worker re-publishes the hour-old running run with its first mark; a client
    then reads a few records, not the history, and sees it with the runs started since."""
    began = datetime.now(UTC) - timedelta(seconds=10)
    worker = await RunningWorker(history).start()
    try:
        async with JobClient(history) as client:
            fresh = await client.start_job("fresh")
        await _until_marked(history, began)
        async with JobClient(history) as client:
            running = {r.run_id for r in await client.running_jobs()}
            read = client.view.records_read
        assert running == {"ancient", fresh.run_id}
        assert read < 100, f"read {read} records of a {HISTORY}-record history"
        whole, read_all = await _seen(history, window=None)
        assert whole == running
        assert read_all > HISTORY
    finally:
        await worker.stop()


@pytest.mark.kafka
async def test_a_mark_earlier_than_the_window_sends_the_view_back_to_its_since(
    history: Settings,
) -> None:
    """A window starting between a mark's `since` and the mark itself: the view goes back to
    `since`, and still reads only the recent part."""
    began = datetime.now(UTC) - timedelta(seconds=10)
    worker = await RunningWorker(history).start()
    try:
        marks = await _until_marked(history, began)
        start = max(m.since for m in marks.values()) + timedelta(seconds=1)
        seen, read = await _seen(history, window=datetime.now(UTC) - start)
        assert seen == {"ancient"}
        assert read < 100
    finally:
        await worker.stop()


@pytest.mark.kafka
async def test_without_a_mark_in_the_window_the_view_reads_from_the_start(
    history: Settings,
) -> None:
    """Marks switched off (or no worker for a while): recent rows alone vouch for nothing, so
    the view reads every partition from its start and still sees the hour-old running run."""
    quiet = history.model_copy(update={"view_refresh_s": 0})
    worker = await RunningWorker(quiet).start()
    try:
        async with JobClient(quiet) as client:
            fresh = await client.start_job("fresh")
        seen, read = await _seen(quiet, window=timedelta(minutes=2))
        assert seen == {"ancient", fresh.run_id}
        assert read > HISTORY
        assert await _marks(quiet) == {}
    finally:
        await worker.stop()


@pytest.mark.kafka
async def test_hostile_rows_never_stop_the_view(topics: Settings) -> None:
    """Random bytes, bad UTF-8, deep nesting, huge values and wrong types, under run IDs and
    the view's key: the view skips them and sees the one valid running run."""
    producer = AIOKafkaProducer(**connection(topics))
    await producer.start()
    try:
        for n, value in enumerate(HOSTILE):
            for key in (f"bad-{n}".encode(), VIEW_ROW_KEY):
                await producer.send(topics.topics.state, value, key=key, partition=n % 2)
        now = datetime.now(UTC)
        await producer.send(
            topics.topics.state,
            _run_row("valid", "valid", RunStatus.RUNNING, now),
            key=b"valid",
            partition=partition_for(b"valid", PARTITIONS),
        )
        await producer.flush()
    finally:
        await producer.stop()
    # a window of a century reaches before Kafka's times begin: read from the start
    for window in (None, timedelta(minutes=2), timedelta(seconds=LONGEST_S)):
        seen, read = await _seen(topics, window)
        assert seen == {"valid"}
        assert read == 2 * len(HOSTILE) + 1


SLOW_ROWS = 5_000  # read 500 at a time, 0.1 s apart: about a second in all


async def test_a_long_read_that_moves_is_waited_for_and_a_stuck_one_is_not(
    topics: Settings,
) -> None:
    """`sync` gives up only when the read stops moving: a slow reader that takes twice the
    timeout to read the state topic, moving every 0.1 s, is waited for to the end (it used
    to raise TimeoutError at the timeout, so `jobctl status` over a million runs failed),
    while a reader that cannot move gives up after the timeout."""
    producer = AIOKafkaProducer(linger_ms=50, **connection(topics))
    await producer.start()
    try:
        row = b'{"row":"job","v":2,"held":[0,0],"state":{}}'
        for n in range(SLOW_ROWS):
            await producer.send(topics.topics.state, row, key=f"job-{n}".encode())
        await producer.flush()
    finally:
        await producer.stop()

    view = RunningView(topics.topics.state, connection(topics))
    await view.open()
    fetch = view._reader.getmany

    async def slowly(*partitions: object, timeout_ms: int = 0) -> Any:
        await asyncio.sleep(0.1)  # the slow read under test, not a wait for anything
        return await fetch(*partitions, timeout_ms=timeout_ms, max_records=500)

    view._reader.getmany = slowly  # type: ignore[method-assign]
    try:
        began = asyncio.get_running_loop().time()
        await view.sync(0.5)
        assert view.records_read == SLOW_ROWS
        assert asyncio.get_running_loop().time() - began > 0.5  # longer than the timeout
    finally:
        await view.close()

    stuck = RunningView(topics.topics.state, connection(topics))
    await stuck.open()
    try:
        stuck._reader.pause(*stuck._reader.assignment())  # a read that cannot move
        with pytest.raises(TimeoutError):
            await stuck.sync(0.5)
    finally:
        await stuck.close()


async def test_a_client_whose_view_cannot_move_says_so_in_one_error(
    topics: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Opening a client whose running view reads nothing for the stall timeout ends in a
    JobConnectionError naming the state topic, with nothing left open."""
    HISTORY_ROWS = 10
    producer = AIOKafkaProducer(**connection(topics))
    await producer.start()
    try:
        for n in range(HISTORY_ROWS):
            await producer.send_and_wait(topics.topics.state, b"{}", key=f"job-{n}".encode())
    finally:
        await producer.stop()
    opened = RunningView.open

    async def open_stuck(view: RunningView) -> None:
        await opened(view)
        view._reader.pause(*view._reader.assignment())  # a read that cannot move

    monkeypatch.setattr(RunningView, "open", open_stuck)
    monkeypatch.setattr("worker.client.jobclient._VIEW_STALL_S", 0.5)
    before = asyncio.all_tasks()
    with pytest.raises(JobConnectionError) as failed:
        async with JobClient(topics):
            pass
    assert f"could not read the running view: {topics.topics.state} gave nothing" in str(
        failed.value
    )
    assert asyncio.all_tasks() - before == set()
