"""The README's producer, executor and downstream consumer: kept in sync, and run for real."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from examples import downstream, executor, producer
from schemas import EventType
from tests.conftest import RunningWorker
from worker.client.watch import StatusTail
from worker.settings import Settings

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).parent.parent
EXAMPLES = ["producer.py", "executor.py", "downstream.py"]


@pytest.mark.parametrize("name", EXAMPLES)
def test_readme_shows_each_example_verbatim(name: str) -> None:
    """Each example file appears, unchanged, as a code block of the README."""
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    assert (ROOT / "examples" / name).read_text() in blocks


async def _group_has_members(settings: Settings, group: str) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.bootstrap_servers)
    await admin.start()
    try:
        async with asyncio.timeout(30):
            # Polls the broker's view of another consumer's group: no event to await.
            while True:
                described = await admin.describe_consumer_groups([group])
                if described and described[0].groups[0][2] == "Stable":
                    return
                await asyncio.sleep(0.1)
    finally:
        await admin.close()


async def test_examples_run_end_to_end(
    worker: RunningWorker, topics: Settings, tail: StatusTail, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The producer starts a run, the executor completes it, and the downstream consumer,
    started after an earlier completion, reports the new one with its metrics."""
    monkeypatch.setenv("JOBS_BOOTSTRAP_SERVERS", topics.bootstrap_servers)
    monkeypatch.setenv("JOBS_TOPIC_PREFIX", topics.topic_prefix)
    stop = asyncio.Event()
    executing = asyncio.create_task(executor.main(stop))
    try:
        await _group_has_members(topics, f"{topics.topic_prefix}.executors.report.daily")
        earlier = await producer.main()
        assert earlier is not None
        await tail.wait_event(run_id=earlier, type=EventType.COMPLETED)
        watching = asyncio.create_task(
            downstream.main(topics.bootstrap_servers, topics.topic_prefix)
        )
        run_id = await producer.main()
        assert run_id not in (None, earlier)
        seen = await asyncio.wait_for(watching, 60)
        assert seen == {"run_id": run_id, "metrics": {"rows": 1200}}
    finally:
        stop.set()
        await asyncio.wait_for(executing, 30)


@pytest.mark.parametrize("module", ["producer", "executor", "downstream"])
@pytest.mark.parametrize("servers", ["127.0.0.1:{free}", "127.0.0.1:notaport", "\udcff:1"])
def test_an_example_without_a_broker_ends_in_an_error_line(module: str, servers: str) -> None:
    """`python -m examples.<name>` with a bootstrap address where no broker answers, or
    that is no address, exits 1 with a line saying why, not a traceback."""
    import os
    import socket
    import subprocess
    import sys

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    env = {**os.environ, "JOBS_BOOTSTRAP_SERVERS": servers.format(free=free)}
    done = subprocess.run(
        [sys.executable, "-m", f"examples.{module}"],
        capture_output=True,
        text=True,
        errors="backslashreplace",
        env=env,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
