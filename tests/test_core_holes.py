"""Holes the property tests found in the core, tried on the real broker through a worker:
what a client sees once the idempotency and ended windows have moved on."""

from __future__ import annotations

from pathlib import Path

import pytest

from schemas import EventType
from tests.conftest import RunningWorker
from worker.client import JobClient, JobRejectedError
from worker.settings import Settings

pytestmark = pytest.mark.kafka


async def test_a_start_retried_after_its_window_is_still_its_own_run(topics: Settings) -> None:
    """The request that started the run left the idempotency window (2 decisions) while the
    run is still active: its retry is a `duplicate` naming that run, not a refusal naming
    the retry's own run as the one in the way."""
    narrow = topics.model_copy(update={"idempotency_window": 2})
    worker = await RunningWorker(narrow).start()
    try:
        async with JobClient(narrow) as client:
            first = await client.start_job("report", request_id="first")
            assert first.started
            for n in range(3):  # refused, each recorded: "first" leaves the window
                refused = await client.start_job("report", request_id=f"other-{n}")
                assert refused.type is EventType.REFUSED
            retried = await client.start_job("report", request_id="first")
            assert retried.event.type is EventType.DUPLICATE
            assert retried.run_id == first.run_id
            assert retried.started
    finally:
        await worker.stop()


async def test_client_ids_differing_in_case_share_one_scope(
    topics: Settings, tmp_path: Path
) -> None:
    """Under job_type+client scope, `Acme` and `acme` are one client, as their run IDs' one
    suffix says: the second start is refused, not a second run with the same suffix."""
    config = tmp_path / "jobs.toml"
    config.write_text('[defaults]\nscope = "job_type+client"\n')
    scoped = topics.model_copy(update={"config": config})
    worker = await RunningWorker(scoped).start()
    try:
        async with JobClient(scoped) as client:
            first = await client.start_job("report", client_id="Acme")
            assert first.started
            assert str(first.run_id).endswith("-acme")
            second = await client.start_job("report", client_id=" acme")
            assert second.type is EventType.REFUSED
            assert second.running_run_id == first.run_id
            other = await client.start_job("report", client_id="bob")
            assert other.started
    finally:
        await worker.stop()


async def test_a_late_result_for_a_forgotten_run_says_what_was_checked(
    topics: Settings,
) -> None:
    """With an ended window of 1, a second ended run evicts the first: a late result for the
    first is rejected saying it is not active, not queued and not among the last ended runs
    (not "unknown run" alone)."""
    narrow = topics.model_copy(update={"ended_window": 1})
    worker = await RunningWorker(narrow).start()
    try:
        async with JobClient(narrow) as client:
            first = await client.start_job("report")
            await client.complete_job("report", str(first.run_id))
            second = await client.start_job("report")
            await client.complete_job("report", str(second.run_id))
            with pytest.raises(JobRejectedError) as rejected:
                await client.fail_job("report", str(first.run_id))
            reason = rejected.value.event.reason or ""
            assert "not active, not queued, and not among its last 1 ended runs" in reason
            with pytest.raises(JobRejectedError, match="already ended COMPLETED"):
                await client.fail_job("report", str(second.run_id))
    finally:
        await worker.stop()
