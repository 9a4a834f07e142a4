"""Executor helper: a coroutine per job type, called for each `started` run.

    executor = Executor(client)

    @executor.job("report.daily")
    async def report(run: RunContext) -> dict[str, object]:
        await run.progress({"rows": 600})        # progress; also renews the run's timeout
        return {"rows": 1200}                    # completes the run with these metrics

    await executor.run(stop_event)

Its return value completes the run with those metrics; an exception fails it with the error
in the metrics, as the seed's error handling did; a `cancelled` event for the run cancels the
coroutine (it sees `asyncio.CancelledError`). Executors share the work through the consumer
group `<prefix>.executors` (or `group`): every status partition, and so every job type, is
handled by one executor process at a time.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from schemas import EventType, StatusEvent
from worker.client.jobclient import JobClient, JobError

log = structlog.get_logger("executor")


@dataclass(frozen=True)
class RunContext:
    """What a job coroutine gets: its run and a way to report progress."""

    job_type: str
    run_id: str
    client_id: str | None
    initial_data: Mapping[str, Any]
    client: JobClient

    async def progress(self, metrics: Mapping[str, Any] | None = None) -> None:
        """Report progress metrics, or (without metrics) a heartbeat."""
        await self.client.report_progress(self.job_type, self.run_id, metrics)


JobFunction = Callable[[RunContext], Awaitable[Mapping[str, Any] | None]]


class Executor:
    """Runs registered job coroutines for `started` events; reports their outcomes."""

    def __init__(self, client: JobClient, group: str | None = None) -> None:
        self.client = client
        self.group = group or f"{client.settings.topic_prefix}.executors"
        self._jobs: dict[str, JobFunction] = {}
        self._running: dict[str, asyncio.Task[None]] = {}
        self.ready = asyncio.Event()

    def job(self, job_type: str) -> Callable[[JobFunction], JobFunction]:
        """Register the decorated coroutine for `job_type`."""

        def register(function: JobFunction) -> JobFunction:
            self._jobs[job_type] = function
            return function

        return register

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Handle status events until `stop` is set; then cancel what still runs."""
        stop = stop or asyncio.Event()
        settings = self.client.settings
        consumer = AIOKafkaConsumer(
            settings.topics.status,
            bootstrap_servers=settings.bootstrap_servers,
            group_id=self.group,
            isolation_level="read_committed",
            auto_offset_reset="latest",
            enable_auto_commit=True,
        )
        await consumer.start()
        try:
            while not stop.is_set():
                batch = await consumer.getmany(timeout_ms=200)
                if consumer.assignment():
                    self.ready.set()
                for records in batch.values():
                    for record in records:
                        self._handle(record.value)
        finally:
            for task in list(self._running.values()):
                task.cancel()
            await asyncio.gather(*self._running.values(), return_exceptions=True)
            await consumer.stop()

    def _handle(self, value: bytes) -> None:
        try:
            event = StatusEvent.model_validate_json(value)
        except ValidationError:
            return
        if event.run_id is None:
            return
        if event.type is EventType.STARTED and event.job_type in self._jobs:
            if event.run_id in self._running:
                return  # delivered again after a rebalance; it is already running here
            context = RunContext(
                job_type=event.job_type,
                run_id=event.run_id,
                client_id=event.client_id,
                initial_data=event.initial_data or {},
                client=self.client,
            )
            task = asyncio.create_task(self._execute(self._jobs[event.job_type], context))
            self._running[event.run_id] = task
        elif event.type in (EventType.CANCELLED, EventType.TIMED_OUT):
            running = self._running.get(event.run_id)
            if running is not None:
                log.info("stopping run", run_id=event.run_id, because=event.type)
                running.cancel()

    async def _execute(self, function: JobFunction, run: RunContext) -> None:
        bound = log.bind(job_type=run.job_type, run_id=run.run_id)
        try:
            try:
                metrics = await function(run)
            except asyncio.CancelledError:
                bound.info("run cancelled")
                return  # the orchestrator already ended it
            except Exception as exc:
                bound.warning("run failed", error=repr(exc))
                await self.client.fail_job(run.job_type, run.run_id, error=exc, wait=False)
                return
            await self.client.complete_job(
                run.job_type, run.run_id, dict(metrics or {}), wait=False
            )
        except (JobError, KafkaError, OSError):
            # The run stays RUNNING until its timeout; the orchestrator is the judge.
            bound.exception("could not report the run's outcome")
        finally:
            self._running.pop(run.run_id, None)
