"""The benchmark, at its quick size: it completes and reports every figure, the Quix
Streams job lock's too."""

from __future__ import annotations

import io
import json
import math
import os

import pytest
from rich.console import Console

from worker.devtools.bench import BenchOptions, growth_table, pass_rate, run_bench
from worker.devtools.latency import BenchError
from worker.settings import Settings

pytestmark = pytest.mark.kafka


async def test_quick_bench_reports_every_figure(kafka_bootstrap: str) -> None:
    """Every throughput, CPU, latency, restore, memory and replay figure is measured and
    plausible; both consumers saw every measured `started` event."""
    out = io.StringIO()
    options = BenchOptions(bootstrap=kafka_bootstrap, quick=True, quix=True)
    report = await run_bench(options, Console(file=out))

    for figure in (
        report.eos_transitions_per_s,
        report.alo_transitions_per_s,
        report.eos_cpu_us_per_transition,
        report.alo_cpu_us_per_transition,
        report.baseline_records_per_s,
        report.floor_records_per_s,
        report.floor_cpu_us_per_transition,
        report.quix_transitions_per_s,
        report.quix_cpu_us_per_transition,
        report.quix_latency_p50_ms,
        report.quix_latency_p99_ms,
        report.quix_librdkafka_p50_ms,
        report.quix_librdkafka_p99_ms,
        report.latency_achieved_rate,
        report.latency_p50_ms,
        report.latency_p95_ms,
        report.latency_p99_ms,
        report.librdkafka_p50_ms,
        report.librdkafka_p95_ms,
        report.librdkafka_p99_ms,
        report.floor_latency_p50_ms,
        report.floor_latency_p99_ms,
        report.floor_librdkafka_p50_ms,
        report.floor_librdkafka_p99_ms,
        report.latency_cpu_pct,
        report.latency_cpu_us_per_transition,
        report.floor_latency_cpu_pct,
        report.floor_latency_cpu_us_per_transition,
        report.quix_latency_cpu_pct,
        report.quix_latency_cpu_us_per_transition,
        report.joined_new_start_s,
        report.joined_new_p99_ms,
        report.joined_new_librdkafka_p99_ms,
        report.floor_joined_new_p99_ms,
        report.joined_fresh_start_s,
        report.joined_fresh_p99_ms,
        report.joined_fresh_librdkafka_p99_ms,
        report.joined_restarted_start_s,
        report.joined_restarted_p99_ms,
        report.joined_restarted_librdkafka_p99_ms,
        report.floor_joined_fresh_start_s,
        report.floor_joined_fresh_p99_ms,
        report.floor_joined_restarted_p99_ms,
        report.floor_joined_restarted_librdkafka_p99_ms,
        report.restore_seconds,
        report.replay_records_per_s,
        report.client_start_ms,
        report.client_is_running_ms,
        report.client_running_info_ms,
    ):
        assert figure is not None
        assert len(figure.samples) == report.rounds == 1
        assert 0 < figure.low <= figure.median <= figure.high
    assert report.eos_over_baseline > 0
    assert report.floor_over_baseline > 0
    assert report.latency_p50_ms.median <= report.latency_p95_ms.median
    assert report.latency_p95_ms.median <= report.latency_p99_ms.median
    assert report.latency_requests > 0
    assert report.latency_aiokafka_seen == report.latency_requests
    assert report.latency_librdkafka_seen == report.latency_requests
    assert report.librdkafka_p50_ms.median <= report.librdkafka_p95_ms.median
    assert report.librdkafka_p95_ms.median <= report.librdkafka_p99_ms.median
    assert report.floor_latency_p50_ms.median <= report.floor_latency_p99_ms.median
    # A transition costs the worker some CPU, and less than a second of it.
    assert 0 < report.eos_cpu_us_per_transition.median < 1_000_000
    # In the latency rounds each process used some CPU, and at most every core there is.
    for share in (report.latency_cpu_pct, report.floor_latency_cpu_pct):
        assert 0 < share.high <= 100 * (os.cpu_count() or 1)
    assert report.joined_seconds == 2.0
    assert report.restored_runs == report.restore_runs_requested == 300
    assert report.restored_records > 0
    assert report.peak_rss_mb > 0
    assert report.restart_peak_rss_mb > 0
    assert report.restore_peak_rss_mb > 0
    assert report.history_in_flight == 100  # 300 runs made with at most 100 outstanding
    assert report.replay_processes >= 1
    for figure in (report.status_marked_s, report.status_whole_s):  # rounds + 2 runs each
        assert len(figure.samples) == 3
        assert 0 < figure.low <= figure.median <= figure.high

    # The growth table: its quick sizes, each measured; costs and exponents are numbers.
    assert [row.job_types for row in report.growth] == [100, 300]
    for row in report.growth:
        assert row.transitions_per_s > 0
        assert 0 < row.cpu_us_per_transition < 1_000_000
        assert row.retained_runs == row.job_types + 300  # the history and the measured runs
        for seconds in (row.restore_s, row.restart_s, row.status_marked_s, row.status_whole_s):
            assert seconds > 0
        assert min(row.making_peak_rss_mb, row.restore_peak_rss_mb, row.restart_peak_rss_mb) > 0
        assert row.replay_records_per_s > 0
    exponents = json.loads(json.dumps(report.to_json()))["growth_exponents"]
    assert all(math.isfinite(k) for k in exponents.values())
    Console(file=out, width=160).print(growth_table(report.growth))
    assert "300 job types" in out.getvalue()

    # The report serializes and renders.
    assert json.loads(json.dumps(report.to_json()))["restored_runs"] == 300
    Console(file=out, width=120).print(report.table())
    assert "exactly_once" in out.getvalue()
    assert "contract floor ÷ baseline" in out.getvalue()
    assert "contract floor CPU" in out.getvalue()
    assert "Quix Streams job lock CPU" in out.getvalue()
    assert "Quix Streams job lock latency p99, librdkafka" in out.getvalue()
    assert "contract floor latency p99, librdkafka" in out.getvalue()
    assert "contract floor CPU in the latency rounds" in out.getvalue()
    assert "Quix Streams job lock CPU in the latency rounds" in out.getvalue()
    assert "peak RSS, 300 runs (≤ 100 in flight)" in out.getvalue()
    assert "peak RSS, restarted on them" in out.getvalue()
    assert "peak RSS, restoring them" in out.getvalue()
    assert "client is_job_running p50" in out.getvalue()
    assert "worker CPU, exactly_once" in out.getvalue()
    assert "latency p99, librdkafka" in out.getvalue()
    assert "jobctl status, 300 ended runs, from its view mark" in out.getvalue()
    assert "worker, restarted on its file: p99, first 2 s, librdkafka" in out.getvalue()
    assert "worker, fresh, on new topics: p99, first 2 s, aiokafka" in out.getvalue()
    assert "contract floor, fresh, on served topics: p99, first 2 s, aiokafka" in out.getvalue()


def test_a_pass_the_reader_saw_in_one_fetch_is_timed_from_its_first_step() -> None:
    """The baseline's records/s: from the first fetch to the last; when one fetch held it
    all (a quick run's few hundred records), from the pass's first committing step."""
    assert pass_rate(1_000, 10.0, 10.5, 9.0) == 2_000
    assert pass_rate(1_000, 10.0, 10.0, 9.5) == 2_000
    for first_step in (None, 10.0, 10.5):
        with pytest.raises(BenchError, match="too few records"):
            pass_rate(1_000, 10.0, 10.0, first_step)
    with pytest.raises(BenchError, match="too few records"):
        pass_rate(1_000, None, None, 9.0)


def test_a_bench_worker_connects_with_every_connection_setting_of_the_bench(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The worker processes the bench starts get every connection setting it was given,
    the secrets too (an encrypted client key's password was left out): read back from
    the environment they make, the same settings."""
    from worker.devtools.bench import _connection_env

    given = Settings(
        bootstrap_servers="kafka:9093",
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism="PLAIN",
        sasl_username="bench",
        sasl_password="s3cret",
        ssl_key_password="key-s3cret",
    )
    for name in [n for n in os.environ if n.startswith("JOBS_")]:
        monkeypatch.delenv(name)
    for name, value in _connection_env(given).items():
        monkeypatch.setenv(name, value)
    read = Settings()
    fields = ("bootstrap_servers", "security_protocol", "sasl_mechanism", "sasl_username")
    assert [getattr(read, f) for f in fields] == [getattr(given, f) for f in fields]
    assert read.password() == "s3cret"
    assert read.ssl_key_password is not None
    assert read.ssl_key_password.get_secret_value() == "key-s3cret"
