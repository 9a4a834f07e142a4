"""The local broker's helpers that need no broker."""

from __future__ import annotations

import uuid

import pytest

from worker.devtools import localkafka


def test_local_cluster_ids_never_start_with_a_dash(monkeypatch: pytest.MonkeyPatch) -> None:
    """`kafka-storage format -t -xyz` would read the ID as an option: such IDs are redrawn."""
    drawn = iter([uuid.UUID(bytes=b"\xf8" + b"\x00" * 15), uuid.UUID(bytes=b"\x00" * 16)])
    monkeypatch.setattr(localkafka.uuid, "uuid4", lambda: next(drawn))
    assert localkafka._cluster_id() == "AAAAAAAAAAAAAAAAAAAAAA"
