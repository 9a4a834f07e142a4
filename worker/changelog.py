"""The `<prefix>.state` changelog: rows that let any worker continue a partition.

Rows (every row has a key: a keyless record on a compacted topic aborts the transaction):

- key = job type, value ``{"row": "job", "state": <JobState>}``: the core state of a job type;
- key = run ID, value ``{"row": "run", "run": <RunRow>}``: the run record, sent to the job
  type's partition explicitly;
- key = run ID, no value: the tombstone of an ended run, once it is older than the run
  retention. SQLite keeps the history; the changelog only needs what a new owner continues.

`read_partition` rebuilds a partition from the changelog: it reads under read_committed
until its position reaches the end offset (the last stable offset; the last record is often a
transaction marker, so positions are compared, never a record awaited).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from worker.kafkaio import read_until
from worker.lifecycle import JobState, load_state
from worker.store import RunRow

_RUN_ADAPTER: TypeAdapter[RunRow] = TypeAdapter(RunRow)


def job_row(job_type: str, state: bytes) -> tuple[bytes, bytes]:
    """(key, value) of a job type's state row; `state` is `dump_state`'s JSON."""
    return job_type.encode(), b'{"row":"job","state":' + state + b"}"


def run_row(row: RunRow) -> tuple[bytes, bytes]:
    """(key, value) of a run's row."""
    value = b'{"row":"run","run":' + _RUN_ADAPTER.dump_json(row) + b"}"
    return row.run_id.encode(), value


@dataclass
class PartitionSnapshot:
    """A partition's state as the changelog holds it."""

    jobs: dict[str, JobState] = field(default_factory=dict)
    runs: dict[str, RunRow] = field(default_factory=dict)
    records: int = 0


def apply_row(snapshot: PartitionSnapshot, key: bytes, value: bytes | None) -> None:
    """Fold one changelog record into `snapshot` (later rows win; tombstones delete)."""
    snapshot.records += 1
    text = key.decode()
    if value is None:
        snapshot.runs.pop(text, None)
        return
    data: dict[str, Any] = json.loads(value)
    if data["row"] == "job":
        snapshot.jobs[text] = load_state(data["state"])
    elif data["row"] == "run":
        snapshot.runs[text] = _RUN_ADAPTER.validate_python(data["run"])


async def read_partition(
    consumer: AIOKafkaConsumer, topic: str, partition: int
) -> PartitionSnapshot:
    """Read partition `partition` of the changelog from the beginning to its end offset.

    `consumer` must be read_committed and have no group; it is re-assigned here.
    """
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    end = (await consumer.end_offsets([tp]))[tp]
    snapshot = PartitionSnapshot()
    async for _, records in read_until(consumer, {tp: end}, max_records=10_000):
        for record in records:
            if record.key is not None:
                apply_row(snapshot, record.key, record.value)
    return snapshot
