"""Damaged local state, on the real broker: a worker's SQLite file truncated, overwritten
with random bytes, a job state's JSON damaged inside a sound page, missing, from a newer
schema version or locked by another process, and a SQLite write failing as on a full disk.

The tests on the broker write runs with a worker, stop it, damage its file and start
`jobctl run` on it again, then check what a user would notice: the same running runs are
served (a second start is refused naming the run started before the damage, and a result
completes another), the bad file was moved aside and one log line names it, or the start is
refused with one clear line and a non-zero exit code, the file left as it was. Two more,
without the broker, check how a damaged file moves with its WAL and that readers refuse one.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import random
import shutil
import sqlite3
import stat
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaProducer

from schemas import EventType, StatusEvent
from tests.chaos import WorkerProcess, oracle, read_topic
from tests.conftest import RunningWorker
from worker.client.watch import StatusTail
from worker.engine.codec import partition_for
from worker.engine.loop import Worker
from worker.engine.store import SCHEMA_VERSION, RunWrites, Store, StoreError
from worker.settings import Settings

pytestmark = pytest.mark.kafka

START_S = 90.0  # a `jobctl run` process starting, joining the group and restoring


def job_types(prefix: str) -> tuple[str, str]:
    """A job type on partition 0 and one on partition 1 (of two)."""
    found: dict[int, str] = {}
    for i in range(100):
        name = f"{prefix}-{i}"
        found.setdefault(partition_for(name.encode(), 2), name)
    return found[0], found[1]


async def start(producer: AIOKafkaProducer, s: Settings, job_type: str, **fields: Any) -> str:
    """Send a start request; its request ID."""
    request_id = str(uuid.uuid4())
    body = {"job_type": job_type, "request_id": request_id, **fields}
    await producer.send_and_wait(
        s.topics.requests, json.dumps(body).encode(), key=job_type.encode()
    )
    return request_id


async def complete(producer: AIOKafkaProducer, s: Settings, job_type: str, run_id: str) -> str:
    """Send an executor's COMPLETED result; its request ID."""
    request_id = str(uuid.uuid4())
    body = {"job_type": job_type, "run_id": run_id, "status": "COMPLETED", "request_id": request_id}
    await producer.send_and_wait(s.topics.results, json.dumps(body).encode(), key=job_type.encode())
    return request_id


async def first_runs(
    s: Settings, producer: AIOKafkaProducer, tail: StatusTail
) -> dict[str, StatusEvent]:
    """With a worker on `s.db_path`, start a run on each partition; stop it (exit clean)."""
    running = await RunningWorker(s).start()
    try:
        started = {}
        for job_type in job_types("before"):
            event = await tail.wait_event(request_id=await start(producer, s, job_type))
            assert event.type is EventType.STARTED
            started[job_type] = event
        return started
    finally:
        await running.stop()


async def assert_served(
    s: Settings, producer: AIOKafkaProducer, tail: StatusTail, runs: dict[str, StatusEvent]
) -> None:
    """The runs started before are still running: a second start of the first job type is
    refused naming its run, and a result completes the second's."""
    (held, held_run), (done, done_run) = runs.items()
    refused = await tail.wait_event(START_S, request_id=await start(producer, s, held))
    assert (refused.type, refused.run_id) == (EventType.REFUSED, held_run.run_id)
    assert done_run.run_id is not None
    ended = await tail.wait_event(
        START_S, request_id=await complete(producer, s, done, done_run.run_id)
    )
    assert (ended.type, ended.run_id) == (EventType.COMPLETED, done_run.run_id)


async def assert_converged(s: Settings, process: WorkerProcess, tmp: Path) -> None:
    """Stopped with SIGTERM (exit 0), each input was decided once and the SQLite file equals
    the state rebuilt from the status topic."""
    assert await process.terminate() == 0, process.log_text()[-4000:]
    verdict = await oracle(s, [process.db_path], tmp)
    assert verdict.problems == [], verdict.problems


def log_lines(process: WorkerProcess) -> tuple[list[dict[str, Any]], list[str]]:
    """The process's JSON log lines, and its other lines (the CLI's own)."""
    records, other = [], []
    for line in process.log_text().splitlines():
        try:
            item = json.loads(line)
        except json.JSONDecodeError:
            other.append(line)
            continue
        records.append(item)
    return records, other


async def refusal(process: WorkerProcess, *, traceback: bool = False) -> str:
    """Wait for `process` to exit; assert it failed with a last log line saying why (and,
    unless `traceback`, logged none), its JSON lines all; that line, as `error: <why>`."""
    code = await process.wait_exit(START_S)
    records, other = log_lines(process)
    assert code == 1, process.log_text()[-4000:]
    assert other == [], other
    last = records[-1]
    assert last["level"] == "error", last
    assert "exception" not in last, last
    if not traceback:
        assert not any("exception" in r for r in records), records
    return f"error: {last['event']}"


def side_files(db: Path) -> list[Path]:
    """The -wal, -shm and -journal files of `db` present."""
    return [p for s in ("-wal", "-shm", "-journal") if (p := Path(f"{db}{s}")).exists()]


def crashed_in_wal_mode(db: Path) -> Path:
    """`db` as a process killed while it wrote leaves it: a checkpointed file and a WAL
    holding the last transactions (copied while the writer's connection is open)."""
    source = db.with_name("source.db")
    with contextlib.closing(sqlite3.connect(source)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("CREATE TABLE early (a)")
        conn.execute("CREATE TABLE late (a)")
        conn.executemany("INSERT INTO early VALUES (?)", [("x" * 500,)] * 2000)
        conn.commit()
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.execute("PRAGMA wal_autocheckpoint = 0")
        conn.executemany("INSERT INTO late VALUES (?)", [("y" * 500,)] * 20)
        conn.commit()
        for suffix in ("", "-wal", "-shm"):
            shutil.copyfile(f"{source}{suffix}", f"{db}{suffix}")
    return db


def damaged_copies(db: Path) -> list[Path]:
    """Files `db` was moved aside to (not their -wal or -shm)."""
    found = db.parent.glob(f"{db.name}.damaged-*")
    return sorted(p for p in found if not p.name.endswith(("-wal", "-shm", "-journal")))


@pytest.fixture
def spawn(topics: Settings, tmp_path: Path) -> Iterator[Callable[[], WorkerProcess]]:
    """`jobctl run` processes on the SQLite file of `topics` (killed after the test)."""
    made: list[WorkerProcess] = []

    def make() -> WorkerProcess:
        process = WorkerProcess(topics, "worker", tmp_path)
        assert process.db_path == topics.db_path
        made.append(process)
        return process

    yield make
    for process in made:
        process.ensure_dead()


def _truncate(path: Path) -> None:
    with path.open("r+b") as f:
        f.truncate(path.stat().st_size // 2)


def _scramble(path: Path) -> None:
    path.write_bytes(random.Random(1128).randbytes(path.stat().st_size))


@pytest.mark.parametrize("damage", [_truncate, _scramble], ids=["truncated", "random-bytes"])
async def test_a_damaged_file_is_moved_aside_and_rebuilt_from_the_changelog(
    topics: Settings,
    producer: AIOKafkaProducer,
    tail: StatusTail,
    spawn: Callable[[], WorkerProcess],
    tmp_path: Path,
    damage: Callable[[Path], None],
) -> None:
    """A corrupt file is moved aside (one warning names both paths), the worker starts on an
    empty one restored from the changelog, and serves the runs started before."""
    db = topics.db_path
    runs = await first_runs(topics, producer, tail)
    assert side_files(db) == []  # a clean stop leaves the whole file
    damage(db)
    bad = db.read_bytes()
    process = spawn()
    process.start()
    await assert_served(topics, producer, tail, runs)

    [moved] = damaged_copies(db)
    assert moved.read_bytes() == bad
    records, _ = log_lines(process)
    warnings = [r for r in records if "moved it aside" in str(r.get("event"))]
    assert len(warnings) == 1, warnings
    assert (warnings[0]["path"], warnings[0]["moved_to"]) == (str(db), str(moved))
    assert warnings[0]["level"] == "warning"
    await assert_converged(topics, process, tmp_path)


async def test_a_damaged_job_state_restores_its_partition_from_the_changelog(
    topics: Settings,
    producer: AIOKafkaProducer,
    tail: StatusTail,
    spawn: Callable[[], WorkerProcess],
    tmp_path: Path,
) -> None:
    """One damaged byte pair inside a stored job state's JSON, in a file whose pages are
    sound (`PRAGMA quick_check` passes): the worker does not stop at every start; the take
    restores that partition from the changelog, with one warning naming the file, the job
    type and the partition, and serves the runs started before, each input decided once."""
    db = topics.db_path
    runs = await first_runs(topics, producer, tail)
    held = next(iter(runs))
    with contextlib.closing(sqlite3.connect(db)) as conn:
        [(state, partition)] = conn.execute(
            "SELECT state, partition FROM job_states WHERE job_type = ?", (held,)
        ).fetchall()
        assert b'"queue":[]' in state
        damaged = bytes(state).replace(b'"queue":[]', b'"queue":\x01\xff')
        conn.execute("UPDATE job_states SET state = ? WHERE job_type = ?", (damaged, held))
        conn.commit()
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    process = spawn()
    process.start()
    await assert_served(topics, producer, tail, runs)

    records, _ = log_lines(process)
    warnings = [r for r in records if "job state in the SQLite file is damaged" in r["event"]]
    assert len(warnings) == 1, warnings
    assert warnings[0]["level"] == "warning"
    assert (warnings[0]["path"], warnings[0]["job_type"]) == (str(db), held)
    assert warnings[0]["partition"] == partition
    assert damaged_copies(db) == []  # the other partition's rows were sound: nothing moved
    await assert_converged(topics, process, tmp_path)


async def test_a_damaged_window_entry_restores_its_partition_at_the_batch(
    topics: Settings,
    producer: AIOKafkaProducer,
    tail: StatusTail,
    spawn: Callable[[], WorkerProcess],
    tmp_path: Path,
) -> None:
    """A window entry of an idle job type is damaged (valid UTF-8, not the entry's JSON), in
    a file whose pages are sound: the take does not read idle job types, so the first batch
    naming it finds it. That batch's records are not at fault: the partition is restored
    from the changelog, with one warning naming the job type, and the record is decided as
    before the damage (a resent start answered `duplicate`, not dead-lettered)."""
    db = topics.db_path
    idle = f"{topics.topic_prefix}-idle"
    running = await RunningWorker(topics).start()
    try:
        request_id = await start(producer, topics, idle)
        started = await tail.wait_event(START_S, request_id=request_id)
        assert started.type is EventType.STARTED
        assert started.run_id is not None
        done = await tail.wait_event(
            START_S, request_id=await complete(producer, topics, idle, started.run_id)
        )
        assert done.type is EventType.COMPLETED
    finally:
        await running.stop()
    runs = await first_runs(topics, producer, tail)
    with contextlib.closing(sqlite3.connect(db)) as conn:
        entries = conn.execute(
            "SELECT kind, number FROM window_entries WHERE job_type = ?", (idle,)
        ).fetchall()
        assert ("d", 0) in entries, entries
        conn.execute(
            "UPDATE window_entries SET entry = ? WHERE job_type = ? AND kind = 'd'",
            (b'{"request_id": 1}', idle),
        )
        conn.commit()
        assert conn.execute("PRAGMA quick_check").fetchall() == [("ok",)]
    process = spawn()
    process.start()
    await start_again(producer, topics, idle, request_id)
    again = await tail.wait_for(
        lambda item: (
            isinstance(item, StatusEvent)
            and item.request_id == request_id
            and item.event_id != started.event_id
        ),
        START_S,
    )
    assert isinstance(again, StatusEvent)
    assert (again.type, again.run_id) == (EventType.DUPLICATE, started.run_id)
    await assert_served(topics, producer, tail, runs)

    records, _ = log_lines(process)
    warnings = [r for r in records if "job state in the SQLite file is damaged" in r["event"]]
    assert [(w["level"], w["job_type"]) for w in warnings] == [("warning", idle)], warnings
    assert warnings[0]["partition"] == partition_for(idle.encode(), 2)
    assert not [r for r in records if r.get("code") == "unprocessable"]
    await assert_converged(topics, process, tmp_path)


async def start_again(
    producer: AIOKafkaProducer, s: Settings, job_type: str, request_id: str
) -> str:
    """Send a start request again, with the request ID it had; that ID."""
    body = {"job_type": job_type, "request_id": request_id}
    await producer.send_and_wait(
        s.topics.requests, json.dumps(body).encode(), key=job_type.encode()
    )
    return request_id


async def test_a_reader_refuses_a_damaged_file_and_moves_nothing(tmp_path: Path) -> None:
    """A reader's open (`jobctl runs`, replay) refuses a file that is not a database, with one
    line, and leaves it where it is. (Bytes that are no text, as a worker's damaged file's
    are: a text file is refused as one, `tests/test_file_refusals.py`.)"""
    db = tmp_path / "jobs.db"
    db.write_bytes(b"not a database\x00" * 512)
    with pytest.raises(StoreError) as refused:
        await Store.open(db)
    assert str(refused.value) == (
        f"{db} is damaged (file is not a database); a worker started on it moves it aside "
        "and restores its partitions from the changelog"
    )
    assert damaged_copies(db) == []
    assert db.read_bytes() == b"not a database\x00" * 512


async def test_a_damaged_file_moves_aside_with_its_wal(tmp_path: Path) -> None:
    """A truncated file left by a crash with its WAL moves aside with its -wal and -shm,
    under one new name (so SQLite still pairs them), unchanged; the worker's open goes on
    with an empty file of the current version."""
    db = crashed_in_wal_mode(tmp_path / "jobs.db")
    _truncate(db)
    before = {p.name[len(db.name) :]: p.read_bytes() for p in [db, *side_files(db)]}
    assert set(before) == {"", "-wal", "-shm"}
    store = await Store.open(db, exclusive=True)
    try:
        assert await store.count_runs() == 0
    finally:
        await store.close()
    [moved] = damaged_copies(db)
    after = {p.name[len(moved.name) :]: p.read_bytes() for p in [moved, *side_files(moved)]}
    assert after.keys() == before.keys()
    assert (after[""], after["-wal"]) == (before[""], before["-wal"])
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


async def test_a_missing_file_is_created_and_rebuilt_from_the_changelog(
    topics: Settings,
    producer: AIOKafkaProducer,
    tail: StatusTail,
    spawn: Callable[[], WorkerProcess],
    tmp_path: Path,
) -> None:
    """With its file deleted, the worker starts on a new one and serves the same runs."""
    db = topics.db_path
    runs = await first_runs(topics, producer, tail)
    db.unlink()
    assert side_files(db) == []
    process = spawn()
    process.start()
    await assert_served(topics, producer, tail, runs)
    assert damaged_copies(db) == []
    with contextlib.closing(sqlite3.connect(db)) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)
    await assert_converged(topics, process, tmp_path)


async def test_a_file_from_a_newer_schema_version_is_refused_untouched(
    topics: Settings,
    producer: AIOKafkaProducer,
    tail: StatusTail,
    spawn: Callable[[], WorkerProcess],
) -> None:
    """`jobctl run` exits 1 with one line giving the file's version and the code's; the file
    is neither changed nor moved (an older build started by mistake must not discard it)."""
    db = topics.db_path
    await first_runs(topics, producer, tail)
    future = SCHEMA_VERSION + 41
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute(f"PRAGMA user_version = {future}")
        conn.commit()
    before = db.read_bytes()
    process = spawn()
    process.start()
    line = await refusal(process)
    assert str(db) in line
    assert f"schema version {future}" in line
    assert f"versions up to {SCHEMA_VERSION}" in line
    assert db.read_bytes() == before
    assert damaged_copies(db) == []


async def test_another_programs_sqlite_file_is_refused_untouched(
    topics: Settings, spawn: Callable[[], WorkerProcess]
) -> None:
    """`jobctl run --db` on another program's SQLite file (tables, none of the worker's)
    exits 1 with one line naming the file; the file is neither changed nor moved aside."""
    db = topics.db_path
    with contextlib.closing(sqlite3.connect(db)) as conn, conn:
        conn.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
        conn.execute("INSERT INTO invoices (total) VALUES (12.5)")
    before = db.read_bytes()
    process = spawn()
    process.start()
    line = await refusal(process)
    assert f"{db} is not a worker's SQLite file" in line
    assert "'invoices'" in line
    assert db.read_bytes() == before
    assert damaged_copies(db) == []


@pytest.mark.parametrize(
    "text",
    [
        '[job_types.report]\ntimeout = "10m"\n',
        "# Notes\n\nnon-ASCII at the edges: " + "é" * 40_000,  # cut where the read ends
    ],
    ids=["toml", "long-utf8"],
)
async def test_a_text_file_given_as_the_database_is_refused_untouched(
    tmp_path: Path, text: str
) -> None:
    """A text file given as the worker's file by mistake (`--db jobs.toml`) is refused with
    one line and left where it is; only binary damage is moved aside."""
    db = tmp_path / "jobs.toml"
    db.write_text(text)
    with pytest.raises(StoreError) as refused:
        await Store.open(db, exclusive=True)
    assert str(refused.value).startswith(f"{db} is a text file, not a worker's SQLite file")
    assert db.read_text() == text
    assert damaged_copies(db) == []


async def test_a_new_file_and_its_companions_are_readable_by_their_user_only(
    tmp_path: Path,
) -> None:
    """Runs carry payloads: the SQLite file a worker makes, its WAL and shared-memory files
    and its lock are mode 0600 whatever the umask lets through; a file that exists keeps
    the mode its owner gave it."""
    db = tmp_path / "jobs.db"
    old = os.umask(0o022)
    try:
        store = await Store.open(db, exclusive=True)
        try:
            await store.write_runs(RunWrites())  # a write transaction: the WAL is made
            made = {p.name: stat.S_IMODE(os.stat(p).st_mode) for p in os.scandir(tmp_path)}
        finally:
            await store.close()
        given = tmp_path / "given.db"
        given.touch(mode=0o640)
        given.chmod(0o640)
        await (await Store.open(given, exclusive=True)).close()
        os.mkdir(tmp_path / "linked")
        os.symlink(tmp_path / "linked" / "target.db", tmp_path / "linked" / "link.db")
        await (await Store.open(tmp_path / "linked" / "link.db")).close()  # to a missing file
        target = stat.S_IMODE(os.stat(tmp_path / "linked" / "target.db").st_mode)
    finally:
        os.umask(old)
    assert made == dict.fromkeys(("jobs.db", "jobs.db-wal", "jobs.db-shm", "jobs.db.lock"), 0o600)
    assert target == 0o600
    assert stat.S_IMODE(given.stat().st_mode) == 0o640


async def test_a_file_that_cannot_be_made_is_one_line(tmp_path: Path) -> None:
    """A SQLite file in a directory no file can be made in (here /sys) is refused with one
    line naming it, for the worker and for replay and the other readers alike."""
    for exclusive in (False, True):
        db = Path("/sys") / f"jobs-{exclusive}.db"
        with pytest.raises(StoreError) as refused:
            await Store.open(db, exclusive=exclusive)
        assert str(db) in str(refused.value)
        assert db.name not in os.listdir("/sys")


async def test_replay_s_lock_that_is_a_symbolic_link_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    """Replay in several processes shares a lock beside its file: one planted as a link to
    another file is refused, naming it, and that file keeps its content."""
    from worker.audit.replay import _in_processes

    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    db = tmp_path / "replayed.db"
    os.symlink(victim, tmp_path / ".replayed.db.replay-lock")
    with pytest.raises(StoreError, match="it is a symbolic link"):
        await _in_processes(Settings(), db, [], lambda applied, total: None)
    assert victim.read_text() == "keep me\n"


async def test_a_lock_file_that_is_a_symbolic_link_is_refused_and_its_target_untouched(
    tmp_path: Path,
) -> None:
    """`<file>.lock` made a link to another file (by anyone who may write the directory)
    is refused in one line; the file it points at keeps its content (the lock's PID used
    to be written over it)."""
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me\n")
    db = tmp_path / "jobs.db"
    os.symlink(victim, f"{db}.lock")
    with pytest.raises(StoreError) as refused:
        await Store.open(db, exclusive=True)
    assert str(refused.value) == (
        f"cannot use the lock file {db}.lock: it is a symbolic link (remove it)"
    )
    assert victim.read_text() == "keep me\n"


async def test_a_file_locked_by_another_process_is_refused(
    topics: Settings,
    producer: AIOKafkaProducer,
    tail: StatusTail,
    spawn: Callable[[], WorkerProcess],
    tmp_path: Path,
) -> None:
    """While another process holds the file's lock, `jobctl run` exits 1 with one line naming
    the file; once it lets go, a worker starts on the file and serves the same runs."""
    db = topics.db_path
    runs = await first_runs(topics, producer, tail)
    lock = os.open(f"{db}.lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        refused = spawn()
        refused.start()
        line = await refusal(refused)
    finally:
        os.close(lock)
    assert f"{db} is in use by another worker" in line
    process = spawn()
    process.start()
    await assert_served(topics, producer, tail, runs)
    await assert_converged(topics, process, tmp_path)


async def test_a_second_worker_on_the_same_file_is_refused(
    worker: RunningWorker, topics: Settings, producer: AIOKafkaProducer, tail: StatusTail
) -> None:
    """A second worker given the file of a running one refuses to start, naming the file and
    the process holding it; the first goes on serving."""
    with pytest.raises(StoreError) as refused:
        await asyncio.wait_for(Worker(topics).run(), START_S)
    assert f"{topics.db_path} is in use by another worker" in str(refused.value)
    assert f"(process {os.getpid()})" in str(refused.value)
    event = await tail.wait_event(request_id=await start(producer, topics, "still-served"))
    assert event.type is EventType.STARTED


# `jobctl run` whose SQLite file may grow by argv[1] pages only: SQLite itself fails the write
# that needs more (SQLITE_FULL, "database or disk is full"), as on a full disk.
_SMALL_DISK = """
import sys
from worker.cli import app
from worker.engine.store import Store

opened = Store.open.__func__

async def open_small(cls, path, **options):
    store = await opened(cls, path, **options)
    if options.get("exclusive"):
        [(pages,)] = await store._db.execute_fetchall("PRAGMA page_count")
        await store._db.execute(f"PRAGMA max_page_count = {pages + int(sys.argv[1])}")
    return store

Store.open = classmethod(open_small)
app(["run"], prog_name="jobctl")
"""


class SmallDiskWorker(WorkerProcess):
    """A `WorkerProcess` that can also start with a SQLite file limited in size."""

    def start_small(self, pages: int) -> None:
        """Start with room for `pages` more pages of SQLite file."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SMALL_DISK, str(pages)],
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        self.starts += 1


def stored_run_ids(db: Path) -> set[str]:
    """Run IDs in the SQLite file, read while its worker runs."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        return {run_id for (run_id,) in conn.execute("SELECT run_id FROM runs")}


async def poll(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Wait until `condition()` holds, checking every 50 ms; fail after `timeout`."""
    try:
        async with asyncio.timeout(timeout):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"{what}: not within {timeout} s") from None


@contextlib.asynccontextmanager
async def requests_while(
    process: WorkerProcess, producer: AIOKafkaProducer, s: Settings
) -> AsyncIterator[list[tuple[float, str]]]:
    """Send start requests of new job types, both partitions, every 20 ms while `process`
    runs; yield (when each began to be sent, as `time.time()`, its request ID), so far."""
    sent: list[tuple[float, str]] = []

    async def send() -> None:
        for i in range(1000):
            if not process.alive():
                return
            began = time.time()
            sent.append((began, await start(producer, s, f"after-{i}")))
            await asyncio.sleep(0.02)

    task = asyncio.create_task(send())
    try:
        yield sent
    finally:
        await task


def failed_write_at(process: WorkerProcess) -> float:
    """When `process` logged its failed SQLite write (`time.time()`'s scale): no batch it
    commits after that is fetched after it."""
    records, _ = log_lines(process)
    failed = [r for r in records if r.get("event") == "the SQLite write failed"]
    assert len(failed) == 1, records
    return datetime.fromisoformat(failed[0]["timestamp"]).timestamp()


async def test_a_failing_sqlite_write_stops_the_worker_and_a_restart_converges(
    topics: Settings, producer: AIOKafkaProducer, tail: StatusTail, tmp_path: Path
) -> None:
    """The write of a committed batch fails with SQLITE_FULL: the worker commits no further
    Kafka transaction (requests sent after the failed write are not decided), exits 1 with
    one line,
    and a start on the same file converges: every request decided once, SQLite equal to the
    state rebuilt from the status topic, the runs started before served."""
    db = topics.db_path
    process = SmallDiskWorker(topics, "worker", tmp_path)
    held, done = job_types("small")
    try:
        process.start_small(pages=4)
        first = await tail.wait_event(START_S, request_id=await start(producer, topics, held))
        await poll(lambda: first.run_id in stored_run_ids(db), 30, "the first run written")
        blob = {"blob": "x" * 40_000}  # needs more pages than the file may have
        big = await tail.wait_event(
            request_id=await start(producer, topics, done, initial_data=blob)
        )
        assert big.type is EventType.STARTED  # committed to Kafka, its write fails after
        # Requests go on while the worker runs; those sent once the write had failed (the
        # worker logs when) must not be decided: every commit is checked against it.
        async with requests_while(process, producer, topics) as sent:
            # A batch that found the write failed is logged with its traceback.
            line = await refusal(process, traceback=True)
        failed_at = failed_write_at(process)
        after = [request_id for began, request_id in sent if began > failed_at]
        assert after, "no request was sent after the failed write, while the worker ran"
        assert line.startswith(f"error: writing the SQLite file {db} failed (database or disk")
        assert big.run_id not in stored_run_ids(db)
        decided = {
            StatusEvent.model_validate_json(r.value).request_id
            for records in (
                await read_topic(topics.bootstrap_servers, topics.topics.status)
            ).values()
            for r in records
        }
        assert decided.isdisjoint(after), "a batch was committed after the failed write"

        process.start()  # the same file, room enough
        for request_id in after:
            await tail.wait_event(START_S, request_id=request_id)
        await assert_served(topics, producer, tail, {held: first, done: big})
        await assert_converged(topics, process, tmp_path)
    finally:
        process.ensure_dead()
