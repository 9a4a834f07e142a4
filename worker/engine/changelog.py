"""The `<prefix>.state` changelog: rows that let any worker continue a partition.

Rows (every row has a key: a keyless record on a compacted topic aborts the transaction):

- key = job type, value ``{"row": "job", "state": <JobState>}``: the core state of a job type;
- key = run ID, value ``{"row": "run", "v": 1, "run": <RunRow>}``: the run record, sent to
  the job type's partition explicitly. Its format is published (`schemas.RunRecord`): the
  client's running view reads these rows;
- key = run ID, no value: the tombstone of an ended run, once it is older than the run
  retention. SQLite keeps the history; the changelog only needs what a new owner continues;
- key = ``\x00settings:<digest>``, value ``{"row": "settings", "settings": <document>}``: the
  settings a worker decided with (`worker.engine.rulebook`), for `verify`; a restore skips it;
- key = ``\x00view``, value ``{"row": "view", "v": 1, "mark": <ViewMark>}``: the partition's
  view mark (`schemas.ViewMark`), written every `JOBS_VIEW_REFRESH_S` after a fresh row of
  each running and queued run, so clients read the topic from the mark's time, not its
  start; a restore skips it.

`read_partition` rebuilds a partition from the changelog: it reads under read_committed
until its position reaches the end offset (the last stable offset; the last record is often a
transaction marker, so positions are compared, never a record awaited).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from schemas import RUN_ROW_PREFIX, VIEW_ROW_KEY, VIEW_ROW_PREFIX
from worker.core.lifecycle import dump_state, load_state
from worker.core.runs import RunRow
from worker.kafkaio import read_until

_RUN_ADAPTER: TypeAdapter[RunRow] = TypeAdapter(RunRow)


_JOB = b'{"row":"job","state":'
_RUN = RUN_ROW_PREFIX
SETTINGS_HEAD = b'{"row":"settings","settings":'


def job_row(job_type: str, state: bytes) -> tuple[bytes, bytes]:
    """(key, value) of a job type's state row; `state` is `dump_state`'s JSON."""
    return job_type.encode(), _JOB + state + b"}"


def run_row(row: RunRow) -> tuple[bytes, bytes]:
    """(key, value) of a run's row."""
    return row.run_id.encode(), _RUN + _RUN_ADAPTER.dump_json(row) + b"}"


def split_row(value: bytes) -> tuple[str, bytes]:
    """("job", `dump_state` JSON), ("run", run row JSON) or ("settings", a settings document)
    of a row's value, not validated.

    Rows as `job_row` and `run_row` write them are cut out of the value; any other spelling
    of the same JSON is parsed. Raises ValueError for anything else.
    """
    for kind, head in (
        ("job", _JOB),
        ("run", _RUN),
        ("settings", SETTINGS_HEAD),
        ("view", VIEW_ROW_PREFIX),
    ):
        if value.startswith(head) and value.endswith(b"}"):
            return kind, value[len(head) : -1]
    try:
        data: Any = json.loads(value)
    except RecursionError:
        raise ValueError(f"not a changelog row (nested too deep): {value[:100]!r}") from None
    row = data.get("row") if isinstance(data, dict) else None
    body = {"job": "state", "run": "run", "settings": "settings", "view": "mark"}.get(row or "")
    if body is None or body not in data:
        raise ValueError(f"not a changelog row: {value[:100]!r}")
    if row == "job":
        return "job", dump_state(load_state(data["state"]))
    if row == "run":
        return "run", _RUN_ADAPTER.dump_json(_RUN_ADAPTER.validate_python(data["run"]))
    return str(row), json.dumps(data[body]).encode()


def load_run(data: bytes) -> RunRow:
    """A run row from `split_row`'s JSON."""
    return _RUN_ADAPTER.validate_json(data)


def load_runs(snapshot: PartitionSnapshot) -> Iterator[RunRow]:
    """The snapshot's run rows, parsed; a row that does not parse is counted in `foreign`
    and skipped (the job states, not the run rows, hold what decisions depend on)."""
    for data in snapshot.runs.values():
        try:
            yield load_run(data)
        except ValueError:
            snapshot.foreign += 1


@dataclass
class PartitionSnapshot:
    """A partition's state as the changelog holds it, rows kept serialized: with a long
    history nearly all of them are only copied into SQLite."""

    jobs: dict[str, bytes] = field(default_factory=dict)  # job type -> `dump_state` JSON
    runs: dict[str, bytes] = field(default_factory=dict)  # run ID -> run row JSON
    records: int = 0
    end: int = 0  # the end offset it was read up to
    foreign: int = 0  # records no worker writes (not a row of ours): skipped


_CLAIMS_JOB = b'"row":"job"'


def apply_row(snapshot: PartitionSnapshot, key: bytes, value: bytes | None) -> None:
    """Fold one changelog record into `snapshot` (later rows win; tombstones delete).

    A job state is validated here, so a damaged job row fails the restore; run rows are
    parsed when they are written to SQLite (`load_runs`). A record that is not a row of
    ours at all (a key that is not UTF-8, a value that is no row: anyone who may write the
    topic could have sent it) is counted in `foreign` and skipped: it cannot stop a restore.
    """
    snapshot.records += 1
    if key == VIEW_ROW_KEY:
        return  # for clients; its value, whatever it holds, is not state
    try:
        text = key.decode()
        if value is None:
            snapshot.runs.pop(text, None)
            return
        kind, data = split_row(value)
    except ValueError:
        if value is not None and _CLAIMS_JOB in value[:64]:
            raise  # a damaged job state: the restore fails rather than forget it
        snapshot.foreign += 1
        return
    if kind == "job":
        load_state(data)
        snapshot.jobs[text] = data
    elif kind == "run":
        snapshot.runs[text] = data


async def read_partition(
    consumer: AIOKafkaConsumer,
    topic: str,
    partition: int,
    wanted: Callable[[], None] | None = None,
) -> PartitionSnapshot:
    """Read partition `partition` of the changelog from the beginning to its end offset.

    `consumer` must be read_committed and have no group; it is re-assigned here. `wanted`,
    called between fetches, may raise to stop the read.
    """
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    await consumer.seek_to_beginning(tp)
    end = (await consumer.end_offsets([tp]))[tp]
    snapshot = PartitionSnapshot(end=end)
    async for _, records in read_until(consumer, {tp: end}, max_records=10_000):
        if wanted is not None:
            wanted()
        for record in records:
            if record.key is not None:
                apply_row(snapshot, record.key, record.value)
    return snapshot
