"""A batch's outcome as Kafka records, appended straight into aiokafka's record batches.

`write_outcome` turns an outcome into records (status events with their headers, changelog
rows, dead letters, re-routed inputs) and `RecordBatches` appends each one to a record
batch of its topic-partition. `AIOKafkaProducer.send` would cost a coroutine, a partitioner
call and a future per record; a transition writes four. `collector.Outbox` sends the
batches in the open transaction (or not) and waits for their delivery.

A hot module (`worker.compiled`): every record of every transition passes through here.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from schemas import view_row
from worker.engine import rulebook
from worker.engine.codec import REROUTED_FROM
from worker.engine.encoding import event_json, run_row
from worker.engine.envelope import source_of, status_headers
from worker.engine.task import BatchOutcome
from worker.settings import Topics

_NO_HEADERS: list[tuple[str, bytes | None]] = []  # aiokafka takes a list; it only reads it


class Partition:
    """One topic-partition's record batches (`RecordBatches.to`): the full ones and the open
    one, the last. The open batch's records go to its compiled encoder directly (its
    `append`, looked up once a batch: 0.22 µs a record against `BatchBuilder.append`'s
    0.56), counted here; the count the producer reads (`record_count`) is set when the
    batch is full and when the batches are taken (`RecordBatches.take`). aiokafka's
    internals, as in `worker.compat`, and tested against the installed aiokafka likewise
    (`tests/test_compat.py`)."""

    def __init__(self) -> None:
        self.builders: list[Any] = []
        self.add: Any = None  # the open batch's encoder's `append`, or None
        self.count = 0  # records in the open batch

    def seal(self) -> None:
        """Give the open batch its count, as its own `append` would have."""
        if self.builders:
            self.builders[-1]._relative_offset = self.count


class RecordBatches:
    """Records for one producer: the record batches of each topic-partition (a full batch
    is set aside and a new one opened, so order within a partition is kept)."""

    def __init__(self, create_batch: Callable[[], Any]) -> None:
        self._create_batch = create_batch
        self._partitions: dict[tuple[str, int], Partition] = {}
        self.records = 0

    def add(
        self,
        topic: str,
        partition: int,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]] = (),
    ) -> None:
        """Append one record for `topic`/`partition` (its headers copied)."""
        headers_list = list(headers) if headers else _NO_HEADERS
        self.append(self.to(topic, partition), key, value, headers_list)

    def to(self, topic: str, partition: int) -> Partition:
        """The record batches of `topic`/`partition`, for `append`: looked up once for the
        records of an outcome that go there."""
        batches = self._partitions.get((topic, partition))
        if batches is None:
            batches = self._partitions[(topic, partition)] = Partition()
        return batches

    def append(
        self,
        batches: Partition,
        key: bytes | None,
        value: bytes | None,
        headers: list[tuple[str, bytes | None]],
    ) -> None:
        """Append one record, stamped now, to a topic-partition's `batches` (`to`);
        `headers` is taken as it is (aiokafka only reads it)."""
        self.records += 1
        add = batches.add
        if add is not None:
            if add(batches.count, None, key, value, headers) is not None:
                batches.count += 1
                return
            batches.seal()  # full: closed with its count
            batches.builders[-1].close()
        builder = self._create_batch()
        add = batches.add = builder._builder.append
        # An empty batch takes any one record; its size is checked by the broker.
        add(0, None, key, value, headers)
        batches.builders.append(builder)
        batches.count = 1

    def take(self) -> dict[tuple[str, int], list[Any]]:
        """Every record batch so far, by topic-partition, each with its count (as the
        producer reads it); the next record opens new ones."""
        taken = {}
        for where, batches in self._partitions.items():
            batches.seal()
            taken[where] = batches.builders
        self._partitions = {}
        return taken


def write_outcome(out: RecordBatches, topics: Topics, number: int, outcome: BatchOutcome) -> None:
    """Add the records of `outcome` (all to partition `number`, re-routes to theirs)."""
    source = source_of(topics.status.removesuffix(".status"))
    settings = (rulebook.HEADER, outcome.settings.encode()) if outcome.settings else None
    if outcome.events:
        statuses = out.to(topics.status, number)
        traces = outcome.traces
        for event in outcome.events:
            value = event_json(event)
            trace = traces.get(event.__dict__["event_id"]) if traces else None
            headers = status_headers(event, source, trace)
            if settings is not None:
                headers.append(settings)
            job_type: str = event.__dict__["job_type"]  # past pydantic's `__getattr__` hook
            out.append(statuses, job_type.encode(), value, headers)
    for key, letter in outcome.dead_letters:
        out.add(topics.dlq, number, key, letter.model_dump_json().encode())
    for record, reroute in outcome.reroutes:
        origin = f"{record.topic}:{record.partition}:{record.offset}".encode()
        rerouted = [*record.headers, (REROUTED_FROM, origin)]
        out.add(record.topic, reroute.partition, reroute.key, record.value, rerouted)
    rows = out.to(topics.state, number)  # the changelog's
    if outcome.settings_row is not None:
        settings_key, settings_value = outcome.settings_row
        out.append(rows, settings_key, settings_value, _NO_HEADERS)
    for row_key, row_value in outcome.state_rows:
        out.append(rows, row_key, row_value, _NO_HEADERS)
    for row in outcome.runs.values():
        run_key, run_value = run_row(row)
        out.append(rows, run_key, run_value, _NO_HEADERS)
    for run_id in outcome.tombstones:
        out.append(rows, run_id.encode(), None, _NO_HEADERS)
    for row in outcome.view_rows:
        run_key, run_value = run_row(row)
        out.append(rows, run_key, run_value, _NO_HEADERS)
    if outcome.view_mark is not None:  # after the rows it vouches for
        mark_key, mark_value = view_row(outcome.view_mark)
        out.append(rows, mark_key, mark_value, _NO_HEADERS)
