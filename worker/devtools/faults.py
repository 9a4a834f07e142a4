"""Fault injection for the crash tests: hooks for the engine, read from the environment.

`python -m worker.devtools.faults run [options]` is `jobctl run` with these faults added;
`jobctl run` itself never reads the variables, nor does a worker embedded elsewhere.

- `JOBS_FAULT_POINT`: `in_transaction` or `after_commit` (exit the process hard there),
  `stop_in_transaction` (freeze it with SIGSTOP inside an open transaction), or, once the
  worker begins to stop, `fail_stopping` (its first step raises) or `hang_stopping` (its
  event loop blocks for good, as in a call that never returns);
- `JOBS_FAULT_AFTER_BATCHES`: at the first such point from this batch number on (default 0);
- `JOBS_FAULT_RECORD`: an input record whose value contains this text fails to process,
  every time it is tried.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Mapping

import structlog

from worker.engine.codec import InputRecord
from worker.engine.hooks import POINTS, Hooks

log = structlog.get_logger("worker")


class InjectedFault(RuntimeError):
    """A record marked to fail (`JOBS_FAULT_RECORD`), or a step of stopping (`fail_stopping`)."""


# Faults at the "stopping" point rather than points of their own.
STOPPING_FAULTS = ("fail_stopping", "hang_stopping")


class Faults:
    """Exit, freeze or fail where the environment says, once."""

    def __init__(self, point: str = "", after_batches: int = 0, record: str = "") -> None:
        if point and point not in POINTS + STOPPING_FAULTS:
            raise ValueError(
                f"JOBS_FAULT_POINT must be one of {', '.join(POINTS + STOPPING_FAULTS)}"
            )
        self.point = point
        self.after_batches = after_batches
        self.record = record.encode()
        self.batches = 0
        self.done = False

    def at_point(self, name: str) -> None:
        """Count batches; exit hard (or freeze) at the configured point."""
        if name == "batch":
            self.batches += 1
        if name == "stopping" and self.point in STOPPING_FAULTS:
            self._at_stopping()
            return
        if name != self.point or self.batches < self.after_batches or self.done:
            return
        self.done = True
        if name == "stop_in_transaction":
            log.warning("injected fault: freezing inside an open transaction", point=name)
            os.kill(os.getpid(), signal.SIGSTOP)
            return
        log.warning("injected fault: exiting hard", point=name)
        os._exit(70)

    def _at_stopping(self) -> None:
        if self.point == "fail_stopping":
            log.warning("injected fault: a step of stopping fails", point=self.point)
            raise InjectedFault("injected fault while stopping")
        log.warning("injected fault: the event loop blocks for good", point=self.point)
        threading.Event().wait()  # never set: a call that never returns

    def before_record(self, record: InputRecord) -> None:
        """Fail on a marked record."""
        if record.value is not None and self.record in record.value:
            raise InjectedFault(f"injected fault at {record.topic}:{record.offset}")

    def hooks(self, base: Hooks | None = None) -> Hooks:
        """`base` with these faults added."""
        base = base or Hooks()
        return Hooks(
            at_point=self.at_point if self.point else None,
            before_record=self.before_record if self.record else None,
            on_stop=base.on_stop,
        )


def from_environment(environ: Mapping[str, str] = os.environ) -> Faults | None:
    """The faults the environment asks for, if any."""
    point = environ.get("JOBS_FAULT_POINT", "")
    record = environ.get("JOBS_FAULT_RECORD", "")
    if not point and not record:
        return None
    after = int(environ.get("JOBS_FAULT_AFTER_BATCHES", "0"))
    return Faults(point, after, record)


def main(argv: list[str] | None = None) -> None:
    """`jobctl` with the faults of the environment added to `run`'s hooks."""
    from worker import cli

    faults = from_environment()
    if faults is not None:
        cli.RUN_HOOKS = faults.hooks
    cli.app(args=argv, prog_name="faults")


if __name__ == "__main__":
    main()
