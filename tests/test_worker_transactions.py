"""`JOBS_TRANSACTIONS=worker`: one transactional producer for all of a worker's partitions.

The crash, takeover and zombie tests of `tests/test_exactly_once.py` run in this mode too;
here: batches begun together commit in one transaction, the transactional ID is the SQLite
file's (two workers on copies of one file do not fence each other for ever), a fenced
transaction leaves no failure unretrieved, and the setting is checked when it is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import json
import logging
import shutil
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError
from pydantic import ValidationError
from structlog.testing import capture_logs

from tests.chaos import WorkerProcess
from worker import compat
from worker.engine.collector import FencedError
from worker.engine.hooks import Hooks
from worker.engine.observe import Metrics
from worker.engine.shared import SharedExactlyOnce
from worker.engine.store import Store
from worker.engine.task import BatchOutcome
from worker.kafkaio import connection
from worker.settings import WORKER_TRANSACTION_TIMEOUT_MS, Settings


@pytest.mark.kafka
async def test_batches_begun_together_commit_in_one_transaction(topics: Settings) -> None:
    """A batch handed in while another partition's batch is still deciding waits for it:
    the two go out in one transaction (`jobs_transactions_total` 1), each with its offsets
    and its changelog position. Once it has committed, the next transaction waits until each
    of its partitions has begun its next batch or ended (`end`), so partitions that fetched
    together keep committing together. A batch that consumed nothing (a tick's time-outs)
    commits its partition's applied offsets again, so the group checks its generation
    too."""
    settings = topics.model_copy(update={"transactions": "worker"})
    t = settings.topics
    consumer = AIOKafkaConsumer(
        t.requests, t.results, **connection(settings), group_id=settings.group_id
    )
    metrics, stopped = Metrics(), []

    async def identity() -> str:
        return "test"

    collector = SharedExactlyOnce(settings, Hooks(), consumer, identity, stopped.append, metrics)
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=200)  # joins the group: a generation to send
        await collector.start()

        def outcome(offset: int | None) -> BatchOutcome:
            return BatchOutcome(
                state_rows=[(b"row", b"{}")],
                next_offsets={} if offset is None else {t.requests: offset},
            )

        collector.begin(0)
        collector.begin(1)
        first = asyncio.ensure_future(collector.commit(0, outcome(3), {}))
        # A broker round trip: the loop runs the transactions' task meanwhile, which must
        # not begin while partition 1 is deciding.
        await consumer.end_offsets([TopicPartition(t.requests, 0)])
        second = await collector.commit(1, outcome(5), {})
        assert await first == 2  # one row and the commit marker
        assert second == 2
        assert metrics.registry.get_sample_value("jobs_transactions_total") == 1
        # Partition 0 begins its next batch at once (a tick's); partition 1's batch has not
        # ended yet (it may begin its next too): the next transaction waits for it.
        tick = asyncio.ensure_future(
            collector.commit(0, outcome(None), {t.requests: 3, t.results: 4})
        )
        await consumer.end_offsets([TopicPartition(t.requests, 0)])
        assert not tick.done()
        collector.end(1)  # over, with nothing fetched meanwhile: no next batch
        assert await tick == 4
        collector.end(0)
        assert metrics.registry.get_sample_value("jobs_transactions_total") == 2
        tps = [TopicPartition(topic, n) for topic in (t.requests, t.results) for n in (0, 1)]
        committed = await compat.stable_committed(consumer, settings.group_id, tps, within=10)
        assert committed == {tps[0]: 3, tps[1]: 5, tps[2]: 4, tps[3]: None}
        assert stopped == []
    finally:
        await collector.stop()
        await consumer.stop()


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
    """Worker-wide transactions are the default. A crashed worker's open transaction that
    its partitions' next owner cannot abort holds it until it times out: 10 s with
    `worker`, 60 s with `partition`, unless JOBS_TRANSACTION_TIMEOUT_MS says otherwise."""
    monkeypatch.delenv("JOBS_TRANSACTIONS", raising=False)
    monkeypatch.delenv("JOBS_TRANSACTION_TIMEOUT_MS", raising=False)
    assert Settings().transactions == "worker"
    assert Settings().transaction_timeout_ms == WORKER_TRANSACTION_TIMEOUT_MS == 10_000
    assert Settings.model_fields["transaction_timeout_ms"].default == 10_000  # as documented
    monkeypatch.setenv("JOBS_TRANSACTIONS", "partition")
    assert Settings().transaction_timeout_ms == 60_000
    monkeypatch.setenv("JOBS_TRANSACTIONS", "worker")
    monkeypatch.setenv("JOBS_TRANSACTION_TIMEOUT_MS", "3000")
    assert Settings().transaction_timeout_ms == 3_000


@pytest.mark.parametrize(
    "failure",
    [
        NotImplementedError("the broker does not support ListTransactions"),
        KafkaConnectionError("the broker went away"),
        TimeoutError(),
    ],
)
async def test_a_take_that_cannot_look_for_open_transactions_says_so_and_goes_on(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    """A Kafka before 3.0, a broker away or a lookup past the time-out: the take logs which
    partition waits for the broker's time-out instead, and why, and goes on without aborting
    anything (as every take did before the abort existed)."""

    async def unanswered(consumer: object, prefix: str) -> dict[str, frozenset[TopicPartition]]:
        raise failure

    async def identity() -> str:
        return "test"

    monkeypatch.setattr(compat, "open_transactions", unanswered)
    collector = SharedExactlyOnce(
        settings.model_copy(update={"transactions": "worker"}),
        Hooks(),
        None,  # type: ignore[arg-type]  # the lookup that would use it fails first
        identity,
        lambda exc: None,
        Metrics(),
    )
    with capture_logs() as logs:
        await collector.open(2)
    waiting = [e for e in logs if e["event"].startswith("could not abort the transactions")]
    assert len(waiting) == 1
    assert waiting[0]["partition"] == 2
    assert waiting[0]["error"] == repr(failure)
    assert not [e for e in logs if e["event"].startswith("aborted a transaction")]


@pytest.mark.kafka
async def test_a_fenced_transaction_leaves_no_failure_unretrieved(
    topics: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """Another producer starts with the worker's transactional ID: the worker's next
    transaction is fenced (its outcome fails with `FencedError`), and nothing of it is left
    for asyncio to report as "Future exception was never retrieved" when it is collected.
    Fenced twice within the window, the worker is not ready."""
    settings = topics.model_copy(update={"transactions": "worker"})
    t = settings.topics
    consumer = AIOKafkaConsumer(
        t.requests, t.results, **connection(settings), group_id=settings.group_id
    )

    async def identity() -> str:
        return "twin"

    stopped: list[BaseException] = []
    collector = SharedExactlyOnce(settings, Hooks(), consumer, identity, stopped.append, Metrics())
    outcome = BatchOutcome(state_rows=[(b"row", b"{}")], next_offsets={t.requests: 1})
    await consumer.start()
    try:
        while not consumer.assignment():
            await consumer.getmany(timeout_ms=200)  # joins the group: a generation to send
        await collector.start()
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for fences in (1, 2):
                collector.begin(0)
                assert await collector.commit(0, outcome, {})  # a producer of its own again
                twin = AIOKafkaProducer(
                    **connection(settings), transactional_id=f"{settings.group_id}.worker.twin"
                )
                await twin.start()  # InitProducerId: the worker's producer is fenced
                await twin.stop()
                collector.begin(0)
                with pytest.raises(FencedError):
                    await collector.commit(0, outcome, {})
                # Not ready once fenced twice within a minute (`/readyz`), though not
                # stopped yet: a twin is told apart at the fifth.
                assert collector.fenced_again() is (fences == 2)
            await collector.stop()
            for _ in range(3):  # what the failed producer left is collected now
                gc.collect()
                await asyncio.sleep(0)
        never = [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]
        assert never == []
        assert stopped == []
    finally:
        await collector.stop()
        await consumer.stop()


async def _starts_until_cancelled(producer: AIOKafkaProducer, settings: Settings) -> None:
    """Start requests on both partitions, 100 a second, until cancelled."""
    for n in itertools.count():
        job_type = f"twin-{n % 20}"
        body = {"job_type": job_type, "request_id": f"r{n}"}
        await producer.send(
            settings.topics.requests, json.dumps(body).encode(), key=job_type.encode()
        )
        await asyncio.sleep(0.01)  # the load's pace, not a wait for anything


@pytest.mark.kafka
async def test_two_workers_on_copies_of_one_sqlite_file_do_not_fence_each_other_for_ever(
    topics: Settings, producer: AIOKafkaProducer, tmp_path: Path
) -> None:
    """Two workers started on copies of one SQLite file have one identity, so one
    transactional ID: each fences the other when it starts its producer again after a fence,
    with successes in between. Within a bound one of them stops (exit code 1), its last log
    line saying that another worker uses its identity, on a copy of its file, and what to do;
    the other goes on serving."""
    original = tmp_path / "a.db"
    store = await Store.open(original, exclusive=True)
    identity = await store.identity()
    await store.close()
    shutil.copyfile(original, tmp_path / "b.db")
    twins = [WorkerProcess(topics, name, tmp_path) for name in ("a", "b")]
    sending = asyncio.create_task(_starts_until_cancelled(producer, topics))
    try:
        for twin in twins:
            twin.module = "worker.cli"  # `jobctl run` itself
            twin.start()
        async with asyncio.timeout(60):
            # Polling child processes: there is no event to wait on.
            while all(twin.alive() for twin in twins):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        [stopped] = [twin for twin in twins if not twin.alive()]
        assert await stopped.wait_exit() == 1
        last = json.loads(stopped.log_text().splitlines()[-1])
        assert last["level"] == "error", last
        said = str(last.get("error", "")) + str(last["event"])
        assert "another worker uses this worker's identity" in said, last
        assert f"{topics.group_id}.worker.{identity}" in said
        assert str(stopped.db_path) in said
        assert "Give each worker its own SQLite file" in said
    finally:
        sending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sending
        for twin in twins:
            twin.ensure_dead()
