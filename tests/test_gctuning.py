"""The worker collects the young generations on a timer of its own (rarely while they free
nothing, often as soon as one does), every generation once a minute; automatic collections
are its backstop."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator
from typing import Any

import pytest

from worker import gctuning


@pytest.fixture
def generations() -> Iterator[list[int]]:
    """The generation of each collection that starts while the test runs."""
    seen: list[int] = []

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            seen.append(info["generation"])

    gc.callbacks.append(note)
    yield seen
    gc.callbacks.remove(note)


def test_a_full_collection_at_first_then_young_ones_until_a_minute_has_passed(
    generations: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    now = [1_000.0]
    monkeypatch.setattr(gctuning.time, "monotonic", lambda: now[0])
    collector = gctuning.Collector()
    for _ in range(3):
        collector()
        now[0] += 1
    now[0] += gctuning.FULL_EVERY_S
    collector()
    collections = [g for g in generations if g in (1, 2)]
    assert collections[:3] == [2, 1, 1]
    assert collections[-1] == 2


def test_young_collections_come_rarely_while_they_free_nothing_and_often_once_one_does() -> None:
    """A backlog keeps objects alive that every collection walks, and the worker's work makes
    no cyclic garbage: after a collection that frees nothing the next waits the quiet
    period, and one that frees a cycle brings the short one back at once."""
    collector = gctuning.Collector(every_s=0.5, quiet_every_s=4.0)
    gc.collect()  # nothing left for the collector's first (full) collection to find
    assert [collector() for _ in range(3)] == [4.0, 4.0, 4.0]
    cycle: list[object] = []
    cycle.append(cycle)
    del cycle
    assert collector() == 0.5
    assert collector() == 4.0


async def test_the_worker_collects_on_a_timer_of_its_own(generations: list[int]) -> None:
    """`jobctl run`'s task collects the young generations every `every_s` or
    `quiet_every_s`, whatever the poll loop is doing (here the test only awaits, as a loop
    held by a restore would)."""
    collected = asyncio.Event()

    def note(phase: str, info: dict[str, Any]) -> None:
        if phase == "stop" and sum(1 for g in generations if g >= 1) >= 3:
            collected.set()

    gc.callbacks.append(note)
    task = asyncio.create_task(gctuning.collecting(every_s=0.01, quiet_every_s=0.02))
    try:
        await asyncio.wait_for(collected.wait(), timeout=30)
    finally:
        task.cancel()
        gc.callbacks.remove(note)
    # The first is a full collection, then young ones (a full one again after a minute).
    assert [g for g in generations if g >= 1][:3] == [2, 1, 1]


def test_the_worker_leaves_automatic_collections_as_a_backstop(
    generations: list[int],
) -> None:
    """With the worker's thresholds, a batch's worth of live objects (a backlog's second
    leaves a few hundred thousand) sets off no collection; replay's thresholds collect."""
    previous = gc.get_threshold()
    try:
        gc.set_threshold(*gctuning.WORKER_THRESHOLDS)
        kept = [[i] for i in range(300_000)]
        assert generations == []
        with gctuning.tuned():
            more = [[i] for i in range(300_000)]
        assert generations != []
        assert len(kept) == len(more)
    finally:
        gc.set_threshold(*previous)
