"""The Quix Streams reference of `jobctl bench --quix`: an interpreter that has Quix Streams,
and the job lock it runs (`worker.devtools.quixlock`).

Quix Streams pins other versions of packages the project uses (confluent-kafka, pydantic),
so it gets a virtualenv of its own, made once in the cache beside Kafka's jars
(`$JOBS_KAFKA_CACHE`, default `~/.cache/job-orchestrator`) with the version below, and
reused after.
"""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from worker.devtools.latency import BenchError
from worker.devtools.localkafka import cache_dir

QUIX_VERSION = "3.28.1"
LOCK = Path(__file__).with_name("quixlock.py")


def quix_python(say: Callable[[str], None]) -> Path:
    """The interpreter of the Quix Streams virtualenv, made first if it is not there.

    Raises `BenchError` with pip's last lines when it cannot be made.
    """
    venv = cache_dir() / f"quixstreams-{QUIX_VERSION}"
    python = venv / "bin" / "python"
    stamp = venv / ".installed"
    if stamp.exists() and python.exists():
        return python
    say(f"installing Quix Streams {QUIX_VERSION} into {venv} (once)")
    steps = (
        [sys.executable, "-m", "venv", "--clear", str(venv)],
        [str(python), "-m", "pip", "install", "--quiet", f"quixstreams=={QUIX_VERSION}"],
    )
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise BenchError(
                f"could not install Quix Streams {QUIX_VERSION} for --quix "
                f"({' '.join(step[:3])} exited {done.returncode}):\n" + "\n".join(lines)
            )
    stamp.touch()
    return python
