"""Changelog rows: written by the worker, read back by a restore and by the client."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta

import pytest
from pydantic import ValidationError

from schemas import RunStatus, Source
from worker.core.lifecycle import (
    Finish,
    JobConfig,
    JobState,
    Limits,
    Policy,
    Run,
    Start,
    decide,
    dump_state,
    load_state,
    run_size,
)
from worker.core.runs import RunRow, new_row
from worker.engine import changelog, staterows, stored

AT = datetime(2026, 11, 29, 3, 0, tzinfo=UTC)
STATE = JobState("report", active=(Run("r1", "report", None, "req-1", RunStatus.RUNNING, AT),))
ROW = RunRow("r1", "report", None, "req-1", RunStatus.RUNNING, 0, AT, None, {"day": 1}, None, None)


def test_rows_as_written_are_cut_out_and_other_spellings_parsed() -> None:
    """A restore needs each row's inner JSON; it gets the same bytes however a row is spelled."""
    _, job_value = changelog.job_row("report", dump_state(STATE))
    _, run_value = changelog.run_row(ROW)
    assert changelog.split_row(job_value) == ("job", dump_state(STATE))
    kind, data = changelog.split_row(run_value)
    assert kind == "run"
    assert changelog.load_run(data) == ROW

    respelled = json.dumps(json.loads(job_value), indent=2).encode()
    assert changelog.split_row(respelled) == ("job", dump_state(STATE))
    kind, data = changelog.split_row(json.dumps(json.loads(run_value), indent=1).encode())
    assert kind == "run"
    assert changelog.load_run(data) == ROW

    with pytest.raises(ValueError, match="not a changelog row"):
        changelog.split_row(b'{"row": "something else"}')


def test_a_snapshot_keeps_the_latest_rows_and_refuses_a_damaged_state() -> None:
    """Later rows win, a tombstone removes its run, and a state that does not validate fails
    the restore rather than a later batch."""
    snapshot = changelog.PartitionSnapshot()
    changelog.apply_row(snapshot, *changelog.job_row("report", dump_state(JobState("report"))))
    changelog.apply_row(snapshot, *changelog.job_row("report", dump_state(STATE)))
    changelog.apply_row(snapshot, *changelog.run_row(ROW))
    changelog.apply_row(snapshot, *changelog.run_row(ROW.replace(run_id="r2")))
    changelog.apply_row(snapshot, b"r1", None)
    assert snapshot.jobs == {"report": dump_state(STATE)}
    assert list(snapshot.runs) == ["r2"]
    assert snapshot.records == 5

    with pytest.raises(ValidationError, match="job_type"):
        changelog.apply_row(snapshot, b"broken", b'{"row":"job","state":{"job_type":5}}')
    assert "broken" not in snapshot.jobs


@pytest.mark.parametrize(
    ("key", "value"),
    [
        pytest.param(b"x", os.urandom(300), id="random-bytes"),
        (b"\xff\xfe", b'{"row":"run","v":1,"run":{}}'),
        (b"x", b"[" * 5_000 + b"]" * 5_000),
        (b"x", b'{"row":' + b"[" * 5_000 + b"}"),
        (b"x", b'["row", "job"]'),
        (b"x", b'{"row":"run"}'),
        (b"x", b'{"row":"nope","state":1}'),
        (b"x", b'"' + b"9" * 1_000_000 + b'"'),
        (b"x", b'{"row":"run","v":1,"run":{"run_id":5,"status":"RUNNING"}}'),
        (b"x", b'{"row":"run","v":1,"run":\xc3\x28}'),
    ],
)
def test_records_no_worker_writes_are_skipped_not_a_failed_restore(
    key: bytes, value: bytes
) -> None:
    """Anyone who may write the state topic can send anything: it is counted and skipped,
    and the rows of ours beside it are kept."""
    snapshot = changelog.PartitionSnapshot()
    changelog.apply_row(snapshot, *changelog.run_row(ROW))
    changelog.apply_row(snapshot, key, value)
    assert [run.run_id for run in changelog.load_runs(snapshot)] == ["r1"]
    assert snapshot.foreign == 1


def _lifecycles(count: int, limits: Limits) -> list[tuple[JobState, JobState]]:
    """(before, after) of each decision of `count` start-and-complete lifecycles."""
    state, steps = JobState("report"), []
    for n in range(count):
        at = AT + timedelta(seconds=n)
        source = Source(topic="t.requests", partition=0, offset=n)
        begin = Start(f"req-{n}", "report", None, {}, at, source)
        after, events = decide(state, begin, JobConfig(), limits)
        steps.append((state, after))
        run_id = events[0].run_id or ""
        result = Source(topic="t.results", partition=0, offset=n)
        done = Finish("report", run_id, RunStatus.COMPLETED, {}, None, at, result)
        steps.append((after, decide(after, done, JobConfig(), limits).state))
        state = steps[-1][1]
    return steps


def _restored(rows: list[staterows.Row]) -> changelog.PartitionSnapshot:
    snapshot = changelog.PartitionSnapshot()
    for key, value in rows:
        changelog.apply_row(snapshot, key, value)
    return snapshot


def _states(snapshot: changelog.PartitionSnapshot) -> list[tuple[str, bytes]]:
    """(job type, `dump_state` JSON) of each state the snapshot gives SQLite, read back."""
    return [
        (job_type, dump_state(load_state(stored.whole(head, [(k, e) for k, _, e in entries]))))
        for job_type, head, entries in snapshot.for_sqlite()
    ]


def test_window_entries_are_rows_of_their_own_and_a_restore_puts_them_back() -> None:
    """Each decision writes a job row of constant size, a row per window entry taken and a
    tombstone per entry that left; the rows, read in order, give back the state whole."""
    limits = Limits(ended_window=3, idempotency_window=4)
    rows: list[staterows.Row] = []
    for before, after in _lifecycles(12, limits):
        written = staterows.job_rows("report", before, after)
        head = written[0][1] or b""
        assert len(head) < 400  # no window inside, however many entries the windows hold
        assert len(written) <= 3  # the job row, one entry, at most one tombstone
        rows.extend(written)
        (restored,) = _states(_restored(rows))
        assert restored == ("report", dump_state(after))
    assert len(after.decided) == 4
    assert after.decided_next == 12
    assert len(after.ended) == 3
    assert after.ended_next == 12
    # Compaction keeps the latest row per key: the tombstoned entries are gone for good.
    compacted = dict(rows)
    live = [(key, value) for key, value in compacted.items() if value is not None]
    assert len(live) == 1 + 4 + 3
    assert list(_states(_restored(live))) == [("report", dump_state(after))]


def test_a_state_an_earlier_version_wrote_gets_its_entries_written_once() -> None:
    """A version 1 row carries its windows inside: the restore reads it as it is, and the
    first change writes every entry as a row, numbered from there on."""
    limits = Limits(ended_window=3, idempotency_window=4)
    steps = _lifecycles(6, limits)
    old = steps[-1][1].replace(decided_next=0, ended_next=0)  # as version 1 wrote it
    rows: list[staterows.Row] = [changelog.job_row("report", dump_state(old))]
    assert list(_states(_restored(rows))) == [("report", dump_state(old))]
    numbered = staterows.numbered(old)
    assert numbered is not None
    assert (numbered.decided_next, numbered.ended_next) == (4, 3)
    assert staterows.numbered(numbered) is None
    at = AT + timedelta(minutes=5)
    begin = Start("req-new", "report", None, {}, at, Source(topic="t", partition=0, offset=99))
    after = decide(numbered, begin, JobConfig(), limits).state
    rows.extend(staterows.job_rows("report", None, after))
    assert len(rows) == 1 + 1 + 4 + 3  # the old row, the new job row, every entry
    assert list(_states(_restored(rows))) == [("report", dump_state(after))]


def test_a_missing_window_entry_fails_the_restore_naming_the_job_type() -> None:
    """An entry the job row holds but the changelog lacks is damage, not an empty window."""
    rows = [
        row
        for before, after in _lifecycles(3, Limits())
        for row in staterows.job_rows("report", before, after)
    ]
    entry = next(key for key, value in rows if key.startswith(b"\x00wd\x001\x00"))
    snapshot = _restored([(k, v) for k, v in rows if k != entry])
    with pytest.raises(ValueError, match="lacks 1 of the 3 entries of job type 'report'"):
        list(_states(snapshot))


@pytest.mark.parametrize(
    ("key", "value"),
    [
        (b"\x00wd\x00x\x00report", b'{"row":"window","v":1,"entry":{}}'),
        (b"\x00wq\x001\x00report", b'{"row":"window","v":1,"entry":{}}'),
        (b"\x00wd\x001", b'{"row":"window","v":1,"entry":{}}'),
        (b"\x00wd\x001\x00\xff\xfe", b'{"row":"window","v":1,"entry":{}}'),
        (b"\x00wd\x009\x00report", os.urandom(200)),
        (b"\x00wd\x009\x00report", b"[" * 5_000),
        (b"\x00we\x009\x00report", b'"' + b"9" * 1_000_000 + b'"'),
    ],
)
def test_hostile_rows_under_window_keys_are_skipped(key: bytes, value: bytes) -> None:
    """A record under a window key that is no entry of ours is foreign: skipped, counted."""
    rows = [
        row
        for before, after in _lifecycles(2, Limits())
        for row in staterows.job_rows("report", before, after)
    ]
    snapshot = _restored([*rows, (key, value)])
    assert snapshot.foreign == 1
    assert list(_states(snapshot)) == list(_states(_restored(rows)))


def test_payloads_stay_in_the_run_rows_and_a_restore_puts_them_back() -> None:
    """The job row leaves out the `initial_data` of each active and queued run whose run row
    carries it, so a heartbeat does not rewrite them; a restore takes them from the rows."""
    limits, config = Limits(), JobConfig(policy=Policy.QUEUE)
    state, rows, payload = JobState("report"), {}, {"blob": "x" * 50_000}
    for n in range(3):
        source = Source(topic="t.requests", partition=0, offset=n)
        begin = Start(f"req-{n}", "report", None, payload, AT, source)
        state, events = decide(state, begin, config, limits)
        rows[events[0].run_id or ""] = new_row(events[0], 0)
    assert [len(state.active), len(state.queue)] == [1, 2]
    written = staterows.job_rows("report", None, state, rows.__contains__)
    assert len(written[0][1] or b"") < 2_000
    snapshot = _restored([*written, *(changelog.run_row(r) for r in rows.values() if r)])
    assert list(_states(snapshot)) == [("report", dump_state(state))]
    # A run without a row (queued by an earlier version) keeps its payload in the job row.
    inline = staterows.job_rows("report", None, state)
    assert len(inline[0][1] or b"") > 150_000
    assert list(_states(_restored(inline))) == [("report", dump_state(state))]


def test_a_queue_of_small_requests_keeps_its_payloads_in_the_job_row_up_to_a_budget() -> None:
    """Small payloads stay in the job row only up to `INLINE_RUN_BYTES` in all, in state
    order, so a long queue of small requests does not grow the row a heartbeat rewrites;
    a restore puts the others back from their run rows."""
    limits, config = Limits(), JobConfig(policy=Policy.QUEUE)
    state, rows = JobState("report"), {}
    for n in range(12):
        payload = {"n": n, "blob": "y" * 900}
        source = Source(topic="t.requests", partition=0, offset=n)
        begin = Start(f"req-{n}", "report", None, payload, AT, source, run_size(960, None))
        state, events = decide(state, begin, config, limits)
        rows[events[0].run_id or ""] = new_row(events[0], 0)
    assert [len(state.active), len(state.queue)] == [1, 11]
    written = staterows.job_rows("report", None, state, rows.__contains__)
    job_row = written[0][1] or b""
    assert job_row.count(b"y" * 900) == 1  # the active run's: 1,472 of the 2,048 bytes
    assert len(job_row) < 6_000
    snapshot = _restored([*written, *(changelog.run_row(r) for r in rows.values() if r)])
    assert list(_states(snapshot)) == [("report", dump_state(state))]


@pytest.mark.parametrize(
    ("payload", "request_bytes", "in_job_row"),
    [
        ({}, 60, True),
        ({"bench": True}, 80, True),  # a small request's payload stays in the job row
        ({"blob": "x" * 1_400}, 1_440, True),
        ({"blob": "x" * 5_000}, 5_040, False),  # a large one is left to the run row
        ({"bench": True}, None, False),  # a run of unknown size is taken as large
    ],
)
def test_sqlite_takes_the_job_rows_state_when_it_left_out_no_payload(
    payload: dict[str, object], request_bytes: int | None, in_job_row: bool
) -> None:
    """A changed state is serialized once for the changelog and SQLite when the job row
    leaves out nothing but the windows, as it does for a run of a small request; with a
    payload left to a run row, SQLite gets none (it stores the state whole) and the job row
    still leaves it out. Either way a restore gives the state back with its payload."""
    limits, config = Limits(), JobConfig(policy=Policy.QUEUE)
    state, rows = JobState("report"), {}
    source = Source(topic="t.requests", partition=0, offset=0)
    size = 0 if request_bytes is None else run_size(request_bytes, None)
    begin = Start("req-0", "report", None, payload, AT, source, size)
    after, events = decide(state, begin, config, limits)
    rows[events[0].run_id or ""] = new_row(events[0], 0)
    written, _, head = staterows.StateRows(rows).of("report", state, after)
    if in_job_row:
        assert head == stored.head(after)
        assert (written[0][1] or b"").endswith(b'"state":' + head + b"}")
    else:
        assert head is None
        assert b'"initial_data"' not in (written[0][1] or b"")
    snapshot = _restored([*written, *(changelog.run_row(r) for r in rows.values() if r)])
    assert list(_states(snapshot)) == [("report", dump_state(after))]


def _run_json(**changes: object) -> bytes:
    """`ROW`'s changelog value with some of its run's fields changed."""
    value = json.loads(changelog.run_row(ROW)[1])
    value["run"].update(changes)
    return json.dumps(value).encode()


@pytest.mark.parametrize("partition", [2**31, 2**63, 2**70, -1])
def test_a_run_row_with_a_number_sqlite_cannot_hold_is_skipped(partition: int) -> None:
    """A run row whose partition no Kafka topic has (beyond 64 bits it would overflow
    SQLite's INTEGER where it is written, at every restore): it does not validate, so it
    is skipped and counted, as any row no worker wrote."""
    snapshot = changelog.PartitionSnapshot()
    changelog.apply_row(snapshot, b"r9", _run_json(run_id="r9", partition=partition))
    changelog.apply_row(snapshot, *changelog.run_row(ROW))
    assert [run.run_id for run in changelog.load_runs(snapshot)] == ["r1"]
    assert snapshot.foreign == 1


def test_an_active_runs_unusable_row_loses_its_payload_not_the_restore() -> None:
    """The run row that carries an active run's payload, overwritten by one that does not
    validate: the job state is restored, the run without its payload, the row counted."""
    limits = Limits()
    source = Source(topic="t.requests", partition=0, offset=0)
    begin = Start("req-0", "report", None, {"blob": "x" * 5_000}, AT, source)
    state, events = decide(JobState("report"), begin, JobConfig(), limits)
    row = new_row(events[0], 0)
    assert row is not None
    written = staterows.job_rows("report", None, state, {row.run_id}.__contains__)
    broken = (row.run_id.encode(), b'{"row":"run","v":1,"run":{"run_id":"x","status":"RUNNING"}}')
    snapshot = _restored([*written, changelog.run_row(row), broken])
    ((job_type, restored),) = _states(snapshot)
    assert job_type == "report"
    (run,) = load_state(restored).active
    assert (run.run_id, run.initial_data) == (row.run_id, {})
    assert snapshot.foreign >= 1


def _with_head_changed(held: int, decided_next: int) -> changelog.PartitionSnapshot:
    """The rows of two lifecycles, then their job row again saying `held` idempotency
    entries numbered up to `decided_next`."""
    rows = [
        row
        for before, after in _lifecycles(2, Limits())
        for row in staterows.job_rows("report", before, after)
    ]
    key, value = [r for r in rows if r[0] == b"report"][-1]
    assert value is not None
    head = json.loads(value)
    head["held"][0] = held
    head["state"]["decided_next"] = decided_next
    return _restored([*rows, (key, json.dumps(head).encode())])


@pytest.mark.parametrize("held", [10**9, 2**62])
def test_a_job_row_holding_more_entries_than_the_changelog_fails_at_once(held: int) -> None:
    """A job row that says its window holds a billion entries: the restore fails naming the
    job type, without making a key for each of them first (gigabytes)."""
    snapshot = _with_head_changed(held, held)
    with pytest.raises(ValueError, match=r"lacks at least .* of job type 'report'"):
        list(_states(snapshot))


def test_a_job_row_numbering_beyond_64_bits_does_not_validate() -> None:
    """Window numbers are SQLite INTEGERs: a job row numbering past them is refused as a
    damaged row, not an overflow where SQLite writes it."""
    snapshot = _with_head_changed(2, 2**64)
    with pytest.raises(ValueError, match="decided_next"):
        list(_states(snapshot))
