"""Exactly-once under crashes, fault injection, scale-out and zombies, on the real broker.

Every test drives `jobctl run` processes with real signals and checks the oracle of
`tests.chaos`: each input decided once, legal lifecycles, one `started` per run ID, and
SQLite equal to the state rebuilt from the status topic.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.chaos import Load, WorkerProcess, flowing, oracle, wait_until_processed
from tests.conftest import create_topics
from worker.settings import Settings

pytestmark = pytest.mark.kafka
SEED = 20261128
# Both ways of committing: a transactional producer per partition, one for the worker.
TRANSACTIONS = pytest.mark.parametrize("transactions", ["partition", "worker"])


@pytest.fixture
async def cluster(settings: Settings) -> Settings:
    """Four partitions per topic, so several workers have something to share."""
    await create_topics(settings, 4)
    return settings


@pytest.fixture
def spawn(cluster: Settings, tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Make worker processes; any left running are killed after the test."""
    made: list[WorkerProcess] = []

    def make(name: str, **extra: str) -> WorkerProcess:
        process = WorkerProcess(cluster, name, tmp_path, **extra)
        made.append(process)
        return process

    yield make
    for process in made:
        process.ensure_dead()


def log_events(process: WorkerProcess) -> list[dict[str, object]]:
    """The worker's JSON log lines."""
    out = []
    for line in process.log_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            item = json.loads(line)
            if isinstance(item, dict):
                out.append(item)
    return out


async def finish(cluster: Settings, load: Load, workers: list[WorkerProcess], tmp: Path) -> None:
    """Wait for the backlog, stop the workers with SIGTERM (exit 0), and run the oracle."""
    await wait_until_processed(cluster, load, timeout=180)
    for process in workers:
        if process.alive():
            assert await process.terminate() == 0, process.log_text()[-3000:]
    verdict = await oracle(cluster, [w.db_path for w in workers], tmp)
    assert verdict.problems == []
    assert verdict.runs > 0
    assert verdict.dead_letters > 0


async def test_sigkill_at_random_moments_neither_loses_nor_repeats(
    cluster: Settings, spawn: Callable[..., WorkerProcess], tmp_path: Path
) -> None:
    """Killed by SIGKILL 12 times mid-stream, the worker still decides each input once."""
    worker = spawn("crashy")
    worker.start()
    load = Load(cluster, seed=SEED, requests=4200, rate=250, job_types=1000)
    rng = random.Random(SEED)
    async with flowing(load):
        kills = 0
        while kills < 12:
            # The chaos schedule: seeded random moments, not a wait for anything.
            await asyncio.sleep(rng.uniform(0.4, 2.0))
            worker.kill()
            kills += 1
            worker.start()
        await finish(cluster, load, [worker], tmp_path)
    assert worker.starts == 13
    verdict = await oracle(cluster, [worker.db_path], tmp_path)
    assert verdict.inputs >= 5000


@pytest.mark.parametrize(
    ("point", "transactions"),
    [("in_transaction", "partition"), ("after_commit", "partition"), ("in_transaction", "worker")],
)
async def test_hard_exit_at_a_fault_point_is_recovered(
    cluster: Settings,
    spawn: Callable[..., WorkerProcess],
    tmp_path: Path,
    point: str,
    transactions: str,
) -> None:
    """A hard exit inside an open transaction, or after the Kafka commit, is recovered exactly."""
    worker = spawn("faulty", transactions=transactions)
    worker.start(fault_point=point, fault_after_batches="8")
    load = Load(cluster, seed=SEED + 1, requests=600, rate=300)
    async with flowing(load):
        assert await worker.wait_exit(timeout=120) == 70
        assert "injected fault" in worker.log_text()
        worker.start()
        await finish(cluster, load, [worker], tmp_path)
    if point == "after_commit":
        restores = [
            e for e in log_events(worker) if e.get("event") == "partition restored from changelog"
        ]
        assert restores, "the SQLite file was behind Kafka, so the partition must be restored"


@TRANSACTIONS
async def test_survivors_take_over_a_killed_workers_partitions(
    cluster: Settings, spawn: Callable[..., WorkerProcess], tmp_path: Path, transactions: str
) -> None:
    """Three workers share the partitions; one is killed; the others restore its partitions
    (with worker-wide transactions, aborting the transaction it left open, if any)."""
    # The victim reports what it decided every half second: it is killed once it has
    # committed batches (a member killed before it owned anything leaves nothing to restore).
    workers = [
        spawn("member0", log_summary_s="0.5", transactions=transactions),
        spawn("member1", transactions=transactions),
        spawn("member2", transactions=transactions),
    ]
    for process in workers:
        process.start()
    load = Load(cluster, seed=SEED + 2, requests=1500, rate=250)
    victim = workers[0]

    def victim_committed() -> bool:
        return any(
            e.get("event") == "decided" and int(str(e.get("batches", 0))) > 0
            for e in log_events(victim)
        )

    async with flowing(load):
        await asyncio.wait_for(load.third_sent.wait(), 60)  # the moment to kill, at the earliest
        await _until(victim_committed, 60, "the victim committed batches")
        victim.kill()
        await finish(cluster, load, workers, tmp_path)
    survivors_restored = [
        e
        for w in workers[1:]
        for e in log_events(w)
        if e.get("event") == "partition restored from changelog"
    ]
    assert survivors_restored, "a survivor must restore the victim's partitions from the changelog"


def _stopped(process: WorkerProcess) -> bool:
    assert process.proc is not None
    stat = Path(f"/proc/{process.proc.pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] == "T"


async def _until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    # Polls another process's state (its /proc entry, its log file): there is no event to await.
    async with asyncio.timeout(timeout):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.1)
    assert predicate(), what


@TRANSACTIONS
async def test_a_frozen_zombie_cannot_publish_after_its_partitions_move(
    cluster: Settings, spawn: Callable[..., WorkerProcess], tmp_path: Path, transactions: str
) -> None:
    """A worker frozen inside its first transaction, its other partitions still being taken,
    is fenced: nothing it sent becomes visible, and takes begun before the freeze do not
    go on with the offsets they read then.

    With a producer per partition the heir's producer fences it at once; with one for the
    worker, the group refuses its offsets, and the heir aborts the transaction the zombie
    left open rather than wait for the broker to time it out (two minutes here: the test's
    own time-outs would run out first)."""
    zombie = spawn("zombie", transactions=transactions, transaction_timeout_ms="120000")
    zombie.start(fault_point="stop_in_transaction", fault_after_batches="1")
    heir = spawn("heir", transactions=transactions, transaction_timeout_ms="120000")
    heir.start()
    load = Load(cluster, seed=SEED + 3, requests=900, rate=200)
    async with flowing(load):
        await _until(lambda: _stopped(zombie), 60, "the zombie froze in its transaction")
        frozen_at = len(log_events(heir))

        def heir_owns_all() -> bool:
            # Only assignments after the freeze count: the heir may have owned everything
            # before the zombie joined.
            return any(
                e.get("event") == "partitions assigned" and e.get("partitions") == [0, 1, 2, 3]
                for e in log_events(heir)[frozen_at:]
            )

        await _until(heir_owns_all, 60, "the heir took every partition")
        zombie.signal(signal.SIGCONT)
        await _until(
            lambda: any(str(e.get("event", "")).startswith("fenced") for e in log_events(zombie)),
            60,
            "the resumed zombie found itself fenced",
        )
        await finish(cluster, load, [zombie, heir], tmp_path)
    aborted = [
        e
        for e in log_events(heir)
        if e.get("event") == "aborted a transaction its previous owner left open"
    ]
    if transactions == "worker":
        with sqlite3.connect(zombie.db_path) as db:
            (zombie_id,) = db.execute("SELECT id FROM worker_identity").fetchone()
        assert {e.get("transactional_id") for e in aborted} == {
            f"{cluster.group_id}.worker.{zombie_id}"
        }
    else:
        assert not aborted  # the heir's producer for the partition fenced it
