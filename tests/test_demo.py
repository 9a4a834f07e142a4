"""`jobctl demo` on the broker JOBS_BOOTSTRAP_SERVERS names."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka


def test_demo_plays_on_the_broker_of_jobs_bootstrap_servers(
    kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Without --bootstrap, the demo uses JOBS_BOOTSTRAP_SERVERS' broker and starts none:
    with no `java` on PATH it could not start one."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("JOBS_")}
    env.update(JOBS_BOOTSTRAP_SERVERS=kafka_bootstrap, PATH=str(tmp_path))
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "demo"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"using the broker at {kafka_bootstrap}" in result.stdout
    assert "starting" not in result.stdout
    assert "every outcome matched" in result.stdout
