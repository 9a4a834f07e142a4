"""Settings that cannot work stop the command with one line naming the setting: a
transaction timeout above the broker's maximum, a run budget no run fits in."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from worker.settings import MIN_RUN_BYTES, Settings, settings_problems

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


@pytest.mark.parametrize("value", ["100", "527", "0", "-1", "abc", "\udcff", "9" * 40 + "x"])
def test_a_run_budget_no_run_fits_in_is_refused_naming_it_and_the_minimum(
    value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """JOBS_MAX_RUN_BYTES below what one run of the smallest start costs (528) would reject
    every start: refused when the settings are read; hostile values too, naming it."""
    monkeypatch.setenv("JOBS_MAX_RUN_BYTES", value)
    with pytest.raises(ValidationError) as refused:
        Settings()
    assert [e["loc"] for e in refused.value.errors()] == [("max_run_bytes",)]
    said = settings_problems(refused.value)
    assert said.startswith("JOBS_MAX_RUN_BYTES: ")
    if value.lstrip("-").isdigit():
        assert f"at least {MIN_RUN_BYTES}" in said
    monkeypatch.setenv("JOBS_MAX_RUN_BYTES", str(MIN_RUN_BYTES))
    assert Settings().max_run_bytes == MIN_RUN_BYTES


def test_jobctl_says_the_run_budget_s_minimum_in_one_line() -> None:
    """As any setting that cannot work: one line, exit 1, before connecting anywhere."""
    env = {**os.environ, "JOBS_MAX_RUN_BYTES": "100"}
    result = subprocess.run(
        [*JOBCTL, "status"], capture_output=True, text=True, timeout=60, env=env, check=False
    )
    assert result.returncode == 1, result.stderr
    assert result.stderr.strip() == (
        "error: bad settings: JOBS_MAX_RUN_BYTES: at least 528, what one run of the smallest "
        "start request costs (16 bytes, plus 512); a smaller value admits no run"
    )
