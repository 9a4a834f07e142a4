"""The worker's SQLite file: its schema and statements, how rows are bound, and how it is
opened (locked, checked, converted from an earlier schema version, moved aside when damaged).

The file carries its schema version (`PRAGMA user_version`, `SCHEMA_VERSION`). The worker
opens it exclusively: it locks `<file>.lock` (one worker per file), checks the whole file
(`PRAGMA quick_check`), and moves a damaged one aside (`<file>.damaged-<UTC time>`, with its
-wal and -shm) to start empty: the file holds only a prefix of what Kafka committed, so
every partition is then restored from the changelog. A file from a newer schema version,
or locked by another worker, is refused with a `StoreError`, left as it is.
"""

from __future__ import annotations

import codecs
import contextlib
import errno
import fcntl
import itertools
import json
import os
import sqlite3
import stat
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

import aiosqlite
import structlog

from schemas import RunStatus
from worker.core.runs import RunRow
from worker.engine import stored
from worker.engine.stored import dumps, run_params

log = structlog.get_logger("worker")

# `PRAGMA user_version` of the files this code writes. A file reading 0 is new, or was made
# before versions were recorded (with version 1's schema); it is stamped on open. Version 2
# keeps each job state's window entries as rows (`worker.engine.stored`); a version 1 file
# is converted when it is opened (`_migrate`).
SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id       TEXT PRIMARY KEY,
    job_type     TEXT NOT NULL,
    client_id    TEXT,
    request_id   TEXT,
    status       TEXT NOT NULL,
    partition    INTEGER NOT NULL,
    started_at   TEXT NOT NULL,
    ended_at     TEXT,
    initial_data TEXT NOT NULL,
    metrics      TEXT,
    reason       TEXT,
    -- 1 while the run's row is in the changelog (not yet tombstoned)
    retained     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS runs_by_type ON runs (job_type, started_at);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status);
CREATE INDEX IF NOT EXISTS runs_retained ON runs (partition, retained);
CREATE TABLE IF NOT EXISTS job_states (
    job_type  TEXT PRIMARY KEY,
    partition INTEGER NOT NULL,
    state     BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS job_states_by_partition ON job_states (partition);
-- a job state's window entries (`worker.engine.stored`): kind d (idempotency), e (ended runs)
CREATE TABLE IF NOT EXISTS window_entries (
    job_type TEXT NOT NULL,
    kind     TEXT NOT NULL,
    number   INTEGER NOT NULL,
    entry    BLOB NOT NULL,
    PRIMARY KEY (job_type, kind, number)
) WITHOUT ROWID;
-- the worker's own ID, made once per file: JOBS_TRANSACTIONS=worker's transactional ID
CREATE TABLE IF NOT EXISTS worker_identity (
    id TEXT NOT NULL
);
-- the topics' partition count this file's rows were decided with (one row, from its first
-- take): a job type's partition follows from it, so rows decided with another are not
-- this deployment's to decide on (`Store.partitions_decided_with`)
CREATE TABLE IF NOT EXISTS decided_with (
    partitions INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS applied_offsets (
    topic       TEXT NOT NULL,
    partition   INTEGER NOT NULL,
    next_offset INTEGER NOT NULL,
    PRIMARY KEY (topic, partition)
);
"""

# A job state's JSON with an active or queued run (`dump_state` writes both lists).
BUSY = (
    "json_array_length(CAST(state AS TEXT), '$.active') > 0 "
    "OR json_array_length(CAST(state AS TEXT), '$.queue') > 0"
)
CHUNK = 5_000  # rows a time when a partition's history is read or restored


T = TypeVar("T")


def chunks(items: Iterable[T], size: int) -> Iterator[list[T]]:
    iterator = iter(items)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


# How long a statement waits for another connection's write lock (a replay process's
# transaction, a restore) before failing.
BUSY_TIMEOUT_S = 60.0
PUT_STATE = (
    "INSERT INTO job_states (job_type, partition, state) VALUES (?, ?, ?) "
    "ON CONFLICT (job_type) DO UPDATE SET partition = excluded.partition, state = excluded.state"
)
# `PUT_STATE` for a job type that stays on its partition: setting `partition` at all, even
# to the value it has, rewrites the row's entry in `job_states_by_partition` (SQLite updates
# every index on a column that is set). A row on another partition is left as it is and
# not counted in the statement's `rowcount`: the caller then writes the rows with
# `PUT_STATE` (a job type moves only when its topic gains partitions).
PUT_STATE_IN_PLACE = (
    "INSERT INTO job_states (job_type, partition, state) VALUES (?, ?, ?) "
    "ON CONFLICT (job_type) DO UPDATE SET state = excluded.state "
    "WHERE partition = excluded.partition"
)
PUT_ENTRY = (
    "INSERT OR REPLACE INTO window_entries (job_type, kind, number, entry) VALUES (?, ?, ?, ?)"
)
DROP_ENTRY = "DELETE FROM window_entries WHERE job_type = ? AND kind = ? AND number = ?"
JOB_ENTRIES = "DELETE FROM window_entries WHERE job_type = ?"
PARTITION_ENTRIES = (
    "DELETE FROM window_entries "
    "WHERE job_type IN (SELECT job_type FROM job_states WHERE partition = ?)"
)
PUT_OFFSET = (
    "INSERT INTO applied_offsets (topic, partition, next_offset) VALUES (?, ?, ?) "
    "ON CONFLICT (topic, partition) DO UPDATE SET next_offset = excluded.next_offset"
)

COLUMNS = (
    "run_id, job_type, client_id, request_id, status, partition, started_at, ended_at, "
    "initial_data, metrics, reason"
)


class Many:
    """One statement for many rows: `head`, then `row` once for each row, comma-separated,
    then `tail`; `sql(n)` is the statement for `n` rows (made once for each `n`).

    The write-behind writes a batch's rows with these (`writer.execute_many`) rather than
    with `executemany`, which runs the statement once for each row: each run a step of
    SQLite's machine with its locks and GIL hand-over, and the end of a statement
    (`sqlite3VdbeHalt`), a sixth of SQLite's instructions in a transition.
    """

    def __init__(self, head: str, row: str, tail: str = "") -> None:
        self.head = head
        self.row = row
        self.tail = tail
        self.width = row.count("?")  # parameters a row
        self._sql: dict[int, str] = {}

    @classmethod
    def of(cls, statement: str) -> Many:
        """The many-row form of a one-row `INSERT ... VALUES (...) [tail]`."""
        start = statement.index(" VALUES (") + len(" VALUES ")
        depth = 0
        for end, char in enumerate(statement[start:], start):
            depth += (char == "(") - (char == ")")
            if depth == 0:
                return cls(statement[:start], statement[start : end + 1], statement[end + 1 :])
        raise ValueError(f"no row of values in {statement!r}")

    def sql(self, rows: int) -> str:
        """The statement for `rows` rows."""
        made = self._sql.get(rows)
        if made is None:
            made = self._sql[rows] = self.head + ",".join([self.row] * rows) + self.tail
        return made


# A run's identity columns never change; updating only the others leaves the by-type index
# alone (INSERT OR REPLACE deleted and re-inserted the row and every index entry).
UPSERT_RUN = (
    f"INSERT INTO runs ({COLUMNS}, retained) VALUES (?, ?, NULLIF(?, 0), NULLIF(?, 0), ?, ?, "
    "?, NULLIF(?, 0), ?, NULLIF(?, 0), NULLIF(?, 0), ?) "
    "ON CONFLICT (run_id) DO UPDATE SET status = excluded.status, "
    "started_at = excluded.started_at, partition = excluded.partition, "
    "ended_at = excluded.ended_at, metrics = excluded.metrics, reason = excluded.reason, "
    "retained = excluded.retained"
)
UPDATE_RUN = (
    "UPDATE runs SET status = COALESCE(?, status), ended_at = COALESCE(?, ended_at), "
    "metrics = COALESCE(?, metrics), reason = COALESCE(?, reason) WHERE run_id = ?"
)
# An ended run's row, over the row its start wrote: only the columns an end changes, so
# neither the insert's key lookup nor the other indexes are touched (half an upsert's time).
# `retained` is left as it is: the row of a run not yet ended is always retained in a
# worker's file (written so, and a restore deletes any other), and setting it anyway
# rewrote its `runs_retained` index entry (2.9 µs an end instead of 4.5-5.2).
END_RUN = (
    "UPDATE runs SET status = ?, ended_at = ?, metrics = NULLIF(?, 0), reason = NULLIF(?, 0) "
    "WHERE run_id = ?"
)


UPSERT_RUNS = Many.of(UPSERT_RUN)
# `END_RUN` for many runs: SQLite 3.33 and later (`UPDATE ... FROM`); before, run by run.
END_RUNS = Many(
    "UPDATE runs SET status = v.column1, ended_at = v.column2, metrics = NULLIF(v.column3, 0), "
    "reason = NULLIF(v.column4, 0) FROM (VALUES ",
    "(?, ?, ?, ?, ?)",
    ") AS v WHERE runs.run_id = v.column5",
)
UPDATE_FROM = sqlite3.sqlite_version_info >= (3, 33, 0)
PUT_STATES_IN_PLACE = Many.of(PUT_STATE_IN_PLACE)
PUT_ENTRIES = Many.of(PUT_ENTRY)


# Each `run_change` field: its position in an `UPSERT_RUN` row and in an `UPDATE_RUN` one,
# and how it is stored.
CHANGED: dict[str, tuple[int, int, Callable[[Any], Any]]] = {
    "status": (4, 0, str),
    "ended_at": (7, 1, stored.time_text),
    "metrics": (9, 2, dumps),
    "reason": (10, 3, str),
}


class StoreError(sqlite3.DatabaseError):
    """The SQLite file cannot be used, or a write to it failed; the message is one line
    naming the file. A `sqlite3.Error`, so a batch failing with it is the machine's fault,
    never an input record's."""


class _Damaged(Exception):
    """The file is not a database, or is corrupt."""


class DamagedFile(StoreError):
    """A `StoreError`: the file at `path` is not a database, or is corrupt (`damage` says
    how). Its message is a worker's advice; `rebuilt` gives a rebuilder's."""

    def __init__(self, path: Path, damage: str) -> None:
        super().__init__(
            f"{path} is damaged ({damage}); a worker started on it moves it aside and "
            "restores its partitions from the changelog"
        )
        self.path = path
        self.damage = damage

    def rebuilt(self, how: str) -> str:
        """The one line for a file that replay or the console builds anew from the status
        topic (`how` says so): it may be moved away, as nothing else is in it."""
        return f"{self.path} is damaged ({self.damage}); move it away or give another --db: {how}"


# SQLite's primary result codes for a file that is not a database or is corrupt; anything
# else (locked, unreadable, a full disk) says nothing about the file's content.
_DAMAGE_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SIDE_FILES = ("-wal", "-shm", "-journal")


# The files a worker or console makes (its SQLite file, whose WAL and shared-memory files
# SQLite makes with the same mode, and its lock) are its user's alone: runs carry payloads.
PRIVATE_MODE = 0o600


def open_lock_file(lock: Path) -> int:
    """A descriptor of the lock file `lock`, made if missing (readable by its user only);
    OSError if it is a symbolic link (followed, a lock in a shared directory could be aimed
    at any file the process may write, and its PID written over that file) or not a
    regular file."""
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, PRIVATE_MODE)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise OSError(errno.ELOOP, "it is a symbolic link (remove it)") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file")
    return fd


def make_private(path: Path) -> None:
    """Make the file `path` (where a link points, for a link to a missing file), empty and
    readable by its user only, if there is none yet, so that SQLite opens it as it is: its
    own default would let every user read it. `StoreError` if it cannot be made."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL  # an existing file keeps its owner's mode
    try:
        os.close(os.open(path.resolve(), flags, PRIVATE_MODE))
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise StoreError(f"cannot make the SQLite file {path}: {exc.strerror}") from None


# A held `<path>.lock`'s descriptor -> a descriptor of the file itself, locked too
# (`hold_lock`); both are closed by `release_lock`.
_FILE_LOCKS: dict[int, int] = {}


def hold_lock(path: Path, *, advice: str | None = None) -> int:
    """Hold `<path>.lock` (flock, released when the descriptor closes): one worker, console
    or replay per file. A holder refused says `advice` (a worker's by default).

    The lock file goes by the path, so a symbolic or hard link to a file in use would take a
    lock file of its own: the file itself is locked as well (flock on its inode, which
    SQLite's own locks, fcntl's, never meet), made empty first if it is missing. Release
    with `release_lock`.
    """
    lock = Path(f"{path}.lock")
    while True:
        try:
            fd = open_lock_file(lock)
        except OSError as exc:
            raise StoreError(f"cannot use the lock file {lock}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if not isinstance(exc, BlockingIOError):
                raise StoreError(f"cannot lock {lock}: {exc.strerror}") from None
            by = f" (process {holder})" if holder.isdigit() else ""
            if advice is not None:
                raise StoreError(
                    f"{path} is in use by another process: {lock} is locked{by}; {advice}"
                ) from None
            raise StoreError(
                f"{path} is in use by another worker: {lock} is locked{by}; "
                "give each worker a SQLite file of its own (JOBS_DB_PATH)"
            ) from None
        # A holder that refused its path removes the lock file it made (`release_lock`):
        # a lock taken on the file it removed is no lock, so take the one there now.
        with contextlib.suppress(OSError):
            if os.stat(lock, follow_symlinks=False).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        own = _lock_the_file(path, lock, advice)
    except BaseException:
        os.close(fd)
        raise
    if own is not None:
        _FILE_LOCKS[fd] = own
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _lock_the_file(path: Path, lock: Path, advice: str | None) -> int | None:
    """A descriptor of the file `path` names (through any link), flocked; None when it is no
    regular file (the open refuses it then). `StoreError` if another process holds it."""
    with contextlib.suppress(StoreError):  # what the open then says of a path it cannot make
        make_private(path)
    try:
        # Non-blocking: opening a FIFO for reading would wait for a writer.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None  # what the open then says of the path
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if not isinstance(exc, BlockingIOError):
            raise StoreError(f"cannot lock {path}: {exc.strerror}") from None
        why = (
            f"{path} is in use by another process through another path (a link to the same "
            f"file), though {lock} is free"
        )
        raise StoreError(
            f"{why}; {advice or 'give each worker a SQLite file of its own (JOBS_DB_PATH)'}"
        ) from None
    return fd


def lock_exists(path: Path) -> bool:
    """Whether `<path>.lock` is there (before `hold_lock`: whether it would make it)."""
    return os.path.lexists(f"{path}.lock")


def release_lock(path: Path, fd: int, *, remove: bool) -> None:
    """Let go of `<path>.lock` held by `fd`; with `remove` (a holder that made the lock file
    and then refused the path), remove the file first, while still held."""
    try:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(f"{path}.lock")
    finally:
        own = _FILE_LOCKS.pop(fd, None)
        if own is not None:
            os.close(own)
        os.close(fd)


async def _prepare(db: aiosqlite.Connection, path: Path, *, check: bool) -> None:
    """Check `db`'s version (and with `check`, every page), then put the schema in place."""
    try:
        async with db.execute("PRAGMA user_version") as cursor:  # the first read of the file
            row = await cursor.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{path} has schema version {version}; this build knows versions up to "
                f"{SCHEMA_VERSION}: run the build that wrote it (the file is left as it is)"
            )
        if check:
            found = [str(r[0]) for r in await db.execute_fetchall("PRAGMA quick_check")]
            if found != ["ok"]:
                raise _Damaged("; ".join(found[:3]))
        if version == 0:
            await _refuse_foreign(db, path)
        await db.execute("PRAGMA journal_mode=WAL")
        await db.execute("PRAGMA synchronous=NORMAL")
        await db.executescript(SCHEMA)
        if version < SCHEMA_VERSION:
            await db.execute("BEGIN IMMEDIATE")
            await _migrate(db, path)
            await db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        await db.commit()
    except StoreError:
        raise
    except sqlite3.DatabaseError as exc:
        if exc.sqlite_errorcode & 0xFF in _DAMAGE_CODES:
            raise _Damaged(str(exc)) from exc
        raise StoreError(f"cannot open the SQLite file {path}: {exc}") from exc


async def _refuse_foreign(db: aiosqlite.Connection, path: Path) -> None:
    """Raise `StoreError` when `path` holds tables and none is the worker's: another
    program's file, which the schema would otherwise be added to (an unversioned worker
    file, from before versions were recorded, has its `runs` table)."""
    tables = "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ours = await db.execute_fetchall(f"{tables} AND name IN ('runs', 'job_states') LIMIT 1")
    if ours:
        return
    names = [str(name) for (name,) in await db.execute_fetchall(f"{tables} ORDER BY name LIMIT 4")]
    if names:
        listed = ", ".join(ascii(name) for name in names[:3]) + (", ..." if len(names) > 3 else "")
        raise StoreError(
            f"{path} is not a worker's SQLite file: it holds other tables ({listed}) and none "
            "of the worker's; it is left as it is (use a file of its own)"
        )


async def _migrate(db: aiosqlite.Connection, path: Path) -> None:
    """Version 1 to 2: each job state whose windows are numbered keeps its head in
    `job_states` and its entries as rows; one that does not validate, or is not numbered
    yet, stays whole (`stored.split`), as a version 2 file may hold it."""
    moved, after = 0, ""
    while chunk := list(
        await db.execute_fetchall(  # a chunk at a time: states may be large
            "SELECT job_type, state FROM job_states WHERE job_type > ? ORDER BY job_type LIMIT ?",
            (after, CHUNK),
        )
    ):
        after = chunk[-1][0]
        heads: list[tuple[bytes, str]] = []
        entries: list[tuple[str, str, int, bytes]] = []
        for job_type, state in chunk:
            try:
                head, found = stored.split(bytes(state))
            except ValueError:
                continue
            if found:
                heads.append((head, job_type))
                entries.extend((job_type, kind, number, e) for kind, number, e in found)
        await db.executemany("UPDATE job_states SET state = ? WHERE job_type = ?", heads)
        await db.executemany(PUT_ENTRY, entries)
        moved += len(heads)
    if moved:
        log.info(
            "SQLite file converted to schema version 2: window entries as rows",
            path=str(path),
            job_types=moved,
        )


def _missing_directory(path: Path) -> Path | None:
    """The directory a new file at `path` (through any link) would be made in, when it does
    not exist; None when the file exists or can be made."""
    if path.exists():
        return None
    parent = path.resolve().parent
    return None if parent.is_dir() else parent


async def _connect(path: Path, *, check: bool) -> aiosqlite.Connection:
    """A connection to `path` with the schema in place; `_Damaged` or `StoreError` if not."""
    if (parent := _missing_directory(path)) is not None:
        # Said here (a link to a missing directory): SQLite's own words are "unable to open
        # database file", and aiosqlite leaves its thread to outlive the event loop after
        # a failed connect.
        raise StoreError(f"{path}: there is no directory {parent} to make it in")
    make_private(path)
    db = await aiosqlite.connect(str(path), timeout=BUSY_TIMEOUT_S)
    try:
        await _prepare(db, path, check=check)
    except BaseException:
        await db.close()
        raise
    return db


_SQLITE_HEADER = b"SQLite format 3\x00"


def _text_file(path: Path) -> bool:
    """Whether `path` is UTF-8 text without SQLite's header: a file given by mistake (a
    config, a README), which is refused rather than moved aside as damaged. A damaged
    worker's file keeps its header, or is binary where its pages were overwritten."""
    with contextlib.suppress(OSError, UnicodeDecodeError):
        with path.open("rb") as f:
            head = f.read(1 << 16)
        if head and not head.startswith(_SQLITE_HEADER) and b"\x00" not in head:
            # Incremental: a character cut at the end of what was read is not an error.
            codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
            return True
    return False


def _move_aside(path: Path) -> Path:
    """Rename `path` (its -wal, -shm and -journal first) to `<path>.damaged-<UTC time>`."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    target = path.with_name(f"{path.name}.damaged-{stamp}")
    for n in itertools.count(1):
        if not any(Path(f"{target}{s}").exists() for s in ("", *_SIDE_FILES)):
            break
        target = path.with_name(f"{path.name}.damaged-{stamp}-{n}")
    # Side files first: a main file left without its WAL is an older, consistent snapshot
    # (behind Kafka, so restored), where a WAL left without its file would be read into a
    # new one.
    for suffix in (*_SIDE_FILES, ""):
        source = Path(f"{path}{suffix}")
        if source.exists():
            source.rename(f"{target}{suffix}")
    return target


async def open_file(path: Path, *, repair: bool) -> aiosqlite.Connection:
    """Connect to `path`; with `repair`, check every page and move a damaged file aside."""
    try:
        return await _connect(path, check=repair)
    except _Damaged as damage:
        reason = str(damage)
    # Said alike by the worker and by the commands that only read or rebuild: a text file
    # is nobody's damaged SQLite file, and none of them moves it.
    if _text_file(path):
        raise StoreError(
            f"{path} is a text file, not a worker's SQLite file; it is left as it is "
            "(give the worker's file, or a new path, as JOBS_DB_PATH or --db)"
        )
    if not repair:
        raise DamagedFile(path, reason)
    moved = _move_aside(path)
    log.warning(
        "the SQLite file is damaged: moved it aside and started an empty one; every "
        "partition is restored from the changelog",
        path=str(path),
        moved_to=str(moved),
        error=reason,
    )
    return await _connect(path, check=False)


def _write_failed(path: str, exc: BaseException) -> StoreError:
    return StoreError(
        f"writing the SQLite file {path} failed ({exc}); the worker stops without "
        "committing more to Kafka, and its next start restores what the file lacks from "
        "the changelog"
    )


@contextlib.asynccontextmanager
async def writing(db: aiosqlite.Connection, path: str) -> AsyncIterator[None]:
    """A transaction of the worker's on `db`: rolled back if it fails, raised as a
    `StoreError` (disk full, I/O error, corruption found while writing)."""
    try:
        yield
    except (sqlite3.Error, OSError) as exc:
        with contextlib.suppress(sqlite3.Error, ValueError):
            await db.rollback()
        raise _write_failed(path, exc) from exc


async def write_in_thread(
    db: aiosqlite.Connection, path: str, write: Callable[[sqlite3.Connection], None]
) -> None:
    """Run `write` (statements, no commit) on `db`'s own thread and commit it, in one trip
    there; rolled back and raised as a `StoreError` like `writing`.

    Every `await db.execute...` is a trip to the connection's thread and back (a queue, a
    future, a wake-up of the event loop); a write-behind transaction of a dozen statements
    made a dozen. aiosqlite has no public call for this: it queues `_execute`'s function as
    it queues its own (`tests/test_store.py` checks the two stay in step).
    """

    def transaction() -> None:
        conn = db._conn  # used on its own thread only
        try:
            write(conn)
            conn.commit()
        except BaseException as exc:
            with contextlib.suppress(sqlite3.Error):
                conn.rollback()  # nothing of a failed write stays, whatever failed
            if isinstance(exc, sqlite3.Error | OSError):
                raise _write_failed(path, exc) from exc
            raise

    await cast(Any, db)._execute(transaction)  # typed loosely by aiosqlite


def states_sql(where: str) -> str:
    """The statement `read_states` runs: the heads `where` selects, then their entries, in
    key order. The heads are read once and drive the join (CROSS JOIN keeps SQLite from
    scanning every entry of the file instead)."""
    return (
        f"WITH h AS MATERIALIZED (SELECT job_type, state FROM job_states WHERE {where}) "
        "SELECT job_type, '', 0, state FROM h UNION ALL "
        "SELECT h.job_type, w.kind, w.number, w.entry "
        "FROM h CROSS JOIN window_entries AS w ON w.job_type = h.job_type "
        "ORDER BY 1, 2, 3"
    )


async def read_states(db: aiosqlite.Connection, where: str, params: list[Any]) -> dict[str, bytes]:
    """The JSON (`dump_state`'s shape) of the job states `where` selects, from their heads
    and window entries, read in one statement (one snapshot, one trip to `db`'s thread)."""
    rows = await db.execute_fetchall(states_sql(where), params)
    found: dict[str, bytes] = {}
    entries: list[tuple[str, bytes]] = []
    job_type = ""
    for name, kind, _, value in rows:
        if not kind:  # a head: the entries of the one before are complete
            if entries:
                found[job_type] = stored.whole(found[job_type], entries)
                entries = []
            job_type = name
            found[name] = bytes(value)
        else:
            entries.append((kind, bytes(value)))
    if entries:
        found[job_type] = stored.whole(found[job_type], entries)
    return found


def run_row(r: Any) -> RunRow:
    return RunRow(
        run_id=r[0],
        job_type=r[1],
        client_id=r[2],
        request_id=r[3],
        status=RunStatus(r[4]),
        partition=r[5],
        started_at=datetime.fromisoformat(r[6]),
        ended_at=None if r[7] is None else datetime.fromisoformat(r[7]),
        initial_data=json.loads(r[8]),
        metrics=None if r[9] is None else json.loads(r[9]),
        reason=r[10],
    )


async def upsert_runs(db: aiosqlite.Connection, runs: Iterable[RunRow], *, retained: bool) -> None:
    """Write `runs` whole (`UPSERT_RUN`)."""
    await db.executemany(UPSERT_RUN, [run_params(r, retained=retained) for r in runs])
