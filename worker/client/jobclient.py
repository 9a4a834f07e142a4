"""`JobClient`: the orchestrator's calls for producers and executors, over Kafka.

    async with JobClient() as jobs:                       # JOBS_* settings, or keywords
        decision = await jobs.start_job("report.daily", initial_data={"day": "2026-11-28"})
        if decision.started:
            ...
        await jobs.complete_job("report.daily", decision.run_id, {"rows": 1200})

Requests are correlated with their answers by `request_id`: the client subscribes to the
status topic before sending, so no answer is missed. A start without an answer within the
timeout raises `JobTimeoutError`; sending it again with the same `request_id` is safe (the
orchestrator answers `duplicate` with the original decision). The running view
(`is_job_running`, `get_running_job_info`) is built from the run rows of `<prefix>.state`
(published as `schemas.RunRecord`; job-type rows, the orchestrator's private state, are
skipped unread) and brought up to date before each answer, so a client sees its own starts.
Nothing of the orchestrator's engine or core is imported here.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from types import TracebackType
from typing import Any, Literal

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import ValidationError

from schemas import EventType, RunRecord, RunStatus, StatusEvent, is_run_row, parse_run_row
from worker.kafkaio import partitions_of
from worker.settings import Settings

log = structlog.get_logger("client")

_RUNNING = b'"status":"RUNNING"'
_START_ANSWERS = frozenset(
    {
        EventType.STARTED,
        EventType.REFUSED,
        EventType.QUEUED,
        EventType.DUPLICATE,
        EventType.REJECTED,
    }
)


class JobError(Exception):
    """Base of the client's errors."""


class JobTimeoutError(JobError, TimeoutError):
    """No answer within the timeout; the request may still be decided later."""


class JobRejectedError(JobError):
    """The orchestrator rejected the request; `event.reason` says why."""

    def __init__(self, event: StatusEvent) -> None:
        super().__init__(event.reason or "rejected")
        self.event = event


@dataclass(frozen=True)
class RunInfo:
    """A running job, as the seed's `getRunningJobInfo` returned it."""

    job_type: str
    run_id: str
    client_id: str | None
    request_id: str
    started_at: datetime
    initial_data: Mapping[str, Any]

    @classmethod
    def of(cls, run: RunRecord) -> RunInfo:
        """From a running run's record."""
        return cls(
            run.job_type,
            run.run_id,
            run.client_id,
            run.request_id or "",
            run.started_at,
            run.initial_data,
        )


@dataclass(frozen=True)
class StartDecision:
    """The answer to `start_job`."""

    request_id: str
    event: StatusEvent

    @property
    def type(self) -> EventType:
        """`started`, `refused`, `queued` or `duplicate`."""
        return self.event.type

    @property
    def run_id(self) -> str | None:
        """The new run (started, queued), the running one (refused), or the original's."""
        return self.event.run_id

    @property
    def started(self) -> bool:
        """Whether this request started a run now."""
        return self.event.type is EventType.STARTED

    @property
    def already_running(self) -> bool:
        """The seed's `alreadyRunning`: refused because a run of the scope is active."""
        return self.event.type is EventType.REFUSED

    @property
    def queued(self) -> bool:
        """Whether the request waits for the active run to end."""
        return self.event.type is EventType.QUEUED

    @property
    def duplicate(self) -> bool:
        """Whether the request ID had been decided before (see `event.original_type`)."""
        return self.event.type is EventType.DUPLICATE


class JobClient:
    """Async context manager speaking to the orchestrator through its topics."""

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        base = settings or Settings()
        self.settings = base.model_copy(update=overrides) if overrides else base
        self.topics = self.settings.topics
        bs = self.settings.bootstrap_servers
        self._producer = AIOKafkaProducer(bootstrap_servers=bs, acks="all", linger_ms=1)
        self._answers = AIOKafkaConsumer(
            bootstrap_servers=bs, isolation_level="read_committed", enable_auto_commit=False
        )
        self._state = AIOKafkaConsumer(
            bootstrap_servers=bs, isolation_level="read_committed", enable_auto_commit=False
        )
        self._waiters: dict[str, list[tuple[set[EventType], asyncio.Future[StatusEvent]]]] = {}
        self._running: dict[str, RunRecord] = {}  # the running view: run ID -> its record
        self._view_changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    async def __aenter__(self) -> JobClient:
        await self._producer.start()
        await self._answers.start()
        await self._state.start()
        status = await partitions_of(self._answers, self.topics.status)
        self._answers.assign(status)
        await self._answers.seek_to_end(*status)
        for tp in status:  # resolve "end" now: answers to requests sent after this count
            await self._answers.position(tp)
        state = await partitions_of(self._state, self.topics.state)
        self._state.assign(state)
        await self._state.seek_to_beginning(*state)
        self._tasks = [
            asyncio.create_task(self._read_answers()),
            asyncio.create_task(self._read_state()),
        ]
        await self._sync_view()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self._state.stop()
        await self._answers.stop()
        await self._producer.stop()

    # -- reading --------------------------------------------------------------------------------

    async def _read_answers(self) -> None:
        while True:
            batch = await self._answers.getmany(timeout_ms=500)
            for records in batch.values():
                for record in records:
                    try:
                        event = StatusEvent.model_validate_json(record.value)
                    except ValidationError:
                        continue
                    if event.request_id is None:
                        continue
                    for types, future in self._waiters.get(event.request_id, ()):
                        if event.type in types and not future.done():
                            future.set_result(event)

    async def _read_state(self) -> None:
        while True:
            # Short polls: the position also moves past transaction markers, which yield no
            # records, and `_sync_view` waits on positions.
            batch = await self._state.getmany(timeout_ms=50)
            async with self._view_changed:
                for records in batch.values():
                    for record in records:
                        if record.key is not None:
                            self._fold(record.key, record.value)
                self._view_changed.notify_all()

    def _fold(self, key: bytes, value: bytes | None) -> None:
        """One `<prefix>.state` record into the running view (later rows win)."""
        if value is None:  # an ended run's tombstone
            self._running.pop(key.decode("utf-8", "replace"), None)
            return
        if not is_run_row(value):
            return  # a job type's row: the orchestrator's own state
        run_id = key.decode("utf-8", "replace")
        # Ended runs are most rows of a long history; only running ones are parsed.
        if _RUNNING in value:
            try:
                run = parse_run_row(value)
            except ValueError:
                log.warning("unreadable run row", run_id=run_id)
                return
            if run.status is RunStatus.RUNNING:
                self._running[run_id] = run
                return
        self._running.pop(run_id, None)

    async def _sync_view(self, timeout: float = 30) -> None:
        """Wait until the running view includes everything committed so far."""
        tps = list(self._state.assignment())
        ends = await self._state.end_offsets(tps)

        async def caught_up() -> bool:
            for tp in tps:
                if await self._state.position(tp) < ends[tp]:
                    return False
            return True

        async with asyncio.timeout(timeout):
            while not await caught_up():
                async with self._view_changed:
                    await self._view_changed.wait()

    # -- requests -------------------------------------------------------------------------------

    async def _request(
        self,
        topic: str,
        body: dict[str, Any],
        answers: set[EventType] | None,
        timeout: float,
    ) -> StatusEvent | None:
        request_id = body["request_id"]
        future: asyncio.Future[StatusEvent] | None = None
        if answers is not None:
            future = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(request_id, []).append((answers, future))
        try:
            await self._producer.send_and_wait(
                topic, json.dumps(body).encode(), key=body["job_type"].encode()
            )
            if future is None:
                return None
            try:
                return await asyncio.wait_for(future, timeout)
            except TimeoutError:
                raise JobTimeoutError(
                    f"no answer to request {request_id} ({body['job_type']}) within {timeout:g}s; "
                    f"is a worker running for prefix {self.settings.topic_prefix!r}? Retrying "
                    f"with request_id={request_id!r} is safe"
                ) from None
        finally:
            if future is not None:
                waiting = self._waiters.get(request_id, [])
                waiting[:] = [w for w in waiting if w[1] is not future]
                if not waiting:
                    self._waiters.pop(request_id, None)

    async def start_job(
        self,
        job_type: str,
        client_id: str | None = None,
        initial_data: Mapping[str, Any] | None = None,
        wait: bool = True,
        timeout: float = 30,
        request_id: str | None = None,
    ) -> StartDecision | None:
        """Ask for a run of `job_type`; the decision, or None with `wait=False`."""
        body: dict[str, Any] = {
            "kind": "start",
            "request_id": request_id or str(uuid.uuid4()),
            "job_type": job_type,
            "initial_data": dict(initial_data or {}),
        }
        if client_id is not None:
            body["client_id"] = client_id
        event = await self._request(
            self.topics.requests, body, set(_START_ANSWERS) if wait else None, timeout
        )
        if event is None:
            return None
        if event.type is EventType.REJECTED:
            raise JobRejectedError(event)
        await self._sync_view()
        return StartDecision(body["request_id"], event)

    async def complete_job(
        self,
        job_type: str,
        run_id: str,
        final_metrics: Mapping[str, Any] | None = None,
        status: Literal["COMPLETED", "FAILED"] = "COMPLETED",
        wait: bool = True,
        timeout: float = 30,
    ) -> StatusEvent | None:
        """Report a run's result; the `completed`/`failed` event (raises if rejected)."""
        body = {
            "kind": "result",
            "request_id": str(uuid.uuid4()),
            "job_type": job_type,
            "run_id": run_id,
            "status": status,
            "final_metrics": dict(final_metrics or {}),
        }
        expected = {EventType.COMPLETED, EventType.FAILED, EventType.REJECTED}
        event = await self._request(self.topics.results, body, expected if wait else None, timeout)
        if event is not None and event.type is EventType.REJECTED:
            raise JobRejectedError(event)
        return event

    async def fail_job(
        self,
        job_type: str,
        run_id: str,
        final_metrics: Mapping[str, Any] | None = None,
        error: BaseException | str | None = None,
        wait: bool = True,
        timeout: float = 30,
    ) -> StatusEvent | None:
        """Report a run as FAILED; `error` goes into the metrics as the seed did."""
        metrics = dict(final_metrics or {})
        if error is not None:
            metrics.setdefault("error", str(error) if isinstance(error, str) else repr(error))
        return await self.complete_job(job_type, run_id, metrics, "FAILED", wait, timeout)

    async def cancel_job(
        self,
        job_type: str,
        run_id: str | None = None,
        client_id: str | None = None,
        reason: str | None = None,
        wait: bool = True,
        timeout: float = 30,
    ) -> StatusEvent | None:
        """Cancel a run by ID, or the active run of the job type (and client)."""
        body: dict[str, Any] = {
            "kind": "cancel",
            "request_id": str(uuid.uuid4()),
            "job_type": job_type,
        }
        for name, value in (("run_id", run_id), ("client_id", client_id), ("reason", reason)):
            if value is not None:
                body[name] = value
        expected = {EventType.CANCELLED, EventType.REJECTED, EventType.DUPLICATE}
        event = await self._request(self.topics.requests, body, expected if wait else None, timeout)
        if event is not None and event.type is EventType.REJECTED:
            raise JobRejectedError(event)
        return event

    async def report_progress(
        self, job_type: str, run_id: str, metrics: Mapping[str, Any] | None = None
    ) -> None:
        """Report progress (`metrics`) or, without metrics, a heartbeat; both renew the timeout."""
        body: dict[str, Any] = {
            "kind": "progress",
            "request_id": str(uuid.uuid4()),
            "job_type": job_type,
            "run_id": run_id,
        }
        if metrics is not None:
            body["metrics"] = dict(metrics)
        await self._request(self.topics.results, body, None, 0)

    # -- the running view -----------------------------------------------------------------------

    async def get_running_job_info(
        self, job_type: str, client_id: str | None = None
    ) -> RunInfo | None:
        """The running run of `job_type` (for `client_id`, if given), or None."""
        await self._sync_view()
        for run in sorted(self._running.values(), key=lambda r: (r.started_at, r.run_id)):
            if run.job_type == job_type and (client_id is None or run.client_id == client_id):
                return RunInfo.of(run)
        return None

    async def is_job_running(self, job_type: str, client_id: str | None = None) -> bool:
        """Whether `job_type` (for `client_id`, if given) has a running run."""
        return await self.get_running_job_info(job_type, client_id) is not None

    async def running_jobs(self) -> list[RunInfo]:
        """Every running run, by job type."""
        await self._sync_view()
        runs = sorted(self._running.values(), key=lambda r: (r.job_type, r.started_at, r.run_id))
        return [RunInfo.of(run) for run in runs]
