"""The soak, at a size that proves the point: a steady load, sampled, within its bounds.

The long version is `jobctl bench --soak 30` (README, "Reliability").
"""

from __future__ import annotations

import io
import os

import pytest
from rich.console import Console

from worker.devtools.bench import BenchOptions, with_bench
from worker.devtools.soak import run_soak

pytestmark = pytest.mark.kafka


async def test_a_short_soak_stays_within_its_bounds(kafka_bootstrap: str) -> None:
    """Half a minute at 50 starts/s, a sample every 10 s: memory, lag and p99 stay bounded
    and every interval starts runs."""
    minutes = float(os.environ.get("JOBS_TEST_SOAK_MINUTES", "0.5"))
    out = io.StringIO()

    async def body(bench, environment):  # type: ignore[no-untyped-def]
        return await run_soak(bench, minutes, rate=50, interval_s=10, retention_s=20)

    report = await with_bench(BenchOptions(bootstrap=kafka_bootstrap), Console(file=out), body)
    assert len(report.samples) >= 3
    assert report.failures == [], report.failures
    assert all(s.started > 0 for s in report.samples)
    assert all(s.rss_mb > 0 for s in report.samples)
    Console(file=out, width=120).print(report.table())
    assert "soak at 50 starts/s" in out.getvalue()
