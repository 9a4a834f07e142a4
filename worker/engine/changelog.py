"""The `<prefix>.state` changelog: rows that let any worker continue a partition.

Rows (every row has a key: a keyless record on a compacted topic aborts the transaction):

- key = job type, value ``{"row": "job", "v": 2, "held": [<d>, <e>], "state": <JobState>}``:
  the core state of a job type without its two windows, which hold `d` (idempotency) and
  `e` (ended runs) entries. Version 1, ``{"row": "job", "state": <JobState>}``, carried the
  windows inside, up to hundreds of kilobytes rewritten on every heartbeat; it is still read,
  and its windows are written as rows the first time the job type changes;
- key = ``\x00w<d|e>\x00<number>\x00<job type>``, value ``{"row": "window", "v": 1, "entry":
  <Decided | EndedRun>}``: one entry of a job type's idempotency (`d`) or ended-runs (`e`)
  window, numbered by `JobState.decided_next` / `ended_next`; a tombstone when it leaves
  the window. A restore puts each window back from the entries its job row says it holds;
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
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import TypeAdapter

from schemas import RUN_ROW_PREFIX, VIEW_ROW_KEY, VIEW_ROW_PREFIX
from worker.core.lifecycle import JobState, dump_state, load_state
from worker.core.runs import RunRow
from worker.engine import encoding, stored
from worker.engine.encoding import run_row as run_row  # (key, value) of a run's row
from worker.engine.staterows import (
    ENTRY as _ENTRY,
    HEAD as _HEAD,
    WINDOW_KEY as _WINDOW_KEY,
    window_key,
)
from worker.kafkaio import read_until

_RUN_ADAPTER = encoding.RUN


_JOB = b'{"row":"job","state":'  # version 1: the windows inside the state
_RUN = RUN_ROW_PREFIX
SETTINGS_HEAD = b'{"row":"settings","settings":'


@dataclass(frozen=True)
class _HeadRow:
    row: Literal["job"]
    v: Literal[2]
    held: tuple[int, int]  # entries of the idempotency and ended-runs windows
    state: JobState  # its windows empty


_HEAD_ROW: TypeAdapter[_HeadRow] = TypeAdapter(_HeadRow)


def job_row(job_type: str, state: bytes) -> tuple[bytes, bytes]:
    """(key, value) of a version 1 job state row (windows inside); `state` is `dump_state`'s
    JSON. Workers write `job_rows`; this is what earlier versions wrote."""
    return job_type.encode(), _JOB + state + b"}"


def split_row(value: bytes) -> tuple[str, bytes]:
    """("job", `dump_state` JSON), ("run", run row JSON) or ("settings", a settings document)
    of a row's value, not validated.

    Rows as `job_row` and `run_row` write them are cut out of the value; any other spelling
    of the same JSON is parsed. Raises ValueError for anything else.
    """
    if value.startswith(_HEAD):
        return "head", value  # validated whole by `apply_row`
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
    if row == "job" and data.get("v") == 2:
        return "head", value
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

    jobs: dict[str, bytes] = field(default_factory=dict)  # job type -> version 1 state JSON
    heads: dict[str, bytes] = field(default_factory=dict)  # job type -> version 2 row
    entries: dict[bytes, bytes] = field(default_factory=dict)  # window key -> entry JSON
    runs: dict[str, bytes] = field(default_factory=dict)  # run ID -> run row JSON
    records: int = 0
    end: int = 0  # the end offset it was read up to
    foreign: int = 0  # records no worker writes (not a row of ours): skipped
    # The partition count of the latest settings row that records one: what the partition's
    # state was decided with (`rulebook.SettingsDocument.partitions`).
    partitions: int | None = None

    @property
    def job_types(self) -> int:
        """How many job types have a state."""
        return len(self.jobs) + len(self.heads)

    def for_sqlite(self) -> Iterator[tuple[str, bytes, list[stored.Entry]]]:
        """(job type, head JSON, window entries) of every job type as SQLite stores it
        (`worker.engine.stored`), payloads put back in, one at a time (a long history has as
        many job types as runs).

        Raises ValueError for a job row or window entry that does not validate, or naming
        the job type when an entry its row holds is missing.
        """
        for job_type, value in self.jobs.items():
            yield job_type, *stored.split(value)
        for job_type, value in self.heads.items():
            head = _HEAD_ROW.validate_json(value)
            entries: list[stored.Entry] = []
            for (kind, adapter), end, held in zip(
                stored.WINDOWS,
                (head.state.decided_next, head.state.ended_next),
                head.held,
                strict=True,
            ):
                entries.extend(self._window(job_type, kind, adapter, end, held))
            yield job_type, stored.head(self._payloads(head.state)), entries

    def _window(
        self, job_type: str, kind: bytes, adapter: TypeAdapter[Any], end: int, held: int
    ) -> Iterator[stored.Entry]:
        """The `held` entries of `job_type`'s window `kind` numbered up to `end`, oldest
        first, each validated."""
        name = {b"d": "idempotency", b"e": "ended-runs"}[kind]
        if held > len(self.entries):  # a count no changelog could back: keys not made
            raise ValueError(
                f"the changelog lacks at least {held - len(self.entries)} of the {held} "
                f"entries of job type {job_type!r}'s {name} window"
            )
        keys = [window_key(kind, n, job_type) for n in range(end - held, end)]
        missing = [n for n, key in enumerate(keys, end - held) if key not in self.entries]
        if missing:
            raise ValueError(
                f"the changelog lacks {len(missing)} of the {held} entries of job type "
                f"{job_type!r}'s {name} window (first missing: number {missing[0]})"
            )
        letter = kind.decode()
        for number, key in enumerate(keys, end - held):
            entry = self.entries[key]
            adapter.validate_json(entry)
            yield letter, number, entry

    def _payloads(self, state: JobState) -> JobState:
        """`state` with the payloads its job row left to the run rows put back."""

        def payload(run_id: str, inline: Mapping[str, Any]) -> Mapping[str, Any]:
            row = None if inline else self.runs.get(run_id)
            if row is None:
                return inline
            try:
                return load_run(row).initial_data
            except ValueError:  # a row no worker wrote: skipped, as `load_runs` skips it
                self.foreign += 1
                return inline

        active = tuple(
            r.replace(initial_data=payload(r.run_id, r.initial_data)) for r in state.active
        )
        queue = tuple(
            q.replace(initial_data=payload(q.run_id, q.initial_data)) for q in state.queue
        )
        return state.replace(active=active, queue=queue)


def _apply_entry(snapshot: PartitionSnapshot, key: bytes, value: bytes | None) -> None:
    """Fold a window entry row (or its tombstone) into `snapshot`; anything else under a
    window key is foreign."""
    try:
        kind, number, name = key[len(_WINDOW_KEY) :].split(b"\x00", 2)
        name.decode()
        if kind not in (b"d", b"e") or not number.isdigit():
            raise ValueError(kind)
    except ValueError:
        snapshot.foreign += 1
        return
    if value is None:
        snapshot.entries.pop(key, None)
    elif value.startswith(_ENTRY) and value.endswith(b"}"):
        snapshot.entries[key] = value[len(_ENTRY) : -1]
    else:
        snapshot.foreign += 1


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
    if key.startswith(_WINDOW_KEY):
        _apply_entry(snapshot, key, value)
        return
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
    if kind == "head":
        snapshot.heads[text] = data  # validated by `states`: a damaged one fails the restore
        snapshot.jobs.pop(text, None)
    elif kind == "job":
        load_state(data)
        snapshot.jobs[text] = data
        snapshot.heads.pop(text, None)
    elif kind == "run":
        snapshot.runs[text] = data
    elif kind == "settings" and (count := _partitions_in(data)) is not None:
        snapshot.partitions = count


def _partitions_in(document: bytes) -> int | None:
    """The partition count a settings document records, if it records one (read without
    validating the rest: that is `verify`'s to read)."""
    try:
        data = json.loads(document)
    except (ValueError, RecursionError):
        return None
    count = data.get("partitions") if isinstance(data, dict) else None
    return count if type(count) is int and count > 0 else None


async def read_partition(
    consumer: AIOKafkaConsumer,
    topic: str,
    partition: int,
    wanted: Callable[[], None] | None = None,
) -> PartitionSnapshot:
    """Read partition `partition` of the changelog from the beginning to its end offset.

    `consumer` must be read_committed and have no group; it is assigned the partition here,
    and nothing once the read is over: a consumer left assigned keeps a fetch waiting at the
    broker for new records, and the broker answers a connection's requests in order, so its
    next `end_offsets` waited out that fetch (`fetch_max_wait_ms`, 500 ms by default).
    `wanted`, called between fetches, may raise to stop the read.
    """
    tp = TopicPartition(topic, partition)
    consumer.assign([tp])
    try:
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp]
        snapshot = PartitionSnapshot(end=end)
        async for _, records in read_until(consumer, {tp: end}, max_records=10_000):
            if wanted is not None:
                wanted()
            for record in records:
                if record.key is not None:
                    apply_row(snapshot, record.key, record.value)
    finally:
        consumer.assign([])
    return snapshot
