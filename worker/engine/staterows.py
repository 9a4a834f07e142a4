"""A job state's change as `<prefix>.state` rows: its job row (the state without its
windows), a row for each window entry it took and a tombstone for each that left.

The changelog's format is `worker.engine.changelog`'s (its docstring); this is the part of
it every transition writes, in a hot module (`worker.compiled`). SQLite stores the same
head and entries (`worker.engine.stored`): `StateRows.of` finds the entries once for both
and hands SQLite the job row's state when it is the state as it is.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from worker.core.lifecycle import JobState, Queued, Run
from worker.engine import stored
from worker.engine.encoding import STATE, head_json

Row = tuple[bytes, bytes | None]  # (key, value); no value: a tombstone

HEAD = b'{"row":"job","v":2,'  # a job row, version 2: the windows in rows of their own
WINDOW_KEY = b"\x00w"
ENTRY = b'{"row":"window","v":1,"entry":'


def window_key(kind: bytes, number: int, job_type: str) -> bytes:
    """The key of entry `number` of a job type's window `kind` (b"d" or b"e")."""
    return b"%s%s\x00%d\x00%s" % (WINDOW_KEY, kind, number, job_type.encode())


_PAYLOAD = {"initial_data"}
# Runs whose `size`s (`run_size`: a request's bytes, plus 512) add up to at most this keep
# their payloads in the job row, in state order: rewriting a small payload with each change
# of the state costs less than serializing the state a second time for SQLite, which stores
# it whole, and a long queue of small requests still leaves the row small. A run of size 0
# (from a build before sizes) is taken as large.
INLINE_RUN_BYTES = 2_048


def _head(state: JobState, has_row: Callable[[str], bool]) -> tuple[bytes, bool]:
    """`state`'s JSON without its windows, nor the `initial_data` of each active or queued
    run past `INLINE_RUN_BYTES` whose run row carries it (a restore takes it from there:
    `PartitionSnapshot.states`); and whether that left out nothing else, so it is SQLite's
    head row too (`stored.head`).
    """
    leave_out: dict[str, Any] = {"decided": True, "ended": True}
    groups: tuple[tuple[str, tuple[Run | Queued, ...]], ...] = (
        ("active", state.active),
        ("queue", state.queue),
    )
    budget = INLINE_RUN_BYTES
    for name, runs in groups:
        payloads: dict[int, set[str]] = {}
        for i, run in enumerate(runs):
            if not run.initial_data:
                continue
            if 0 < run.size <= budget:
                budget -= run.size
            elif has_row(run.run_id):
                payloads[i] = _PAYLOAD
        if payloads:
            leave_out[name] = payloads
    if len(leave_out) == 2:  # nothing left out but the windows
        return head_json(state), True
    return STATE.serializer.to_json(state, exclude=leave_out), False


def job_rows(
    job_type: str,
    before: JobState | None,
    after: JobState,
    has_row: Callable[[str], bool] = lambda run_id: False,
    changes: list[stored.Change] | None = None,
) -> list[Row]:
    """The rows of a job type's state going from `before` to `after`: its job row, a row per
    window entry taken since, a tombstone per entry that left (`stored.window_changes`, or the
    `changes` already found).

    The job row leaves out the payload of each run past `INLINE_RUN_BYTES` for which
    `has_row` says its run row is in the changelog.
    """
    return _job_rows(job_type, before, after, has_row, changes)[0]


def _job_rows(
    job_type: str,
    before: JobState | None,
    after: JobState,
    has_row: Callable[[str], bool],
    changes: list[stored.Change] | None,
) -> tuple[list[Row], bytes | None]:
    """`job_rows`, and SQLite's head row of `after` when it is the job row's state."""
    state, whole = _head(after, has_row)
    held = b"%d,%d" % (len(after.decided), len(after.ended))
    head = HEAD + b'"held":[' + held + b'],"state":' + state + b"}"
    rows: list[Row] = [(job_type.encode(), head)]
    for kind, number, entry in stored.window_changes(before, after) if changes is None else changes:
        value = None if entry is None else ENTRY + entry + b"}"
        rows.append((window_key(kind, number, job_type), value))
    return rows, state if whole else None


class StateRows:
    """A partition's job states as changelog rows: which states' window entries are not
    rows yet (an earlier version wrote them), and the rows of each change."""

    def __init__(self, runs: Mapping[str, object]) -> None:
        self._runs = runs  # the partition's running and queued runs: their rows are written
        self._unnumbered: set[str] = set()

    def loaded(self, job_type: str, state: JobState) -> JobState:
        """`state` as read from SQLite, its window entries numbered if they were not."""
        renumbered = numbered(state)
        if renumbered is None:
            return state
        self._unnumbered.add(job_type)
        return renumbered

    def of(
        self, job_type: str, before: JobState | None, after: JobState
    ) -> tuple[list[Row], list[stored.Change], bytes | None]:
        """The rows of `job_type` going from `before` to `after` (`job_rows`), the window
        changes they carry (for SQLite, which stores the same entries), and SQLite's head row
        of `after` when the job row holds it as it is (no payload left out): serialized once
        for both."""
        if job_type in self._unnumbered:
            self._unnumbered.discard(job_type)
            before = None
        changes = stored.window_changes(before, after)
        rows, head = _job_rows(job_type, before, after, self._runs.__contains__, changes)
        return rows, changes, head


def numbered(state: JobState) -> JobState | None:
    """`state` with its window entries numbered, if an earlier version wrote it without
    (its windows then still have to be written as rows: `job_rows(..., before=None)`)."""
    if state.decided_next >= len(state.decided) and state.ended_next >= len(state.ended):
        return None
    return state.replace(
        decided_next=max(state.decided_next, len(state.decided)),
        ended_next=max(state.ended_next, len(state.ended)),
    )
