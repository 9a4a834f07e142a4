"""An executor in a child process, for tests that stop, kill and rebalance real executors.

    python -m tests.executor_process --journal J --job sync [--job etl] [--group G] ...

Each job sleeps `initial_data["seconds"]` (default 0) and returns `{"pid": ...}`; with
`initial_data["ignore_cancel"]` it swallows cancellation. Every step is appended to the
journal as one JSON line (`ready`, `start`, `finish`, `cancelled`, with run ID and pid), so a
test counts executions across processes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from worker.client import Executor, JobClient, RunContext
from worker.logs import configure
from worker.settings import Settings


def _note(journal: Path, **fields: Any) -> None:
    with journal.open("a") as out:
        out.write(json.dumps({**fields, "pid": os.getpid()}) + "\n")


async def _main(args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    journal = Path(args.journal)
    async with JobClient(Settings()) as jobs:
        executor = Executor(
            jobs,
            args.group,
            grace=args.grace,
            cancel_grace=args.cancel_grace,
            heartbeat=args.heartbeat,
        )

        async def work(run: RunContext) -> dict[str, Any]:
            _note(journal, event="start", run_id=run.run_id)
            seconds = float(run.initial_data.get("seconds", 0))
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                try:
                    await asyncio.sleep(deadline - time.monotonic())
                except asyncio.CancelledError:
                    _note(journal, event="cancelled", run_id=run.run_id)
                    if not run.initial_data.get("ignore_cancel"):
                        raise
            _note(journal, event="finish", run_id=run.run_id)
            return {"pid": os.getpid()}

        for job_type in args.job:
            executor.job(job_type)(work)
        running = asyncio.create_task(executor.run(stop))
        await executor.ready.wait()
        _note(journal, event="ready", group=executor.group)
        await running


class ExecutorProcess:
    """`tests.executor_process` as a child process, with its journal and log."""

    def __init__(self, settings: Settings, directory: Path, name: str, *jobs: str) -> None:
        self.name = name
        self.journal = directory / "journal.jsonl"  # shared by every process of a test
        self.log_path = directory / f"{name}.log"
        self.env = {
            **os.environ,
            "JOBS_BOOTSTRAP_SERVERS": settings.bootstrap_servers,
            "JOBS_TOPIC_PREFIX": settings.topic_prefix,
            "JOBS_LOG_FORMAT": "json",
        }
        self.args = [arg for job in jobs for arg in ("--job", job)]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *options: str) -> ExecutorProcess:
        """Start the process with extra command-line `options`."""
        command = [sys.executable, "-m", "tests.executor_process", "--journal", str(self.journal)]
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [*command, *self.args, *options],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        return self

    @property
    def pid(self) -> int:
        """The process ID."""
        assert self.proc is not None
        return self.proc.pid

    def entries(self, **match: Any) -> list[dict[str, Any]]:
        """Journal lines matching `match` (every process's, unless `pid` is given)."""
        if not self.journal.exists():
            return []
        lines = [json.loads(line) for line in self.journal.read_text().splitlines() if line]
        return [e for e in lines if all(e.get(k) == v for k, v in match.items())]

    async def wait_for(self, what: str, condition: Callable[[], bool], timeout: float = 60) -> None:
        """Poll the journal (another process writes it) until `condition` holds."""
        deadline = time.monotonic() + timeout
        while not condition():
            if self.proc is not None and self.proc.poll() is not None and not condition():
                raise AssertionError(f"{self.name} exited before {what}:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"{self.name}: no {what} within {timeout}s:\n{self.log_tail()}"
                )
            await asyncio.sleep(0.05)

    async def ready(self, timeout: float = 60) -> None:
        """Wait until this process has joined its group and holds partitions."""
        await self.wait_for(
            "ready", lambda: bool(self.entries(event="ready", pid=self.pid)), timeout
        )

    def log_tail(self, lines: int = 40) -> str:
        """The end of the process's log."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def kill(self) -> None:
        """SIGKILL and reap."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()

    async def terminate(self, timeout: float = 60) -> int:
        """SIGTERM; the exit code."""
        assert self.proc is not None
        self.proc.terminate()
        return await asyncio.wait_for(asyncio.to_thread(self.proc.wait), timeout)

    def ensure_dead(self) -> None:
        """Kill if still running (test clean-up)."""
        if self.proc is not None and self.proc.poll() is None:
            self.kill()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--journal", required=True)
    parser.add_argument("--job", action="append", required=True)
    parser.add_argument("--group")
    parser.add_argument("--grace", type=float, default=20.0)
    parser.add_argument("--cancel-grace", type=float, default=10.0)
    parser.add_argument("--heartbeat", type=float)
    configure(fmt="json")
    asyncio.run(_main(parser.parse_args()))
