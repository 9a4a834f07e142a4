"""A stop that fails or hangs: the worker still exits, and its SQLite file serves the next.

`jobctl run` stops in steps (drain the batches in flight, leave the group, close the
producers, close SQLite, stop HTTP). A step that fails must not skip the ones after it:
SQLite's connection thread, left open, would keep the process from ever exiting. A stop the
event loop cannot time out (a call that never returns) ends by the watchdog. Either way the
next worker on the file serves the runs started before and decides every input once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaProducer

from schemas import EventType, StatusEvent
from tests.chaos import WorkerProcess
from tests.test_damaged_state import (
    START_S,
    assert_converged,
    assert_served,
    job_types,
    log_lines,
    start,
)
from worker.client.watch import StatusTail
from worker.settings import Settings
from worker.watchdog import EXIT_CODE, StopWatchdog


async def started_runs(
    s: Settings, producer: AIOKafkaProducer, tail: StatusTail
) -> dict[str, StatusEvent]:
    """A run started on each partition of the worker on `s.db_path`."""
    started = {}
    for job_type in job_types("stopping"):
        event = await tail.wait_event(START_S, request_id=await start(producer, s, job_type))
        assert event.type is EventType.STARTED
        started[job_type] = event
    return started


async def started_then_stopped(
    process: WorkerProcess, s: Settings, producer: AIOKafkaProducer, tail: StatusTail
) -> tuple[dict[str, StatusEvent], int, float]:
    """Start `process`, start a run on each partition, SIGTERM it: the runs, its exit code
    and the seconds from SIGTERM to its exit."""
    process.start()
    try:
        runs = await started_runs(s, producer, tail)
        asked = time.monotonic()
        code = await process.terminate(timeout=60)
        return runs, code, time.monotonic() - asked
    finally:
        process.ensure_dead()


async def served_by_the_next(
    s: Settings,
    producer: AIOKafkaProducer,
    tail: StatusTail,
    tmp_path: Path,
    runs: dict[str, StatusEvent],
) -> None:
    """A worker started on the file after the stop serves `runs`; stopped, each input was
    decided once and the file equals the status topic's state."""
    again = WorkerProcess(s, "worker", tmp_path)
    again.start()
    try:
        await assert_served(s, producer, tail, runs)
        await assert_converged(s, again, tmp_path)
    finally:
        again.ensure_dead()


def events_named(process: WorkerProcess, text: str) -> list[dict[str, Any]]:
    records, _ = log_lines(process)
    return [r for r in records if text in str(r.get("event"))]


@pytest.mark.kafka
@pytest.mark.timeout(300)
async def test_a_failed_step_of_stopping_leaves_the_others_to_run(
    topics: Settings, producer: AIOKafkaProducer, tail: StatusTail, tmp_path: Path
) -> None:
    """The first step of the stop fails: the worker still leaves the group and closes
    SQLite, says which step failed, and exits 1 at once; a worker restarted on the file
    serves the runs started before, and every input is decided once."""
    failing = WorkerProcess(topics, "worker", tmp_path, fault_point="fail_stopping")
    runs, code, _ = await started_then_stopped(failing, topics, producer, tail)
    assert code == 1, failing.log_text()[-4000:]
    [failure] = events_named(failing, "a step of stopping failed")
    assert failure["step"] == "draining the batches in flight"
    assert "injected fault while stopping" in failure["error"]
    [stopped] = events_named(failing, "worker stopped")
    assert stopped["failed_steps"] == ["draining the batches in flight"]

    await served_by_the_next(topics, producer, tail, tmp_path, runs)


@pytest.mark.kafka
@pytest.mark.timeout(300)
async def test_jobctl_run_itself_reads_no_fault_points(
    topics: Settings, producer: AIOKafkaProducer, tail: StatusTail, tmp_path: Path
) -> None:
    """The crash tests' variables in a production worker's environment do nothing: `jobctl
    run` stops cleanly where the crash tests' entry point would fail its stop."""
    plain = WorkerProcess(topics, "worker", tmp_path, fault_point="fail_stopping")
    plain.module = "worker.cli"
    _, code, _ = await started_then_stopped(plain, topics, producer, tail)
    assert code == 0, plain.log_text()[-4000:]
    assert "injected fault" not in plain.log_text()
    assert events_named(plain, "worker stopped")[0].get("failed_steps") in (None, [])


@pytest.mark.kafka
@pytest.mark.timeout(300)
async def test_a_stop_whose_event_loop_never_returns_ends_by_the_watchdog(
    topics: Settings, producer: AIOKafkaProducer, tail: StatusTail, tmp_path: Path
) -> None:
    """The event loop blocks for good as the stop begins: no timeout inside can fire, and
    the watchdog ends the process with one line, its bound plus its grace after SIGTERM; the
    next worker on the file serves the runs started before."""
    bound = 1.0
    hanging = WorkerProcess(
        topics, "worker", tmp_path, fault_point="hang_stopping", shutdown_timeout_s=str(bound)
    )
    runs, code, took = await started_then_stopped(hanging, topics, producer, tail)
    assert code == EXIT_CODE, hanging.log_text()[-4000:]
    [fired] = events_named(hanging, "exiting hard")
    assert fired["seconds"] == bound + 5.0
    assert bound + 5.0 <= took < 30, took
    assert events_named(hanging, "worker stopped") == []

    await served_by_the_next(topics, producer, tail, tmp_path, runs)


@pytest.mark.kafka
@pytest.mark.timeout(300)
@pytest.mark.parametrize("failed_before", [False, True], ids=["alone", "after-a-failed-step"])
async def test_a_stop_held_by_a_locked_sqlite_file_ends_at_its_bound(
    topics: Settings,
    producer: AIOKafkaProducer,
    tail: StatusTail,
    tmp_path: Path,
    failed_before: bool,
) -> None:
    """Another process holds the SQLite file's write lock, so the worker's last write waits:
    the stop ends at its bound with one line and exit 1, nothing decided twice, also when a
    step of the stop had failed before (not 5 s later, by the watchdog); once the lock is
    let go, the next worker on the file serves the runs started before."""
    bound = 2.0
    faults = {"fault_point": "fail_stopping"} if failed_before else {}
    held = WorkerProcess(topics, "worker", tmp_path, shutdown_timeout_s=str(bound), **faults)
    held.start()
    locker = sqlite3.connect(held.db_path, isolation_level=None, timeout=30)
    try:
        runs = await started_runs(topics, producer, tail)
        locker.execute("BEGIN IMMEDIATE")  # the write lock, as a long write elsewhere holds it
        # Committed to Kafka, queued for SQLite behind the lock.
        extra = await tail.wait_event(
            START_S, request_id=await start(producer, topics, "stopping-while-locked")
        )
        assert extra.type is EventType.STARTED
        asked = time.monotonic()
        assert await held.terminate(timeout=60) == 1, held.log_text()[-4000:]
        took = time.monotonic() - asked
    finally:
        held.ensure_dead()
        with contextlib.suppress(sqlite3.Error):
            locker.rollback()
        locker.close()
    [late] = events_named(held, "stopping took too long")
    assert late["seconds"] == bound
    assert events_named(held, "worker stopped") == []
    assert f"stopping took over {bound:g} s; exited without it" in held.log_text()
    assert events_named(held, "exiting hard") == []  # at its bound, before the watchdog
    assert bound <= took < bound + 5.0, took
    failed = [e["step"] for e in events_named(held, "a step of stopping failed")]
    assert failed == (["draining the batches in flight"] if failed_before else [])

    await served_by_the_next(topics, producer, tail, tmp_path, runs)


@pytest.mark.kafka
@pytest.mark.timeout(300)
async def test_a_worker_whose_log_reader_went_away_still_serves_and_stops(
    topics: Settings, producer: AIOKafkaProducer, tail: StatusTail, tmp_path: Path
) -> None:
    """The reader of the worker's log goes away (a log shipper that crashed, `| head`):
    every line after that fails to write (a broken pipe). The worker still decides, stops on
    SIGTERM within its bound with exit 0, and leaves its SQLite file closed: the next
    worker on it serves the runs started before."""
    process = WorkerProcess(topics, "worker", tmp_path)
    read, write = os.pipe()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "worker.cli",
        "run",
        env=process.env,
        stdout=subprocess.DEVNULL,
        stderr=write,
        stdin=subprocess.DEVNULL,
    )
    os.close(write)
    try:
        with os.fdopen(read, "rb") as log:
            # Read until the worker has its partitions, then close the pipe's reading end.
            seen = await asyncio.wait_for(
                asyncio.to_thread(_lines_until, log, b"partitions assigned"), 60
            )
        assert seen, "the worker exited before it took its partitions"
        runs = await started_runs(topics, producer, tail)  # its log lines now all fail
        asked = time.monotonic()
        proc.terminate()
        code = await asyncio.wait_for(proc.wait(), 60)
        assert code == 0
        assert time.monotonic() - asked < Settings().shutdown_timeout_s + 5
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()

    await served_by_the_next(topics, producer, tail, tmp_path, runs)


def _lines_until(log: Any, text: bytes) -> bool:
    """Read `log` line by line until a line holds `text` (True) or it ends (False)."""
    return any(text in line for line in log)


def test_the_watchdog_exits_with_one_line_once_its_bound_and_grace_are_past() -> None:
    """Armed twice, it fires once, at the first deadline, with its exit code and a line."""
    fired = threading.Event()
    codes: list[int] = []

    def exit_(code: int) -> None:
        codes.append(code)
        fired.set()

    dog = StopWatchdog(grace=0.05, exit=exit_)
    with structlog.testing.capture_logs() as logs:
        began = time.monotonic()
        dog.arm(0.05)
        dog.arm(60.0)  # a second stop keeps the first deadline
        assert fired.wait(10)
        took = time.monotonic() - began
    assert codes == [EXIT_CODE]
    assert 0.1 <= took < 5
    assert [(e["event"], e["log_level"], e["seconds"]) for e in logs] == [
        ("the worker has not exited since it began to stop; exiting hard", "error", 0.1)
    ]
    json.dumps(logs)  # nothing in the line that a JSON log cannot carry


async def test_a_step_whose_inner_wait_is_cancelled_under_it_fails_alone() -> None:
    """A client closing with its broker gone can leak a CancelledError of its own waits: that
    step fails, and the steps after it still run (SQLite's close among them), where the
    error used to end the whole stop and leave SQLite's thread holding the process. A stop
    that is itself cancelled still ends at once."""
    from worker.engine.loop import run_steps

    ran: list[str] = []
    failures: list[BaseException] = []

    async def leaking() -> None:
        inner = asyncio.get_running_loop().create_future()
        inner.cancel()
        await inner  # raises CancelledError, though the stop's task was not cancelled

    async def closing() -> None:
        ran.append("closing SQLite")

    failed = await run_steps(
        [("leaving the group", leaking), ("closing SQLite", closing)], failures.append
    )
    assert failed == ["leaving the group"]
    assert ran == ["closing SQLite"]
    assert "cancelled" in str(failures[0])

    entered = asyncio.Event()

    async def waiting() -> None:
        entered.set()
        await asyncio.Event().wait()

    stop = asyncio.create_task(
        run_steps([("waiting", waiting), ("closing SQLite", closing)], failures.append)
    )
    await entered.wait()
    stop.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await stop
    assert stop.cancelled()
    assert ran == ["closing SQLite"]  # not run again: the cancelled stop ended at once


def _sqlite_threads() -> int:
    return sum("_connection_worker_thread" in t.name for t in threading.enumerate())


@pytest.mark.kafka
async def test_a_worker_that_cannot_start_its_second_reader_leaves_its_file_closed(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With worker-wide transactions a starting worker opens its SQLite file, the changelog
    reader and a reader of the changelog's high watermarks. When the broker stops answering
    between the two readers, the start fails with the connection error, and the file is
    closed again: its lock released, and no SQLite thread left to keep the process from
    exiting after the error (it hung there until killed)."""
    from aiokafka.errors import KafkaConnectionError

    from worker.engine import state
    from worker.engine.observe import Metrics
    from worker.engine.store import Store

    assert settings.worker_transactions
    started = state.start_client
    starts: list[object] = []

    async def second_fails(client: Any) -> None:
        starts.append(client)
        if len(starts) == 2:  # the watermarks' reader: fails, stopped again as `start_client` does
            await client.stop()
            raise KafkaConnectionError("Unable to bootstrap from [('127.0.0.1', 1)]")
        await started(client)

    monkeypatch.setattr(state, "start_client", second_fails)
    before = _sqlite_threads()
    manager = state.StateManager(settings, Metrics())
    with pytest.raises(KafkaConnectionError):
        await manager.start(settings.db_path)
    assert len(starts) == 2
    assert _sqlite_threads() == before
    again = await Store.open(settings.db_path, exclusive=True)  # the lock was released
    await again.close()
