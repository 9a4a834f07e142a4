"""What an embedder passes into the engine instead of the engine deciding it.

`jobctl run` passes a watchdog for a stop that never ends (`worker.watchdog`), and collects
garbage on a timer of its own beside the worker (`worker.gctuning.collecting`); tests pass
fault points (`worker.devtools.faults`). A worker built with the default `Hooks()` does
none of these.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from worker.engine.codec import InputRecord

# The named points of a batch, in order: "batch" (a batch begins), "in_transaction" and
# "stop_in_transaction" (its transaction is open, before the commit), "after_commit" (Kafka
# committed, SQLite not yet written); and "stopping" (the worker begins its stop's steps).
POINTS = ("batch", "in_transaction", "stop_in_transaction", "after_commit", "stopping")


@dataclass(frozen=True)
class Hooks:
    """Callbacks the engine makes; each may be None."""

    at_point: Callable[[str], None] | None = None  # at each of `POINTS`
    before_record: Callable[[InputRecord], None] | None = None  # raise to fail the record
    # Once, when the worker begins to stop, with the seconds its stop may take
    # (`Settings.shutdown_timeout_s`): `jobctl run` arms its `worker.watchdog` here.
    on_stop: Callable[[float], None] | None = None

    def point(self, name: str) -> None:
        """Call `at_point` with `name`, if set."""
        if self.at_point is not None:
            self.at_point(name)
