"""A job state as SQLite holds it: a head row without the two windows, one row per entry.

A job type's idempotency window holds up to a thousand entries and its ended-runs window a
few hundred; every transition adds one and drops the oldest. Written inline, each change
rewrote both windows (a full state is about 150 KB of JSON); as rows, a change writes the
head and the entries that came and went, as the changelog does (`changelog.window_changes`,
whose entry JSON both share).

An entry is (kind, number, JSON): kind ``d`` (idempotency, `Decided`) or ``e`` (ended runs,
`EndedRun`), numbered by `JobState.decided_next` / `ended_next`. A state whose windows are
not numbered yet (written by a build before the numbers) stays inline until it changes:
the changelog must then write its every entry, which `StateRows` learns from the state as
loaded; the same change writes them to SQLite (`inline`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pydantic import TypeAdapter

from worker.core.lifecycle import Decided, EndedRun, JobState, load_state

Entry = tuple[str, int, bytes]  # (kind "d" or "e", number, entry JSON)

_STATE: TypeAdapter[JobState] = TypeAdapter(JobState)
_ADAPTERS: dict[str, TypeAdapter[Any]] = {"d": TypeAdapter(Decided), "e": TypeAdapter(EndedRun)}
_WINDOWS = {"decided": True, "ended": True}


def head(state: JobState) -> bytes:
    """`state`'s JSON without its windows (which keep their numbering fields)."""
    return _STATE.dump_json(state, exclude=_WINDOWS)


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


def entries_of(state: JobState) -> list[Entry]:
    """Every entry of `state`'s windows, numbered (`state` must be numbered)."""
    found: list[Entry] = []
    for kind, window, end in (
        ("d", state.decided, state.decided_next),
        ("e", state.ended, state.ended_next),
    ):
        adapter = _ADAPTERS[kind]
        first = end - len(window)
        found.extend((kind, first + i, adapter.dump_json(e)) for i, e in enumerate(window))
    return found


def split(state_json: bytes) -> tuple[bytes, list[Entry]]:
    """A whole state's JSON as SQLite stores it: (head, entries) if its windows are numbered,
    else (the JSON as it is, no entries). Raises ValueError if it does not validate."""
    state = load_state(state_json)
    if inline(state):
        return state_json, []
    return head(state), entries_of(state)
