"""One run on an executor: check it still runs, do the work, deliver exactly one outcome.

    started event ──► still RUNNING? ──no──► nothing to do (another process finished it)
                          │yes
                          ▼
               the job coroutine ◄── heartbeats (optional) renew the run's timeout
                │            │
      returned / raised    an event ended the run (cancelled, timed out, finished elsewhere)
                │            └──► cancel the coroutine; abandon it after `cancel_grace`
                ▼
     outcome (COMPLETED, or FAILED with the reason) ──► delivered, retried with back-off
                                                         until answered or the executor stops

An outcome counts as delivered when the orchestrator answers it: `completed`/`failed`, or
`rejected` because the run had already ended (a retry of a result that landed, or a run
another process finished first). The orchestrator accepts one outcome per run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import structlog
from aiokafka.errors import KafkaError
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential, wait_random

from schemas import JobResult, StatusEvent
from worker.client.answers import JobInvalidError, JobRejectedError, JobTimeoutError
from worker.client.jobclient import JobClient
from worker.client.wire import encoded

log = structlog.get_logger("executor")

# The key under which an executor explains, in a run's final metrics, why it failed the run.
SYSTEM_NOTES = "System Notes"


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


JobFunction = Callable[[RunContext], Coroutine[Any, Any, Mapping[str, Any] | None]]


@dataclass(frozen=True)
class Timing:
    """How an executor paces a run."""

    cancel_grace: float = 10.0  # a cancelled coroutine's time to unwind before it is abandoned
    heartbeat: float | None = None  # send a heartbeat this often while the job runs
    answer_timeout: float = 30.0  # wait this long for the orchestrator's answer to an outcome


@dataclass
class Outcome:
    """What a run's coroutine came to."""

    status: Literal["COMPLETED", "FAILED"]
    metrics: dict[str, Any] = field(default_factory=dict)


def outcome_of(task: asyncio.Task[Mapping[str, Any] | None], run: RunContext) -> Outcome:
    """The finished coroutine's outcome; anything that cannot be reported as it is (not a
    mapping, not JSON, too deep or too large for the worker: `worker.client.wire`) fails the
    run, with what was wrong in its metrics."""
    error = task.exception()
    if error is not None:
        return Outcome("FAILED", {"error": repr(error)})
    value = task.result()
    if value is None:
        return Outcome("COMPLETED")
    if not isinstance(value, Mapping):
        note = f"the job returned {type(value).__name__}, not a mapping of metrics"
        return Outcome("FAILED", {SYSTEM_NOTES: note})
    metrics = dict(value)
    result = {
        "kind": "result",
        "request_id": "outcome",
        "job_type": run.job_type,
        "run_id": run.run_id,
        "status": "COMPLETED",
        "final_metrics": metrics,
    }
    try:
        encoded(JobResult, result, run.client.settings)
    except JobInvalidError as exc:
        problem = str(exc).removeprefix("not a valid result, not sent: ")
        return Outcome("FAILED", {SYSTEM_NOTES: f"the job's metrics: {problem}"[:500]})
    return Outcome("COMPLETED", metrics)


class RunExecution:
    """The life of one run on this executor, from its `started` event to its outcome."""

    def __init__(self, function: JobFunction, run: RunContext, timing: Timing) -> None:
        self.function = function
        self.run = run
        self.timing = timing
        self.log = log.bind(job_type=run.job_type, run_id=run.run_id)

    async def __call__(self) -> None:
        """Run it, unless it has ended; report what came of it."""
        client = self.run.client
        ended = client.watch_run(self.run.run_id)  # before the check: no end slips between
        try:
            if not await self._still_running():
                self.log.info("run is not running any more; not starting it")
                return
            outcome = await self._work(ended)
            if outcome is not None:
                await self._deliver(outcome)
        finally:
            ended.cancel()

    async def _work(self, ended: asyncio.Future[StatusEvent]) -> Outcome | None:
        try:
            work = self.function(self.run)
        except Exception as exc:  # a plain function that raised: it ran, and failed
            return Outcome("FAILED", {"error": repr(exc)})
        if not asyncio.iscoroutine(work):  # a plain function registered: it ran, unreported
            note = f"the job returned {type(work).__name__}, not a coroutine: use async def"
            return Outcome("FAILED", {SYSTEM_NOTES: note})
        job = asyncio.create_task(work)
        beats = asyncio.create_task(self._heartbeats()) if self.timing.heartbeat else None
        try:
            racing: set[asyncio.Future[Any]] = {job, ended}
            await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:  # the executor hands the run back
            await self._abandon(job, "handed back")
            raise
        finally:
            if beats is not None:
                beats.cancel()
        if not job.done():
            event = ended.result()
            self.log.info("run ended elsewhere; stopping it", because=str(event.type))
            await self._abandon(job, str(event.type))
            return None
        if job.cancelled():
            self.log.info("the job cancelled itself; failing the run")
            return Outcome("FAILED", {SYSTEM_NOTES: "the job was cancelled"})
        outcome = outcome_of(job, self.run)
        if outcome.status == "FAILED":
            self.log.warning("run failed", **outcome.metrics)
        return outcome

    async def _abandon(self, job: asyncio.Task[Any], why: str) -> None:
        """Cancel the coroutine; give it `cancel_grace` seconds to unwind, then leave it."""
        job.cancel()
        done, _ = await asyncio.wait({job}, timeout=self.timing.cancel_grace)
        if not done:
            self.log.warning(
                "the job ignored cancellation; abandoned",
                grace_s=self.timing.cancel_grace,
                because=why,
            )
        elif not job.cancelled() and job.exception() is not None:
            self.log.info("the job raised while stopping", error=repr(job.exception()))

    async def _heartbeats(self) -> None:
        assert self.timing.heartbeat is not None
        while True:
            await asyncio.sleep(self.timing.heartbeat)
            try:
                await self.run.progress()
            except (KafkaError, OSError) as exc:
                self.log.warning("heartbeat not sent", error=repr(exc))

    def _retrying(self, what: str) -> AsyncRetrying:
        """Retry with back-off (0.5 s doubling to 30 s) while the broker cannot be reached."""
        return AsyncRetrying(
            wait=wait_exponential(multiplier=0.5, max=30) + wait_random(0, 0.5),
            retry=retry_if_exception_type((JobTimeoutError, KafkaError, OSError)),
            before_sleep=lambda state: self.log.warning(
                f"{what}; retrying",
                attempt=state.attempt_number,
                error=repr(state.outcome.exception()) if state.outcome else None,
            ),
        )

    async def _still_running(self) -> bool:
        async for attempt in self._retrying("could not check the run is still running"):
            with attempt:
                return await self.run.client.is_run_running(self.run.run_id)
        raise AssertionError("unreachable: tenacity retries until it returns or raises")

    async def _deliver(self, outcome: Outcome) -> None:
        """Report the outcome until the orchestrator answers it (one request ID throughout)."""
        request_id = str(uuid.uuid4())
        try:
            async for attempt in self._retrying("outcome not delivered yet"):
                with attempt:
                    await self.run.client.complete_job(
                        self.run.job_type,
                        self.run.run_id,
                        outcome.metrics,
                        outcome.status,
                        timeout=self.timing.answer_timeout,
                        request_id=request_id,
                    )
        except JobRejectedError as exc:
            self.log.info("run had already ended", answer=str(exc))
            return
        self.log.info("outcome delivered", status=outcome.status)
