"""A start sent again with its request ID is a retry, and the client says so."""

from __future__ import annotations

from schemas import EventType
from tests.conftest import RunningWorker
from worker.client import JobClient
from worker.client.watch import StatusTail
from worker.settings import Settings


async def test_a_retry_is_retried_whichever_answer_the_client_reads_first(
    worker: RunningWorker, topics: Settings, tail: StatusTail
) -> None:
    """`start_job(wait=False)` then `start_job(request_id=rid)`: the worker answers the
    second record `duplicate`, and the client, which may read the first record's `started`
    first, says `retried` (it said False) with the original decision."""
    async with JobClient(topics) as jobs:
        rid = await jobs.start_job("retry.test", wait=False)
        assert isinstance(rid, str)
        again = await jobs.start_job("retry.test", request_id=rid)
        assert again.retried
        assert again.type is EventType.STARTED
        assert again.started
        first = await jobs.start_job("retry.fresh")
        assert not first.retried  # a request decided once is no retry
        assert (await jobs.start_job("retry.fresh", request_id=first.request_id)).retried
    # the status topic has the original's `started` and this retry's `duplicate`
    await tail.wait_event(request_id=rid, type=EventType.DUPLICATE)
    kinds = [e.type for e in tail.events if e.request_id == rid]
    assert kinds == [EventType.STARTED, EventType.DUPLICATE]
