"""Settings that cannot work stop the command with one line naming the setting: a
transaction timeout above the broker's maximum, a run budget no run fits in."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from worker.settings import Settings

JOBCTL = [sys.executable, "-m", "worker.cli"]


@pytest.mark.kafka
async def test_a_transaction_timeout_above_the_broker_s_maximum_is_one_line_naming_it(
    topics: Settings, tmp_path: Path
) -> None:
    """JOBS_TRANSACTION_TIMEOUT_MS above the broker's transaction.max.timeout.ms (900000 by
    default) stops `jobctl run` in one line naming both, exit 1, not 'Kafka error: [Error
    50] InvalidTransactionTimeout'."""
    env = {**os.environ, "JOBS_TRANSACTION_TIMEOUT_MS": "900001", "JOBS_HTTP_PORT": "0"}
    args = ["run", "-b", topics.bootstrap_servers, "--prefix", topics.topic_prefix]
    result = await asyncio.to_thread(
        subprocess.run,
        [*JOBCTL, *args, "--db", str(tmp_path / "j.db")],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "JOBS_LOG_FORMAT": "console"},
        check=False,
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert "JOBS_TRANSACTION_TIMEOUT_MS=900001 is above the broker's maximum" in last
    assert "transaction.max.timeout.ms" in last
    assert "Kafka error" not in last
