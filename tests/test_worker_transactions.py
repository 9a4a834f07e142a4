"""`JOBS_TRANSACTIONS=worker`: one transactional producer for all of a worker's partitions.

The crash, takeover and zombie tests of `tests/test_exactly_once.py` run in this mode too;
here: partitions fetched together commit in one transaction, the transactional ID is the
SQLite file's, and the setting is checked when it is read.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from tests.conftest import RunningWorker
from worker.client.watch import StatusTail
from worker.engine.codec import partition_for
from worker.engine.store import Store
from worker.settings import WORKER_TRANSACTION_TIMEOUT_MS, Settings

PAIRS = 30
SPACING_S = 0.03  # the pace of the load, not a wait for the worker


def _job_type_in(partition: int, partitions: int) -> str:
    return next(
        name
        for name in (f"etl-{i}" for i in range(1000))
        if partition_for(name.encode(), partitions) == partition
    )


@pytest.mark.kafka
async def test_partitions_fetched_together_commit_in_one_transaction(
    topics: Settings, tail: StatusTail, producer: AIOKafkaProducer
) -> None:
    """Start requests sent in pairs, one to each partition, are answered once each, in
    fewer transactions than batches: a pair fetched together is committed together
    (`jobs_transactions_total` against `jobs_batches_total`)."""
    settings = topics.model_copy(update={"transactions": "worker"})
    running = await RunningWorker(settings).start()
    kinds = [_job_type_in(n, 2) for n in (0, 1)]
    ids = []
    try:
        for i in range(PAIRS):
            for kind in kinds:
                request_id = f"pair-{i}-{kind}"
                ids.append(request_id)
                body = json.dumps({"job_type": kind, "request_id": request_id}).encode()
                await producer.send(settings.topics.requests, body, key=kind.encode())
            await producer.flush()
            await asyncio.sleep(SPACING_S)
        for request_id in ids:
            await tail.wait_event(request_id=request_id)
        registry = running.worker.metrics.registry
        batches = registry.get_sample_value("jobs_batches_total", {"outcome": "committed"})
        transactions = registry.get_sample_value("jobs_transactions_total")
    finally:
        await running.stop()
    answered = [e.request_id for e in tail.events if e.request_id in ids]
    assert sorted(answered) == sorted(ids)
    assert batches is not None
    assert transactions is not None
    assert batches >= PAIRS
    assert transactions <= 0.75 * batches, (transactions, batches)


async def test_the_transactional_id_is_the_sqlite_files(tmp_path: Path) -> None:
    """A worker restarted on its SQLite file is the same producer to the broker (its open
    transaction is aborted at once); another file is another worker."""
    first = await Store.open(tmp_path / "a.db", exclusive=True)
    made = await first.identity()
    assert made == await first.identity()
    await first.close()
    again = await Store.open(tmp_path / "a.db", exclusive=True)
    assert await again.identity() == made
    await again.close()
    other = await Store.open(tmp_path / "b.db", exclusive=True)
    assert await other.identity() != made
    await other.close()


@pytest.mark.parametrize("value", ["group", "", "WORKER", " worker", "\udcff", "1"])
def test_an_unknown_transactions_value_is_refused_naming_it(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only `partition` and `worker`; anything else is refused when the settings are read,
    naming the variable."""
    monkeypatch.setenv("JOBS_TRANSACTIONS", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert [e["loc"] for e in refused.value.errors()] == [("transactions",)]


def test_worker_transactions_time_out_sooner_unless_told(monkeypatch: pytest.MonkeyPatch) -> None:
    """A crashed worker's open transaction holds its partitions' next owner until it times
    out: 10 s with `worker`, unless JOBS_TRANSACTION_TIMEOUT_MS says otherwise."""
    assert Settings().transactions == "partition"
    assert Settings().transaction_timeout_ms == 60_000
    monkeypatch.setenv("JOBS_TRANSACTIONS", "worker")
    assert Settings().transaction_timeout_ms == WORKER_TRANSACTION_TIMEOUT_MS == 10_000
    monkeypatch.setenv("JOBS_TRANSACTION_TIMEOUT_MS", "3000")
    assert Settings().transaction_timeout_ms == 3_000
