"""The broker crashes and hangs under two workers and a steady load: nothing is lost and
nothing decided twice.

The broker runs on a data directory the test keeps, so it can be killed (SIGKILL) and started
again on the same log and ports, or frozen (SIGSTOP) for longer than the group's session
timeout and resumed. A worker that gives up exits non-zero with one line and is restarted,
as a supervisor would; the oracle of `tests.chaos` then checks every input decided once,
legal lifecycles, one `started` per run ID, and SQLite equal to the status topic's state.
"""

from __future__ import annotations

import asyncio
import os
import random
from pathlib import Path

import pytest

from tests.chaos import Load, WorkerProcess, flowing, oracle, wait_until_processed
from tests.conftest import create_topics
from worker.devtools.localkafka import LocalKafka
from worker.settings import Settings

pytestmark = pytest.mark.kafka
SEED = 20261202


@pytest.mark.timeout(600)
@pytest.mark.parametrize("transactions", ["partition", "worker"])
async def test_broker_kills_and_hangs_lose_nothing_and_decide_nothing_twice(
    tmp_path: Path, transactions: str
) -> None:
    """Two kills and two hangs longer than the session timeout, mid-load, two workers (with
    a transactional producer per partition, or one per worker)."""
    faults = int(os.environ.get("JOBS_TEST_BROKER_FAULTS", "2"))
    broker = LocalKafka(
        data_dir=tmp_path / "kafka",
        # Own broker (the session's cannot be crashed): low session timeouts as the session's.
        extra_config={"group.min.session.timeout.ms": "1000"},
    )
    await asyncio.to_thread(broker.start)
    settings = Settings(
        bootstrap_servers=broker.bootstrap_servers,
        topic_prefix="faults",
        db_path=tmp_path / "unused.db",
        poll_timeout_ms=100,
        http_port=0,
        session_timeout_ms=2_000,
        heartbeat_interval_ms=500,
    )
    workers = [
        WorkerProcess(settings, f"w{i}", tmp_path, transactions=transactions) for i in range(2)
    ]
    restarts = 0
    try:
        await create_topics(settings, 4)
        for worker in workers:
            worker.start()
        load = Load(settings, seed=SEED, requests=2400, rate=120, job_types=400)
        rng = random.Random(SEED)
        async with flowing(load):
            for round_ in range(faults):
                # The fault schedule: seeded moments in the load, not a wait for anything.
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                await asyncio.to_thread(broker.kill)
                await asyncio.to_thread(broker.start)
                await asyncio.sleep(rng.uniform(1.0, 3.0))
                await asyncio.to_thread(broker.freeze)
                await asyncio.sleep(4.0)  # the hang itself: twice the session timeout
                await asyncio.to_thread(broker.thaw)
                for worker in workers:  # a supervisor restarts a worker that gave up
                    if not worker.alive():
                        restarts += 1
                        worker.start()
                del round_
            await wait_until_processed(settings, load, timeout=300)
            for worker in workers:
                if not worker.alive():
                    restarts += 1
                    worker.start()
            await wait_until_processed(settings, load, timeout=120)
        for worker in workers:
            assert await worker.terminate() == 0, worker.log_text()[-3000:]
        verdict = await oracle(settings, [w.db_path for w in workers], tmp_path)
        assert verdict.problems == []
        assert verdict.runs > 0
        print(
            f"broker faults: {faults} kills, {faults} hangs, worker restarts: {restarts}, "
            f"inputs {verdict.inputs}, runs {verdict.runs}"
        )
    finally:
        for worker in workers:
            worker.ensure_dead()
        await asyncio.to_thread(broker.stop)
