"""The broker-less measure of the worker's own work per transition runs the real steps."""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from pathlib import Path

from worker.devtools.hotpath import measure


async def test_every_lifecycle_is_decided_published_and_stored(tmp_path: Path) -> None:
    split = await measure(250, 40, tmp_path)
    assert split.transitions == 500  # a start and a completion each
    assert min(split.cpu_us, split.deciding_us, split.records_us, split.sqlite_us) > 0
    with sqlite3.connect(tmp_path / "hotpath.db") as db:
        statuses = dict(db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
        offsets = dict(db.execute("SELECT topic, next_offset FROM applied_offsets"))
        payloads = {row[0] for row in db.execute("SELECT initial_data FROM runs")}
    assert statuses == {"COMPLETED": 250}
    assert payloads == {'{"bench":true}'}  # the start requests are the bench's
    assert offsets == {"jobs.requests": 250, "jobs.results": 250}


async def test_busy_job_types_fill_their_windows_and_every_run_completes(
    tmp_path: Path,
) -> None:
    """With --job-types, lifecycles take the job types in turn, each start and its result in
    one batch: every run completes, and each job type's windows fill up as a busy one's do."""
    split = await measure(1_500, 500, tmp_path, job_types=1)
    assert split.transitions == 3_000
    with sqlite3.connect(tmp_path / "hotpath.db") as db:
        statuses = dict(db.execute("SELECT status, COUNT(*) FROM runs GROUP BY status"))
        entries = dict(db.execute("SELECT kind, COUNT(*) FROM window_entries GROUP BY kind"))
    assert statuses == {"COMPLETED": 1_500}
    assert entries == {"d": 1_000, "e": 256}  # the default windows, full


def test_the_command_prints_its_line_and_refuses_what_it_cannot_measure() -> None:
    command = [sys.executable, "-m", "worker.devtools.hotpath"]
    done = subprocess.run([*command, "--lifecycles", "30", "--batch", "7"], capture_output=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.decode().startswith("60 transitions: ")
    assert "µs CPU a transition" in done.stdout.decode()
    refused = subprocess.run([*command, "--batch", "0"], capture_output=True)
    assert refused.returncode == 2
    assert b"--lifecycles and --batch must be positive" in refused.stderr
    refused = subprocess.run([*command, "--job-types", "0"], capture_output=True)
    assert refused.returncode == 2
    assert b"--job-types must be positive" in refused.stderr
