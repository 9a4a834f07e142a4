"""The intake (`worker.engine.intake`): what each poll fetched, handed to the batch runner one
batch per partition at a time. Here with stand-ins for the partition manager, the batch
runner and the record collector, so a batch stays in flight exactly as long as a test says;
the worker-wide transactions it serves are tried against the broker in
`tests/test_worker_transactions.py` and `tests/test_exactly_once.py`."""

from __future__ import annotations

import asyncio
from datetime import timedelta
from typing import Any, cast

import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord

from worker.core.config import JobsConfig
from worker.core.lifecycle import Limits
from worker.core.limits import InputLimits
from worker.engine.codec import InputRecord
from worker.engine.intake import Intake
from worker.engine.partitions import Owned
from worker.engine.task import PartitionTask, Rules
from worker.settings import Settings

REQUESTS, RESULTS = "p.requests", "p.results"


class Partitions:
    """What the intake asks of the partition manager; records pauses."""

    def __init__(self) -> None:
        rules = Rules(1, JobsConfig(), Limits(), InputLimits(), timedelta(days=1))
        self.owned = {0: Owned(PartitionTask(0, rules))}
        self.paused: set[int] = set()

    def pause(self, number: int) -> None:
        self.paused.add(number)

    def resume(self, number: int) -> None:
        self.paused.discard(number)


class Runner:
    """Each batch stays in flight until `release`."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int]]] = []
        self.started = asyncio.Event()  # a batch is in flight
        self._release = asyncio.Event()

    def isolating(self, number: int) -> bool:
        return False

    async def run(self, owned: Owned, records: list[InputRecord], wall: object) -> None:
        self.batches.append([(r.role, r.offset) for r in records])
        self.started.set()
        await self._release.wait()
        self._release.clear()

    async def release(self, owned: Owned) -> None:
        """End the batch in flight of `owned`; return once the next has started, if one
        did."""
        ending = owned.batch
        assert ending is not None
        self.started.clear()
        self._release.set()
        await ending
        if owned.batch is not ending:
            await self.started.wait()


class Collector:
    def __init__(self) -> None:
        self.begun: list[int] = []

    def begin(self, number: int) -> None:
        self.begun.append(number)


def _fetched(topic: str, *offsets_at: tuple[int, int]) -> dict[TopicPartition, list[Any]]:
    records = [
        ConsumerRecord(topic, 0, offset, at, 0, b"k", b"{}", None, 2, 2, [])
        for offset, at in offsets_at
    ]
    return {TopicPartition(topic, 0): records}


def _intake(
    transactions: str, most: int = 100, halted: bool = False
) -> tuple[Intake, Partitions, Runner, Collector]:
    settings = Settings(transactions=transactions, batch_max_records=most)
    partitions, runner, collector = Partitions(), Runner(), Collector()
    roles: dict[str, Any] = {REQUESTS: "requests", RESULTS: "results"}
    intake = Intake(
        settings,
        cast(Any, partitions),
        cast(Any, runner),
        cast(Any, collector),
        roles,
        lambda: halted,
    )
    return intake, partitions, runner, collector


async def test_what_is_fetched_during_a_batch_is_its_next_batch_in_decision_order() -> None:
    """With worker-wide transactions a partition keeps fetching while its batch is in
    flight: what comes meanwhile waits, and is the next batch, in broker-time order, as soon
    as the batch ends; each batch is announced to the collector when it starts."""
    intake, partitions, runner, collector = _intake("worker")
    intake.offer(_fetched(REQUESTS, (0, 1_000), (1, 1_010)))
    await runner.started.wait()
    assert runner.batches == [[("requests", 0), ("requests", 1)]]
    intake.offer(_fetched(REQUESTS, (2, 1_030)))
    intake.offer(_fetched(RESULTS, (0, 1_020)))
    assert len(runner.batches) == 1  # one batch per partition at a time
    assert partitions.paused == set()  # still fetching
    await runner.release(partitions.owned[0])
    assert runner.batches[1] == [("results", 0), ("requests", 2)]
    assert collector.begun == [0, 0]
    await runner.release(partitions.owned[0])
    assert len(runner.batches) == 2
    assert partitions.owned[0].queued == []


async def test_a_full_queue_pauses_its_partition_until_it_is_handed_out() -> None:
    """A queue of `JOBS_BATCH_MAX_RECORDS` records pauses its partition (memory stays
    bounded while a batch is slow); the next batch takes the queue and fetching resumes."""
    intake, partitions, runner, _ = _intake("worker", most=3)
    intake.offer(_fetched(REQUESTS, (0, 1_000)))
    await runner.started.wait()
    intake.offer(_fetched(REQUESTS, (1, 1_001), (2, 1_002)))
    assert partitions.paused == set()
    intake.offer(_fetched(REQUESTS, (3, 1_003)))
    assert partitions.paused == {0}
    await runner.release(partitions.owned[0])
    assert runner.batches[1] == [("requests", 1), ("requests", 2), ("requests", 3)]
    assert partitions.paused == set()


async def test_with_a_producer_per_partition_a_partition_is_paused_during_its_batch() -> None:
    """`JOBS_TRANSACTIONS=partition`: nothing more is fetched for a partition while its batch
    is in flight; it is resumed when the batch ends."""
    intake, partitions, runner, _ = _intake("partition")
    intake.offer(_fetched(REQUESTS, (0, 1_000)))
    await runner.started.wait()
    assert partitions.paused == {0}
    await runner.release(partitions.owned[0])
    assert partitions.paused == set()


@pytest.mark.parametrize("how", ["revoked", "halted"])
async def test_no_batch_starts_for_a_partition_revoked_or_a_worker_stopping(how: str) -> None:
    """A queue left when the partition is revoked, or when the worker stops (draining, or
    after a failure), starts no batch: its offsets stay uncommitted and whoever reads the
    partition next reads those records again."""
    intake, partitions, runner, _ = _intake("worker", halted=how == "halted")
    owned = partitions.owned[0]
    if how == "halted":
        intake.offer(_fetched(REQUESTS, (0, 1_000)))
        assert runner.batches == []
        assert [r.offset for r in owned.queued] == [0]
        return
    intake.offer(_fetched(REQUESTS, (0, 1_000)))
    await runner.started.wait()
    intake.offer(_fetched(REQUESTS, (1, 1_001)))
    del partitions.owned[0]
    await runner.release(owned)
    assert len(runner.batches) == 1
    intake.offer(_fetched(REQUESTS, (2, 1_002)))  # not ours now
    assert [r.offset for r in owned.queued] == [1]
