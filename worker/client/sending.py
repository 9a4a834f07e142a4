"""How `JobClient` sends a request or result and waits for its answer.

A request is sent again, under the same request ID, each time the producer gives up on it
(`JOBS_REQUEST_TIMEOUT_MS`) until the call's own timeout; the answer is the first status
event naming the request ID (`Replies`). A failure after the request may have gone out is
a `JobTimeoutError` naming it, safe to retry; a refusal Kafka would repeat is a `JobError`.
"""

from __future__ import annotations

import asyncio
import math
import numbers
from collections.abc import Mapping
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError, KafkaTimeoutError
from aiokafka.structs import RecordMetadata

from schemas import EventType, JobRequest, JobResult, StatusEvent
from worker.client.answers import JobError, JobRejectedError, JobTimeoutError
from worker.client.replies import Replies
from worker.client.wire import encoded
from worker.settings import Settings

log = structlog.get_logger("client")

# Between a delivery that failed and the next attempt within a call's timeout.
_RESEND_BACKOFF_S = 0.1


def _resendable(exc: KafkaError) -> bool:
    """Whether a failed delivery may succeed when sent again: the broker did not answer in
    time, a connection dropped, a leader moved. Not a refusal (authorization, a record too
    large), which sending again gets again."""
    return exc.retriable or isinstance(exc, KafkaTimeoutError)


def _kafka_failure(exc: KafkaError) -> str:
    """A Kafka error as a few words: aiokafka's str() of some is empty."""
    return str(exc) or type(exc).__name__


def seconds_of(timeout: float) -> float:
    """`timeout` as a positive, finite number of seconds (any real number type: an int, a
    Fraction, numpy's); else TypeError or ValueError."""
    if isinstance(timeout, bool) or not isinstance(timeout, numbers.Real):
        raise TypeError(f"timeout must be a number of seconds, not {type(timeout).__name__}")
    try:
        seconds = float(timeout)
    except OverflowError:
        seconds = math.inf
    if not 0 < seconds < math.inf:
        raise ValueError(f"timeout must be a positive, finite number of seconds, not {seconds:g}")
    return seconds


class Sender:
    """A client's requests and results on their way: sent, acknowledged, answered."""

    def __init__(self, producer: AIOKafkaProducer, replies: Replies, settings: Settings) -> None:
        self._producer = producer
        self._replies = replies
        self._settings = settings

    async def send(self, topic: str, body: Mapping[str, Any]) -> str:
        """Send one request (to the requests topic) or result (any other) as it is; its
        request ID.

        Raises `JobInvalidError`, sending nothing, for a body the orchestrator would
        dead-letter as `schema_invalid` (a job type too long or with control characters, a
        bad request ID...): no answer would ever come.
        """
        sent, payload = encoded(self._model_of(topic), body, self._settings)
        request_id, job_type = str(sent["request_id"]), sent["job_type"]
        try:
            await self._producer.send_and_wait(topic, payload, key=job_type.encode())
        except KafkaError as exc:
            if not _resendable(exc):
                raise self._refused(request_id, job_type, exc) from None
            waited = self._settings.request_timeout_ms / 1000
            raise JobTimeoutError(
                f"the broker at {self._settings.bootstrap_servers} did not acknowledge request "
                f"{request_id} ({job_type}) within {waited:g}s (JOBS_REQUEST_TIMEOUT_MS): "
                f"{_kafka_failure(exc)}; it may have gone out.",
                request_id,
                retry_safe=True,
            ) from None
        return request_id

    def _refused(self, request_id: str, job_type: str, exc: KafkaError) -> JobError:
        """A delivery Kafka refused (sending again would be refused again): nothing written."""
        return JobError(
            f"Kafka refused request {request_id} ({job_type}): {_kafka_failure(exc)}", request_id
        )

    async def _delivered(
        self, topic: str, payload: bytes, job_type: str, failures: list[KafkaError]
    ) -> RecordMetadata:
        """`payload` sent and acknowledged, sent again after each failure that may pass (the
        producer gives up after JOBS_REQUEST_TIMEOUT_MS, maybe sooner than the caller's
        timeout, which bounds this). A refusal is raised; the failures that may pass are
        appended to `failures`, for the time-out's message."""
        while True:
            try:
                return await self._producer.send_and_wait(topic, payload, key=job_type.encode())
            except KafkaError as exc:
                if not _resendable(exc):
                    raise
                failures.append(exc)
                log.debug("request not acknowledged; sending it again", error=repr(exc))
                await asyncio.sleep(_RESEND_BACKOFF_S)

    def _model_of(self, topic: str) -> type[JobRequest] | type[JobResult]:
        return JobRequest if topic == self._settings.topics.requests else JobResult

    async def ask(
        self, topic: str, body: dict[str, Any], answers: frozenset[EventType], timeout: float
    ) -> tuple[StatusEvent, bool]:
        """The answer to `body` sent to `topic`, and whether it answers an earlier record
        with the same request ID: the first event for a request ID is taken, and a retry
        sent before (or soon after) the original's answer was read gets that answer, not
        the `duplicate` the worker sends its own record."""
        timeout = seconds_of(timeout)
        sent, payload = encoded(self._model_of(topic), body, self._settings)
        request_id = sent["request_id"]  # as the worker reads it, and names in its answer
        future = self._replies.answer(request_id, answers)
        failures: list[KafkaError] = []
        acknowledged = False
        timer = asyncio.timeout(timeout)
        try:
            async with timer:
                sent_as = await self._delivered(topic, payload, sent["job_type"], failures)
                acknowledged = True
                event = await future
        except TimeoutError:
            if not timer.expired():
                raise
            if acknowledged:
                said = (
                    f"no answer to request {request_id} ({sent['job_type']}) within "
                    f"{timeout:g}s; is a worker running for prefix "
                    f"{self._settings.topic_prefix!r}?"
                )
            else:
                why = f" ({_kafka_failure(failures[-1])})" if failures else ""
                said = (
                    f"the broker at {self._settings.bootstrap_servers} did not answer in time: "
                    f"request {request_id} ({sent['job_type']}) was not acknowledged within "
                    f"{timeout:g}s{why}, and may have gone out."
                )
            raise JobTimeoutError(said, request_id, retry_safe=True) from None
        except KafkaError as exc:  # refused: sending again is refused again
            raise self._refused(request_id, sent["job_type"], exc) from None
        finally:
            future.cancel()
        if event.type is EventType.REJECTED:
            raise JobRejectedError(event)
        source = event.source
        earlier = source is not None and (source.topic, source.partition, source.offset) != (
            topic,
            sent_as.partition,
            sent_as.offset,
        )
        return event, earlier
