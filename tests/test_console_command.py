"""`jobctl serve`'s own failures: one line, and the command that makes missing topics in
full, with the --prefix (and --bootstrap) it was given."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.kafka
JOBCTL = [sys.executable, "-m", "worker.cli"]


@pytest.mark.parametrize("cancelling", [False, True])
def test_serve_without_topics_names_the_command_that_makes_them_in_full(
    kafka_bootstrap: str, prefix: str, tmp_path: Path, cancelling: bool
) -> None:
    """No topics under --prefix: exit 1 in one line giving `jobctl topics create --prefix
    <it>`, not the bare command (which would make `jobs.*`)."""
    args = ["serve", "-b", kafka_bootstrap, "--prefix", prefix, "--port", "0"]
    args += ["--db", str(tmp_path / "console.db"), *(["--allow-cancel"] if cancelling else [])]
    result = subprocess.run(
        [*JOBCTL, *args], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    assert f"jobctl topics create --prefix {prefix}" in result.stderr
