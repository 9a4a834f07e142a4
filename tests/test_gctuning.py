"""The worker's tick hook collects the young generations every tick, every one once a minute."""

from __future__ import annotations

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
