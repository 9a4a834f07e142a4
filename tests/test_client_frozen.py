"""A broker that hangs (SIGSTOP) under a client and under jobctl: every call ends within its
timeout with `JobTimeoutError`, carrying the request ID to retry with, never with a raw
aiokafka error; jobctl ends within about its --timeout and says the broker did not answer.

The broker is this module's own (the session's cannot be frozen), its producer's request
timeout lowered (JOBS_REQUEST_TIMEOUT_MS) below the calls' timeouts, so that the producer
gives up first, as aiokafka's 40 s does under a call of a minute.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from pydantic import ValidationError
from typer.testing import CliRunner

from tests.conftest import create_topics
from worker.cli import app
from worker.client import JobClient, JobTimeoutError
from worker.devtools.localkafka import LocalKafka
from worker.settings import Settings

pytestmark = pytest.mark.kafka
runner = CliRunner()
REQUEST_TIMEOUT_MS = 1_000  # the producer's, per attempt
CALL_TIMEOUT_S = 3.0  # longer than one attempt: the call honours it, not the producer's


@pytest.fixture(scope="module")
def broker() -> Iterator[LocalKafka]:
    kafka = LocalKafka().start()
    try:
        yield kafka
    finally:
        if kafka.frozen:
            kafka.thaw()
        kafka.stop()


@pytest.fixture
async def frozen_settings(broker: LocalKafka, prefix: str) -> AsyncIterator[Settings]:
    """Settings on the module's broker, its topics made; thawed after the test."""
    settings = Settings(
        bootstrap_servers=broker.bootstrap_servers,
        topic_prefix=prefix,
        request_timeout_ms=REQUEST_TIMEOUT_MS,
    )
    await create_topics(settings, 1)
    try:
        yield settings
    finally:
        if broker.frozen:
            await asyncio.to_thread(broker.thaw)


async def test_a_result_the_frozen_broker_never_acknowledges_times_out_with_its_id(
    broker: LocalKafka, frozen_settings: Settings
) -> None:
    """complete_job with a timeout longer than the producer's: the producer's attempts fail
    (RequestTimedOutError), and the call goes on sending until its own timeout, then raises
    JobTimeoutError naming the request, saying the broker did not answer in time."""
    request_id = str(uuid.uuid4())
    async with JobClient(frozen_settings) as jobs:
        await asyncio.to_thread(broker.freeze)
        began = time.monotonic()
        with pytest.raises(JobTimeoutError) as timed_out:
            await jobs.complete_job(
                "report", "261128-093000-0.1", timeout=CALL_TIMEOUT_S, request_id=request_id
            )
        took = time.monotonic() - began
        await asyncio.to_thread(broker.thaw)
    error = timed_out.value
    assert error.request_id == request_id
    assert error.retry_safe
    assert "did not answer in time" in str(error)
    assert f"request {request_id} (report) was not acknowledged within 3s" in str(error)
    assert f"Retrying with request_id={request_id!r} is safe" in str(error)
    assert CALL_TIMEOUT_S <= took < CALL_TIMEOUT_S + 2


async def test_a_send_without_waiting_to_a_frozen_broker_raises_with_its_request_id(
    broker: LocalKafka, frozen_settings: Settings
) -> None:
    """A progress report and a start without waiting are not resent: when the producer
    gives up, JobTimeoutError with the request ID, not aiokafka's error."""
    async with JobClient(frozen_settings) as jobs:
        await asyncio.to_thread(broker.freeze)
        with pytest.raises(JobTimeoutError) as progress:
            await jobs.report_progress("report", "261128-093000-0.1", {"rows": 1})
        with pytest.raises(JobTimeoutError) as start:
            await jobs.start_job("report", wait=False, request_id="start-1")
        await asyncio.to_thread(broker.thaw)
    assert progress.value.request_id is not None
    assert progress.value.retry_safe
    assert start.value.request_id == "start-1"
    assert "JOBS_REQUEST_TIMEOUT_MS" in str(start.value)
    assert "Retrying with request_id='start-1' is safe" in str(start.value)


def _submit(settings: Settings, *args: str) -> tuple[Any, float]:
    began = time.monotonic()
    result = runner.invoke(
        app,
        [
            "submit",
            "report",
            "--timeout",
            str(CALL_TIMEOUT_S),
            "--bootstrap",
            settings.bootstrap_servers,
            "--prefix",
            settings.topic_prefix,
            *args,
        ],
    )
    return result, time.monotonic() - began


def test_submit_to_a_broker_frozen_before_it_connects_ends_within_its_timeout(
    broker: LocalKafka, frozen_settings: Settings
) -> None:
    """Nothing could be sent: exit 4 within about --timeout, saying the broker did not
    answer and that nothing was sent (not 'cannot connect ... closed the connection')."""
    broker.freeze()
    result, took = _submit(frozen_settings)
    broker.thaw()
    assert result.exit_code == 4, result.output
    assert (
        f"the broker at {frozen_settings.bootstrap_servers} did not answer within 3s "
        "(--timeout); nothing was sent"
    ) in result.output
    assert "closed the connection" not in result.output
    assert took < CALL_TIMEOUT_S + 3


def test_submit_to_a_broker_frozen_once_connected_names_the_request_to_retry(
    broker: LocalKafka, frozen_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The broker hangs once the client is open: the request may have gone out, so the line
    gives the --request-id to retry with, within about --timeout."""
    opened = JobClient.open

    async def open_then_freeze(self: JobClient) -> JobClient:
        client = await opened(self)
        await asyncio.to_thread(broker.freeze)
        return client

    monkeypatch.setattr(JobClient, "open", open_then_freeze)
    result, took = _submit(frozen_settings, "--request-id", "retry-me")
    broker.thaw()
    assert result.exit_code == 4, result.output
    assert "did not answer in time" in result.output
    assert "Retrying with --request-id retry-me is safe" in result.output
    assert took < CALL_TIMEOUT_S + 3 + 1  # connecting first, then the call's --timeout


@pytest.mark.parametrize("value", ["abc", "-1", "0", "99", "1e400", "9" * 40, "\udcff", "1.5"])
def test_a_request_timeout_that_cannot_work_is_refused_naming_it(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOBS_REQUEST_TIMEOUT_MS: not a whole number of milliseconds from 100 up to what Kafka
    takes is refused when the settings are read, naming it."""
    monkeypatch.setenv("JOBS_REQUEST_TIMEOUT_MS", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert [e["loc"] for e in refused.value.errors()] == [("request_timeout_ms",)]
