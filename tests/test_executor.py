"""Executors as real processes: stopped, killed, rebalanced, split by job type, joining late.

Every test counts, from the executors' journal and the status topic, runs started, executed
and outcomes recorded: work is at least once, each run has one outcome.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from schemas import ENDING_EVENTS, RUN_ROW_PREFIX, EventType, RunRecord, RunStatus, StatusEvent
from tests.chaos import WorkerProcess
from tests.conftest import RunningWorker, create_topics
from tests.executor_process import ExecutorProcess
from worker.client import Executor, JobClient, RunContext
from worker.client.execution import SYSTEM_NOTES
from worker.client.watch import StatusTail
from worker.devtools.localkafka import LocalKafka
from worker.engine.codec import partition_for
from worker.kafkaio import connection, partitions_of
from worker.settings import Settings

pytestmark = pytest.mark.kafka


@pytest.fixture
async def client(topics: Settings) -> AsyncIterator[JobClient]:
    """A client on this test's topics."""
    async with JobClient(topics) as instance:
        yield instance


@pytest.fixture
def spawn(topics: Settings, tmp_path: Path) -> Iterator[Any]:
    """Start executor processes; every one still alive is killed after the test."""
    started: list[ExecutorProcess] = []

    def start(name: str, *jobs: str, options: tuple[str, ...] = ()) -> ExecutorProcess:
        process = ExecutorProcess(topics, tmp_path, name, *jobs).start(*options)
        started.append(process)
        return process

    yield start
    for process in started:
        process.ensure_dead()
        # Shown by pytest only when the test failed: what each executor did and logged.
        print(f"--- executor {process.name} (pid {process.pid}) ---\n{process.log_tail()}")
    journal = started[0].journal if started else None
    if journal is not None and journal.exists():
        print("--- journal ---\n" + journal.read_text(errors="replace"))


def ends(tail: StatusTail, run_id: str | None) -> list[StatusEvent]:
    """The events that ended `run_id`, and any rejection about it."""
    return [
        e
        for e in tail.events
        if e.run_id == run_id and (e.type in ENDING_EVENTS or e.type is EventType.REJECTED)
    ]


async def test_sigterm_finishes_short_jobs_and_hands_long_ones_back(
    worker: RunningWorker, client: JobClient, tail: StatusTail, spawn: Any
) -> None:
    """SIGTERM: a job that fits the grace reports; one that does not runs again elsewhere."""
    first = spawn("first", "short", "long", options=("--grace", "3"))
    await first.ready()
    short = await client.start_job("short", initial_data={"seconds": 1})
    long = await client.start_job("long", initial_data={"seconds": 8})
    await first.wait_for("both jobs", lambda: len(first.entries(event="start")) == 2)
    assert await first.terminate() == 0
    done = await tail.wait_event(run_id=short.run_id, type=EventType.COMPLETED)
    assert done.metrics == {"pid": first.pid}
    assert await client.is_run_running(long.run_id or "")  # handed back, not lost

    second = spawn("second", "short", "long")
    finished = await tail.wait_event(run_id=long.run_id, type=EventType.COMPLETED, timeout=60)
    assert finished.metrics == {"pid": second.pid}
    # At least once: handed back unfinished, the long job ran again, to the end, in `second`.
    started = [e["pid"] for e in second.entries(event="start", run_id=long.run_id)]
    assert started == [first.pid, second.pid]
    assert not second.entries(run_id=short.run_id, pid=second.pid)  # its outcome landed
    assert [e.type for e in ends(tail, short.run_id)] == [EventType.COMPLETED]
    assert [e.type for e in ends(tail, long.run_id)] == [EventType.COMPLETED]


async def test_a_killed_executor_s_run_is_run_again_and_recorded_once(
    worker: RunningWorker, client: JobClient, tail: StatusTail, spawn: Any
) -> None:
    """SIGKILL mid-job: the next executor of the group runs it; one outcome is recorded."""
    first = spawn("first", "etl")
    await first.ready()
    run = await client.start_job("etl", initial_data={"seconds": 30})
    await first.wait_for("the job", lambda: bool(first.entries(event="start")))
    first.kill()
    second = spawn("second", "etl")
    await second.wait_for("the job again", lambda: bool(second.entries(pid=second.pid)))
    await client.cancel_job("etl", run.run_id)  # cut the 30 s short; it reaches `second`
    await second.wait_for(
        "the cancel", lambda: bool(second.entries(event="cancelled", pid=second.pid))
    )
    assert [e["pid"] for e in second.entries(event="start")] == [first.pid, second.pid]
    await tail.wait_event(run_id=run.run_id, type=EventType.CANCELLED)
    assert [e.type for e in ends(tail, run.run_id)] == [EventType.CANCELLED]


async def test_executors_of_disjoint_job_types_each_run_theirs(
    worker: RunningWorker, client: JobClient, tail: StatusTail, spawn: Any
) -> None:
    """Two processes, different job types, default groups: every run runs, once.

    A job type takes one run at a time by default (a second start is refused while the
    first runs), so each round of starts waits for the round before it to complete; the
    two job types' runs of a round run at once, one in each process."""
    mail = spawn("mail", "mail.send")
    index = spawn("index", "index.build")
    await mail.ready()
    await index.ready()
    runs = []
    for n in range(3):
        round_ = [
            await client.start_job(job_type, client_id=f"c{n}")
            for job_type in ("mail.send", "index.build")
        ]
        assert [d.type for d in round_] == [EventType.STARTED] * 2
        for decision in round_:
            await tail.wait_event(run_id=decision.run_id, type=EventType.COMPLETED)
        runs.extend(round_)
    starts = mail.entries(event="start")
    assert sorted(e["run_id"] for e in starts) == sorted(r.run_id for r in runs)
    assert len(mail.entries(event="start", pid=mail.pid)) == 3
    assert len(index.entries(event="start", pid=index.pid)) == 3


async def test_a_cancel_reaches_the_job_after_a_rebalance(
    worker: RunningWorker, client: JobClient, tail: StatusTail, spawn: Any
) -> None:
    """A second executor joins and a partition moves; cancels still stop every job wherever
    it runs, and its heartbeats stop with it."""
    options = ("--group", "shared", "--heartbeat", "1", "--cancel-grace", "2")
    first = spawn("first", "c", "d", options=options)
    await first.ready()
    runs = [await client.start_job(t, initial_data={"seconds": 60}) for t in ("c", "d")]
    await first.wait_for("both jobs", lambda: len(first.entries(event="start")) == 2)
    second = spawn("second", "c", "d", options=options)
    await second.ready()  # c and d are on different partitions: one moved, with its run
    await second.wait_for("the moved run", lambda: bool(second.entries(pid=second.pid)))
    for decision in runs:
        await client.cancel_job(decision.event.job_type, decision.run_id)

    def all_stopped() -> bool:
        # Every process that started a run has seen it stop (cancelled or handed back).
        started = {(e["pid"], e["run_id"]) for e in first.entries(event="start")}
        stopped = {(e["pid"], e["run_id"]) for e in first.entries(event="cancelled")}
        return started <= stopped

    await first.wait_for("every job stopped", all_stopped)
    # Probes decided after whatever the executors sent before they stopped.
    for job_type in ("c", "d"):
        await client.report_progress(job_type, f"probe-{job_type}")
        await tail.wait_event(run_id=f"probe-{job_type}", type=EventType.REJECTED)
    for decision in runs:
        events = ends(tail, decision.run_id)
        assert events[0].type is EventType.CANCELLED
        # At most a heartbeat already in flight when the cancel was decided, per process.
        assert len(events) - 1 <= len({e["pid"] for e in first.entries(run_id=decision.run_id)})
    assert not first.entries(event="finish")


async def test_a_new_group_runs_what_was_started_before_it_joined(
    worker: RunningWorker, client: JobClient, tail: StatusTail, spawn: Any
) -> None:
    """A group with no offsets starts at its oldest RUNNING run, not at the topic's end
    (at the topic's start when that run began as Kafka's times begin); a run that already
    ended is not run again."""
    done = await client.start_job("report")
    await client.complete_job("report", done.run_id or "")
    waiting = await client.start_job("report", initial_data={"seconds": 0})
    # A RUNNING row started as Kafka's times begin: the new group's start, a margin before
    # its oldest run, would fall before 1970; it reads from the status topic's start instead.
    epoch = RunRecord(
        run_id="700101-000000-0.0",
        job_type="report",
        client_id=None,
        request_id=None,
        status=RunStatus.RUNNING,
        partition=partition_for(b"report", 2),  # the `topics` fixture's partitions
        started_at=datetime(1970, 1, 1, tzinfo=UTC),
        ended_at=None,
        initial_data={},
        metrics=None,
        reason=None,
    )
    producer = AIOKafkaProducer(**connection(client.settings))
    await producer.start()
    try:
        await producer.send_and_wait(
            client.topics.state,
            RUN_ROW_PREFIX + epoch.model_dump_json().encode() + b"}",
            key=epoch.run_id.encode(),
            partition=epoch.partition,
        )
    finally:
        await producer.stop()
    late = spawn("late", "report")
    finished = await tail.wait_event(run_id=waiting.run_id, type=EventType.COMPLETED, timeout=60)
    assert finished.metrics == {"pid": late.pid}
    assert [e["run_id"] for e in late.entries(event="start", pid=late.pid)] == [waiting.run_id]


async def test_a_job_s_bad_return_value_fails_the_run_with_the_reason(
    worker: RunningWorker, client: JobClient, tail: StatusTail
) -> None:
    """A non-mapping return and metrics that are not JSON end the run FAILED, explained."""
    executor = Executor(client)

    @executor.job("listy")
    async def listy(run: RunContext) -> Any:
        return [1, 2]

    @executor.job("setty")
    async def setty(run: RunContext) -> Any:
        return {"seen": {1, 2}}

    @executor.job("deep")
    async def deep(run: RunContext) -> Any:  # the worker would dead-letter it: too_deep
        value: dict[str, Any] = {}
        for _ in range(40):
            value = {"a": value}
        return value

    @executor.job("intkeys")
    async def intkeys(run: RunContext) -> Any:  # JSON makes the key a string: reported so
        return {1: "a"}

    with pytest.raises(TypeError, match="not a coroutine function; write it with async def"):

        @executor.job("plain")
        def plain(run: RunContext) -> Any:
            return {"ok": 1}

    stop = asyncio.Event()
    task = asyncio.create_task(executor.run(stop))
    try:
        await asyncio.wait_for(executor.ready.wait(), 30)
        bad_type = await client.start_job("listy")
        bad_json = await client.start_job("setty")
        too_deep = await client.start_job("deep")
        keyed = await client.start_job("intkeys")
        failed = await tail.wait_event(run_id=bad_type.run_id, type=EventType.FAILED)
        assert failed.metrics == {SYSTEM_NOTES: "the job returned list, not a mapping of metrics"}
        failed = await tail.wait_event(run_id=bad_json.run_id, type=EventType.FAILED)
        assert failed.metrics is not None
        assert "not JSON" in failed.metrics[SYSTEM_NOTES]
        failed = await tail.wait_event(run_id=too_deep.run_id, type=EventType.FAILED)
        assert failed.metrics is not None
        assert "JOBS_MAX_NESTING_DEPTH" in failed.metrics[SYSTEM_NOTES]
        done = await tail.wait_event(run_id=keyed.run_id, type=EventType.COMPLETED)
        assert done.metrics == {"1": "a"}
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def test_a_redelivered_run_that_already_ended_is_not_run_again(
    worker: RunningWorker, topics: Settings, client: JobClient, tail: StatusTail
) -> None:
    """An executor group that reads `started` events again (its offsets behind, as after a
    crash between an outcome and its commit) runs only what is still RUNNING."""
    ended = await client.start_job("sync")
    await client.complete_job("sync", ended.run_id or "")
    running = await client.start_job("sync", client_id="other", initial_data={"n": 2})
    rewind = AIOKafkaConsumer(bootstrap_servers=topics.bootstrap_servers, group_id="behind")
    await rewind.start()
    try:
        status = await partitions_of(rewind, topics.topics.status)
        rewind.assign(status)
        await rewind.commit(dict.fromkeys(status, 0))
    finally:
        await rewind.stop()
    executor = Executor(client, group="behind")
    ran: list[str] = []

    @executor.job("sync")
    async def sync(run: RunContext) -> None:
        ran.append(run.run_id)

    stop = asyncio.Event()
    task = asyncio.create_task(executor.run(stop))
    try:
        await tail.wait_event(run_id=running.run_id, type=EventType.COMPLETED)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
    assert ran == [running.run_id]


async def test_an_outcome_outlives_a_broker_outage(tmp_path: Path) -> None:
    """The broker dies mid-job for a minute: the executor keeps the outcome and delivers it
    once the broker is back; the run ends COMPLETED, once."""
    outage = float(os.environ.get("JOBS_TEST_OUTAGE_S", "60"))
    broker = LocalKafka(data_dir=tmp_path / "kafka")
    await asyncio.to_thread(broker.start)
    worker: WorkerProcess | None = None
    executor: ExecutorProcess | None = None
    try:
        settings = Settings(
            bootstrap_servers=broker.bootstrap_servers,
            topic_prefix="outage",
            db_path=tmp_path / "worker.db",
            poll_timeout_ms=100,
            http_port=0,
        )
        await create_topics(settings, 1)
        worker = WorkerProcess(settings, "worker", tmp_path)
        worker.start()
        executor = ExecutorProcess(settings, tmp_path, "executor", "etl").start()
        await executor.ready(timeout=120)
        async with JobClient(settings) as jobs:
            run = await jobs.start_job("etl", initial_data={"seconds": 3}, timeout=60)
        await executor.wait_for("the job", lambda: bool(executor.entries(event="start")))
        await asyncio.to_thread(broker.kill)
        killed = time.monotonic()
        await executor.wait_for("its end", lambda: bool(executor.entries(event="finish")))
        # The outage itself is the fault under test: the broker stays down this long.
        await asyncio.sleep(max(0.0, outage - (time.monotonic() - killed)))
        await asyncio.to_thread(broker.start)
        if not worker.alive():  # a supervisor restarts a worker that gave up; it converges
            worker.start()
        async with StatusTail(settings.bootstrap_servers, settings.topics) as tail:
            done = await tail.wait_event(run_id=run.run_id, type=EventType.COMPLETED, timeout=180)
            assert done.metrics == {"pid": executor.pid}
            assert [e.type for e in ends(tail, run.run_id)] == [EventType.COMPLETED]
        assert "outcome not delivered yet; retrying" in executor.log_path.read_text()
        assert len(executor.entries(event="start")) == 1  # it ran once
    finally:
        for process in (executor, worker):
            if process is not None:
                process.ensure_dead()
        await asyncio.to_thread(broker.stop)


async def test_a_job_that_ignores_cancellation_does_not_hold_the_executor(
    worker: RunningWorker, client: JobClient, tail: StatusTail
) -> None:
    """Stopping with a job that swallows CancelledError: `run()` returns once the grace and
    the cancel grace are over, and the run is handed back, still RUNNING."""
    executor = Executor(client, grace=0.5, cancel_grace=0.5)
    release = asyncio.Event()
    started = asyncio.Event()

    @executor.job("stubborn")
    async def stubborn(run: RunContext) -> None:
        started.set()
        while not release.is_set():
            try:
                await release.wait()
            except asyncio.CancelledError:
                continue  # ignores every cancellation until the test releases it

    stop = asyncio.Event()
    task = asyncio.create_task(executor.run(stop))
    await asyncio.wait_for(executor.ready.wait(), 30)
    run = await client.start_job("stubborn")
    await asyncio.wait_for(started.wait(), 30)
    stop.set()
    try:
        await asyncio.wait_for(task, 15)  # 0.5 s grace + 0.5 s cancel grace, then it returns
        assert await client.is_run_running(run.run_id or "")  # handed back, not reported
    finally:
        release.set()
