"""A job state as SQLite holds it: a head row without the two windows, one row per entry.

A job type's idempotency window holds up to a thousand entries and its ended-runs window a
few hundred; every transition adds one and drops the oldest. Written inline, each change
rewrote both windows (a full state is about 150 KB of JSON); as rows, a change writes the
head and the entries that came and went, as the changelog does: `window_changes` finds them
once for both, with the entry JSON both store.

An entry is (kind, number, JSON): kind ``d`` (idempotency, `Decided`) or ``e`` (ended runs,
`EndedRun`), numbered by `JobState.decided_next` / `ended_next`. A state whose windows are
not numbered yet (written by a build before the numbers) stays inline until it changes:
the changelog must then write its every entry, which `StateRows` learns from the state as
loaded; the same change writes them to SQLite (`inline`).

Also a run row's parameters as the write-behind's statements bind them (`run_params`, its
time columns spelt by `time_text`): a compiled module, as a transition's run row goes
through here.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
from pydantic import TypeAdapter

from schemas import RunStatus
from worker.core.lifecycle import Decided, EndedRun, JobState, load_state
from worker.core.runs import RunRow
from worker.engine import encoding

Entry = tuple[str, int, bytes]  # (kind "d" or "e", number, entry JSON)

# Each window's kind (as in changelog keys) and entry type, in `JobState` order.
WINDOWS: tuple[tuple[bytes, TypeAdapter[Any]], ...] = (
    (b"d", TypeAdapter(Decided)),
    (b"e", TypeAdapter(EndedRun)),
)


def head(state: JobState) -> bytes:
    """`state`'s JSON without its windows (which keep their numbering fields)."""
    return encoding.head_json(state)


def whole(head_json: bytes, entries: Sequence[tuple[str, bytes]]) -> bytes:
    """The `dump_state`-compatible JSON of a head row and its (kind, entry JSON), oldest
    first within each kind; a head with no entries (inline, or empty windows) as it is."""
    if not entries:
        return head_json
    decided = b",".join(e for kind, e in entries if kind == "d")
    ended = b",".join(e for kind, e in entries if kind == "e")
    # The head has no window keys (`head`), so they are added, never repeated.
    return head_json[:-1] + b',"decided":[' + decided + b'],"ended":[' + ended + b"]}"


def inline(state: JobState) -> bool:
    """Whether `state`'s windows are not numbered, so it is stored whole (module docstring)."""
    return state.decided_next < len(state.decided) or state.ended_next < len(state.ended)


Change = tuple[bytes, int, bytes | None]  # (window kind, entry number, entry JSON or None)


def window_changes(before: JobState | None, after: JobState) -> list[Change]:
    """The window entries a job type's state took going from `before` to `after`, and a
    None for each that left, oldest first within each window.

    `before` is None when `after`'s windows are not rows yet (a state an earlier version
    wrote): every entry it holds is taken.
    """
    changes: list[Change] = []
    (d, _), (e, _) = WINDOWS
    if before is None:
        _taken(changes, d, after.decided, after.decided_next, 0)
        _taken(changes, e, after.ended, after.ended_next, 0)
        return changes
    # Entries are only added at a window's end and dropped at its start: a window whose end
    # number and length are as they were is unchanged (a decision touches one window).
    if after.decided_next != before.decided_next or len(after.decided) != len(before.decided):
        _gone(changes, d, before.decided, before.decided_next, after.decided, after.decided_next)
        _taken(changes, d, after.decided, after.decided_next, before.decided_next)
    if after.ended_next != before.ended_next or len(after.ended) != len(before.ended):
        _gone(changes, e, before.ended, before.ended_next, after.ended, after.ended_next)
        _taken(changes, e, after.ended, after.ended_next, before.ended_next)
    return changes


def _gone(
    changes: list[Change],
    kind: bytes,
    old: tuple[Any, ...],
    old_end: int,
    entries: tuple[Any, ...],
    end: int,
) -> None:
    """A tombstone for each entry numbered before the window's first one that was held."""
    first = end - len(entries)
    changes.extend((kind, n, None) for n in range(old_end - len(old), min(first, old_end)))


def _taken(
    changes: list[Change],
    kind: bytes,
    entries: tuple[Any, ...],
    end: int,
    old_end: int,
) -> None:
    """Each entry numbered from `old_end` (or the window's first), with its JSON."""
    first = end - len(entries)
    for number in range(max(first, old_end), end):
        changes.append((kind, number, encoding.value_json(entries[number - first])))


def split(state_json: bytes) -> tuple[bytes, list[Entry]]:
    """A whole state's JSON as SQLite stores it: (head, entries) if its windows are numbered,
    else (the JSON as it is, no entries). Raises ValueError if it does not validate."""
    state = load_state(state_json)
    if inline(state):
        return state_json, []
    entries = window_changes(None, state)
    return head(state), [(kind.decode(), n, e) for kind, n, e in entries if e is not None]


# msgspec spells a UTC time as `isoformat` does, but for `Z` in place of `+00:00`
# (`tests/test_store.py` checks it over generated times), in a seventh of its time.
_ENCODE_TIME: Final = msgspec.json.Encoder().encode


def time_text(at: datetime) -> str:
    """`at.isoformat()`, the text of SQLite's time columns: a UTC time spelled by msgspec."""
    if at.tzinfo is not UTC:
        return at.isoformat()
    return _ENCODE_TIME(at)[1:-2].decode() + "+00:00"


# The sqlite3 module looks up an adapter for every parameter that is not exactly an int, a
# float, a str or a bytearray (None, bytes, a str enum, a bool), raising and clearing an
# AttributeError on the way: 0.4-0.5 µs a parameter, a dozen in a run's lifecycle. So the
# write-behind's statements take exact types: `NULL`, an int, for an empty text column
# (through `NULLIF(?, 0)`: SQLite compares storage classes first, so no text equals the
# integer 0, and None still binds NULL), statuses as plain strings (`status_text`), and
# blobs as bytearrays.
NULL: Final = 0
_STATUS_TEXT: Final[dict[RunStatus, str]] = {status: status.value for status in RunStatus}


def status_text(status: RunStatus) -> str:
    """`status.value` as a plain str, for binding (typed: the enum's `value` is not)."""
    return _STATUS_TEXT[status]


def dumps(value: object) -> str | None:
    # msgspec's encoder (`encoding.value_json`). Keys keep the order they arrived in, which
    # the live worker, a restore and a replay all preserve.
    return None if value is None else encoding.value_json(value).decode()


def run_params(r: RunRow, *, retained: bool) -> list[Any]:
    """`sqlfile.UPSERT_RUN`'s parameters of a row."""
    return [
        r.run_id,
        r.job_type,
        NULL if r.client_id is None else r.client_id,
        NULL if r.request_id is None else r.request_id,
        status_text(r.status),
        r.partition,
        time_text(r.started_at),
        NULL if r.ended_at is None else time_text(r.ended_at),
        dumps(r.initial_data),
        NULL if r.metrics is None else dumps(r.metrics),
        NULL if r.reason is None else r.reason,
        int(retained),
    ]
