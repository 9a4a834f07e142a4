"""`JobClient`: the orchestrator's calls for producers and executors, over Kafka.

    async with JobClient() as jobs:                       # JOBS_* settings, or keywords
        decision = await jobs.start_job("report.daily", initial_data={"day": "2026-11-28"})
        if decision.started:
            ...
            await jobs.complete_job("report.daily", decision.run_id, {"rows": 1200})
        elif decision.already_running:
            print("another run is active:", decision.running_run_id)

Requests are correlated with their answers by `request_id`: the client reads the status topic
from its end, resolved when it opens, so no answer to a later request is missed. A start
without an answer within the timeout raises `JobTimeoutError` (with the `request_id`); sending
it again with the same `request_id` is safe (the orchestrator answers with the original
decision, which `start_job` returns as what it was). The running view (`is_job_running`,
`get_running_job_info`) is `RunningView`, brought up to date before each answer, so a client
sees its own starts. Nothing of the orchestrator's engine or core is imported here.

`JobClient(settings=None, **overrides)`: the connection and topics are `settings` (by
default `Settings()`, read from the JOBS_* variables), with each keyword overriding the
setting of that name: `JobClient(bootstrap_servers="kafka:9092", topic_prefix="jobs")`.
An unknown keyword raises TypeError, naming the setting it may have meant; values the
settings refuse raise `SettingsError` (a ValueError) naming each, without the values.
Every call that waits takes `timeout`, in seconds (a positive number; 30 by default). A
request the broker does not acknowledge is sent again, with the same request ID, each time
the producer gives up on it (`request_timeout_ms`), until that timeout: then, as after any
Kafka failure once the request may have gone out, the call raises `JobTimeoutError` with
the request ID; a refusal (which sending again gets again) is a `JobError` naming it.
"""

from __future__ import annotations

import asyncio
import difflib
import uuid
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Literal, overload

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaConnectionError
from pydantic import ValidationError

from schemas import EventType, RunStatus, StatusEvent
from worker import compat
from worker.client.answers import (
    ClientNotOpenError,
    JobConnectionError,
    JobInvalidError,
    JobTimeoutError,
    RunInfo,
    StartDecision,
)
from worker.client.replies import Replies
from worker.client.sending import Sender, seconds_of
from worker.client.view import RunningView, window_of
from worker.kafkaio import connection
from worker.settings import Settings, SettingsError, settings_problems

log = structlog.get_logger("client")

_START_ANSWERS = frozenset(
    {
        EventType.STARTED,
        EventType.REFUSED,
        EventType.QUEUED,
        EventType.DUPLICATE,
        EventType.REJECTED,
    }
)
# Opening waits for the running view to catch up as long as its read moves; this long
# without a record or a position moving, it gives up.
_VIEW_STALL_S = 30.0
_RESULT_ANSWERS = frozenset({EventType.COMPLETED, EventType.FAILED, EventType.REJECTED})
_CANCEL_ANSWERS = frozenset({EventType.CANCELLED, EventType.REJECTED, EventType.DUPLICATE})


def _overridden(settings: Settings | None, overrides: dict[str, Any]) -> Settings:
    """`settings` (JOBS_*'s when None) with the keywords in `overrides` on top, validated as
    values from the environment are: `model_copy(update=...)` would keep a password as the
    plain str given (shown by repr, without `password()`) and a combination the settings
    refuse, such as SASL without a user."""
    unknown = sorted(set(overrides) - set(Settings.model_fields))
    if unknown:
        name = unknown[0]
        near = difflib.get_close_matches(name, Settings.model_fields, n=1, cutoff=0.5)
        maybe = f"; did you mean {near[0]!r}?" if near else ""
        raise TypeError(f"JobClient() got an unexpected keyword argument {name!r}{maybe}")
    if settings is None:
        given = overrides  # keywords come before JOBS_* variables
    elif not overrides:
        return settings
    else:  # every field given, so the environment adds nothing; a SecretStr stays one
        given = {**dict(settings), **overrides}
    try:
        return Settings(**given)
    except ValidationError as exc:  # its errors() hold the values given, passwords too
        problems = settings_problems(exc)
    raise SettingsError(f"bad settings: {problems}")


def _cannot_connect(exc: Exception, settings: Settings) -> JobConnectionError:
    """What to check when opening failed: the broker's address, or the topics' prefix."""
    if isinstance(exc, LookupError):  # a topic of the prefix does not exist
        return JobConnectionError(
            f"{exc}; is the prefix {settings.topic_prefix!r} right, and were the topics "
            "created (jobctl topics create)?"
        )
    where = settings.bootstrap_servers
    return JobConnectionError(f"cannot connect to Kafka at {where}: {compat.connect_failure(exc)}")


def _client(client_id: str | None) -> str | None:
    """A client ID as the worker compares them (trimmed, any case)."""
    return None if client_id is None else client_id.strip().lower()


def _data(name: str, value: Mapping[str, Any] | None) -> dict[str, Any]:
    """`value` as the JSON object sent as `name` (None: an empty one)."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise JobInvalidError(
            f"not sent: {name} must be a mapping (a JSON object), not {type(value).__name__}"
        )
    return dict(value)


class JobClient:
    """Async context manager speaking to the orchestrator through its topics: made as the
    module's docstring says (`settings`, keywords overriding settings by name)."""

    # Made by `open` (`_make`)
    _producer: AIOKafkaProducer
    _sender: Sender
    replies: Replies
    view: RunningView

    def __init__(self, settings: Settings | None = None, **overrides: Any) -> None:
        self.settings = _overridden(settings, overrides)
        self.topics = self.settings.topics
        self._open = self._closed = self._made = False

    def _make(self) -> None:
        """Make the Kafka clients, when the client opens: made and never started (a client
        that is never opened), aiokafka warns of each as unclosed when it is collected."""
        kafka = connection(self.settings)
        self._producer = AIOKafkaProducer(
            acks="all", linger_ms=1, request_timeout_ms=self.settings.request_timeout_ms, **kafka
        )
        self.replies = Replies(self.topics.status, kafka)
        self._sender = Sender(self._producer, self.replies, self.settings)
        self.view = RunningView(
            self.topics.state, kafka, window=window_of(self.settings.view_refresh_s)
        )
        self._made = True

    async def open(self) -> JobClient:
        """Connect; on any failure, close what was opened and raise. A client opens once:
        after `close`, make another."""
        if self._closed:
            raise JobConnectionError("this JobClient was closed; make a new one to reconnect")
        if not self._made:
            self._make()
        try:
            await self._producer.start()
            await self.replies.open()
            await self.view.open()
            self._open = True
            await self.view.sync(_VIEW_STALL_S)
        except TimeoutError:
            await self.close()
            raise JobConnectionError(
                f"could not read the running view: {self.topics.state} gave nothing for "
                f"{_VIEW_STALL_S:g} s; is the broker at {self.settings.bootstrap_servers} "
                "answering, and may this client read that topic?"
            ) from None
        except (KafkaConnectionError, LookupError) as exc:
            await self.close()
            raise _cannot_connect(exc, self.settings) from exc
        except BaseException:
            await self.close()
            raise
        return self

    async def close(self) -> None:
        """Stop reading and disconnect everything; safe to call more than once."""
        self._open, self._closed = False, True
        if not self._made:
            return
        await self.view.close()
        await self.replies.close()
        await self._producer.stop()

    async def __aenter__(self) -> JobClient:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def _check_open(self) -> None:
        if not self._open:
            raise ClientNotOpenError()

    def watch_run(self, run_id: str) -> asyncio.Future[StatusEvent]:
        """A future for the event that ends `run_id` (completed, failed, cancelled, timed out).

        Only events published after the client opened are seen: check `is_run_running` after
        registering to learn whether the run had already ended. Cancel it to stop watching.
        """
        self._check_open()
        return self.replies.run_end(run_id)

    # -- requests -------------------------------------------------------------------------------

    async def send(self, topic: str, body: Mapping[str, Any]) -> str:
        """Send one request (to the requests topic) or result (any other) as it is; its
        request ID.

        Raises `JobInvalidError`, sending nothing, for a body the orchestrator would
        dead-letter as `schema_invalid` (a job type too long or with control characters, a
        bad request ID...): no answer would ever come.
        """
        self._check_open()
        return await self._sender.send(topic, body)

    async def _ask(
        self, topic: str, body: dict[str, Any], answers: frozenset[EventType], timeout: float
    ) -> StatusEvent:
        return (await self._ask_sent(topic, body, answers, timeout))[0]

    async def _ask_sent(
        self, topic: str, body: dict[str, Any], answers: frozenset[EventType], timeout: float
    ) -> tuple[StatusEvent, bool]:
        self._check_open()
        return await self._sender.ask(topic, body, answers, timeout)

    @overload
    async def start_job(
        self,
        job_type: str,
        client_id: str | None = ...,
        initial_data: Mapping[str, Any] | None = ...,
        wait: Literal[True] = ...,
        timeout: float = ...,
        request_id: str | None = ...,
    ) -> StartDecision: ...

    @overload
    async def start_job(
        self,
        job_type: str,
        client_id: str | None = ...,
        initial_data: Mapping[str, Any] | None = ...,
        *,
        wait: Literal[False],
        timeout: float = ...,
        request_id: str | None = ...,
    ) -> str: ...

    @overload
    async def start_job(
        self,
        job_type: str,
        client_id: str | None = ...,
        initial_data: Mapping[str, Any] | None = ...,
        wait: bool = ...,
        timeout: float = ...,
        request_id: str | None = ...,
    ) -> StartDecision | str: ...

    async def start_job(
        self,
        job_type: str,
        client_id: str | None = None,
        initial_data: Mapping[str, Any] | None = None,
        wait: bool = True,
        timeout: float = 30,
        request_id: str | None = None,
    ) -> StartDecision | str:
        """Ask for a run of `job_type`: its decision, or with `wait=False` the request ID."""
        body: dict[str, Any] = {
            "kind": "start",
            "request_id": request_id or str(uuid.uuid4()),
            "job_type": job_type,
            "initial_data": _data("initial_data", initial_data),
        }
        if client_id is not None:
            body["client_id"] = client_id
        if not wait:
            return await self.send(self.topics.requests, body)
        event, earlier = await self._ask_sent(self.topics.requests, body, _START_ANSWERS, timeout)
        decision = StartDecision(event.request_id or body["request_id"], event, answered=earlier)
        await self._refresh(decision.request_id, timeout, f"was decided ({decision.type})")
        if decision.running_run_id is not None:
            running = self.view.get(decision.running_run_id)
            info = RunInfo.of(running) if running is not None else None
            return StartDecision(decision.request_id, event, info, answered=earlier)
        return decision

    async def _refresh(self, request_id: str | None, timeout: float, what: str) -> None:
        try:
            await self.view.sync(seconds_of(timeout))
        except TimeoutError:
            late = f"the running view did not catch up with {self.topics.state} within {timeout:g}s"
            message = late if request_id is None else f"request {request_id} {what}, but {late}"
            raise JobTimeoutError(message, request_id) from None

    async def complete_job(
        self,
        job_type: str,
        run_id: str,
        final_metrics: Mapping[str, Any] | None = None,
        status: Literal["COMPLETED", "FAILED"] = "COMPLETED",
        timeout: float = 30,
        request_id: str | None = None,
    ) -> StatusEvent:
        """Report a run's result; the `completed`/`failed` event that records it.

        Raises `JobRejectedError` when the result does not apply (an unknown run, or one that
        has already ended: `event.status` says how) and `JobTimeoutError` without an answer;
        sending it again with the same `request_id` is safe (the run takes one outcome).
        """
        body = {
            "kind": "result",
            "request_id": request_id or str(uuid.uuid4()),
            "job_type": job_type,
            "run_id": run_id,
            "status": status,
            "final_metrics": _data("final_metrics", final_metrics),
        }
        return await self._ask(self.topics.results, body, _RESULT_ANSWERS, timeout)

    async def fail_job(
        self,
        job_type: str,
        run_id: str,
        final_metrics: Mapping[str, Any] | None = None,
        error: BaseException | str | None = None,
        timeout: float = 30,
        request_id: str | None = None,
    ) -> StatusEvent:
        """Report a run as FAILED; `error` goes into the metrics as the seed did."""
        metrics = _data("final_metrics", final_metrics)
        if error is not None:
            metrics.setdefault("error", str(error) if isinstance(error, str) else repr(error))
        return await self.complete_job(job_type, run_id, metrics, "FAILED", timeout, request_id)

    async def cancel_job(
        self,
        job_type: str,
        run_id: str | None = None,
        client_id: str | None = None,
        reason: str | None = None,
        timeout: float = 30,
        request_id: str | None = None,
    ) -> StatusEvent:
        """Cancel a run by ID, or the active run of the job type (and client): the event."""
        body: dict[str, Any] = {
            "kind": "cancel",
            "request_id": request_id or str(uuid.uuid4()),
            "job_type": job_type,
        }
        for name, value in (("run_id", run_id), ("client_id", client_id), ("reason", reason)):
            if value is not None:
                body[name] = value
        return await self._ask(self.topics.requests, body, _CANCEL_ANSWERS, timeout)

    async def report_progress(
        self, job_type: str, run_id: str, metrics: Mapping[str, Any] | None = None
    ) -> str:
        """Report progress (`metrics`) or, without metrics, a heartbeat; both renew the timeout."""
        body: dict[str, Any] = {
            "kind": "progress",
            "request_id": str(uuid.uuid4()),
            "job_type": job_type,
            "run_id": run_id,
        }
        if metrics is not None:
            body["metrics"] = _data("metrics", metrics)
        return await self.send(self.topics.results, body)

    # -- the running view -----------------------------------------------------------------------

    async def get_running_job_info(
        self, job_type: str, client_id: str | None = None, timeout: float = 30
    ) -> RunInfo | None:
        """The running run of `job_type` (for `client_id`, if given, in any case), or None:
        the names as the worker reads them (trimmed)."""
        job_type, client = job_type.strip(), None if client_id is None else _client(client_id)
        for run in await self.running_jobs(timeout):
            if run.job_type == job_type and (client is None or _client(run.client_id) == client):
                return run
        return None

    async def is_job_running(
        self, job_type: str, client_id: str | None = None, timeout: float = 30
    ) -> bool:
        """Whether `job_type` (for `client_id`, if given) has a running run."""
        return await self.get_running_job_info(job_type, client_id, timeout) is not None

    async def running_jobs(self, timeout: float = 30) -> list[RunInfo]:
        """Every running run, by job type."""
        self._check_open()
        await self._refresh(None, timeout, "")
        return [RunInfo.of(run) for run in self.view.runs()]

    async def queued_jobs(self, timeout: float = 30) -> list[RunInfo]:
        """Every queued run (waiting for the active run of its scope), by job type; its
        `started_at` is when it was queued."""
        self._check_open()
        await self._refresh(None, timeout, "")
        return [RunInfo.of(run) for run in self.view.runs(RunStatus.QUEUED)]

    async def is_run_running(self, run_id: str, timeout: float = 30) -> bool:
        """Whether the run `run_id` is RUNNING now (not ended, not unknown)."""
        self._check_open()
        await self._refresh(None, timeout, "")
        return self.view.get(run_id) is not None
