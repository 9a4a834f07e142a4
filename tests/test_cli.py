"""`jobctl` as a user runs it: output, exit codes, and the errors that say what to fix."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from typer.testing import CliRunner

from worker.cli import app
from worker.engine.topics import wait_for_leaders
from worker.settings import Topics

pytestmark = pytest.mark.kafka
runner = CliRunner()
JOBCTL = [sys.executable, "-m", "worker.cli"]


def test_topics_create_is_idempotent_and_describe_lists_them(
    kafka_bootstrap: str, prefix: str
) -> None:
    """Creating topics twice succeeds; describe shows all five with their partition count."""
    args = ["topics", "create", "--partitions", "3", "-b", kafka_bootstrap, "--prefix", prefix]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert first.output.count("created") == 5
    second = runner.invoke(app, args)
    assert second.exit_code == 0, second.output
    assert second.output.count("exists") == 5
    described = runner.invoke(
        app, ["topics", "describe", "-b", kafka_bootstrap, "--prefix", prefix]
    )
    assert described.exit_code == 0, described.output
    for role in ("requests", "results", "status", "state", "dlq"):
        assert re.search(rf"{re.escape(prefix)}\.{role}\s.*\b3\b", described.output)
    assert "LogAppendTime" in described.output
    assert "compact" in described.output


def test_topics_create_refuses_another_partition_count(kafka_bootstrap: str, prefix: str) -> None:
    """Asking for another count than the existing topics have fails and names each topic."""
    base = ["topics", "create", "-b", kafka_bootstrap, "--prefix", prefix]
    assert runner.invoke(app, [*base, "--partitions", "2"]).exit_code == 0
    clash = runner.invoke(app, [*base, "--partitions", "4"])
    assert clash.exit_code == 1
    assert f"{prefix}.requests has 2" in clash.output
    assert "same count" in clash.output


def test_topics_describe_reports_missing_topics(kafka_bootstrap: str, prefix: str) -> None:
    """Describing topics that do not exist says so and how to create them."""
    result = runner.invoke(app, ["topics", "describe", "-b", kafka_bootstrap, "--prefix", prefix])
    assert result.exit_code == 1
    assert "jobctl topics create" in result.output


def test_unreachable_broker_is_one_clear_line() -> None:
    """A bootstrap address where nothing listens gives one error line and exit code 1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = subprocess.run(
        [*JOBCTL, "topics", "describe", "-b", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "cannot connect to Kafka" in result.stderr
    assert "JOBS_BOOTSTRAP_SERVERS" in result.stderr
    assert "Traceback" not in result.stderr


def test_schemas_on_disk_are_current() -> None:
    """`jobctl schemas export --check` passes on the committed schema files."""
    result = runner.invoke(app, ["schemas", "export", "--check"])
    assert result.exit_code == 0, result.output


def test_schemas_check_fails_on_stale_files(tmp_path: Path) -> None:
    """`--check` fails and names the stale file when a schema on disk differs."""
    assert runner.invoke(app, ["schemas", "export", "--dir", str(tmp_path)]).exit_code == 0
    (tmp_path / "status_event.schema.json").write_text("{}")
    result = runner.invoke(app, ["schemas", "export", "--dir", str(tmp_path), "--check"])
    assert result.exit_code == 1
    assert "status_event.schema.json" in result.output


def test_broker_without_java_says_what_to_install(tmp_path: Path) -> None:
    """Without `java` on PATH, `jobctl broker` names what to install and exits non-zero."""
    env = {**os.environ, "PATH": str(tmp_path)}
    result = subprocess.run(
        [*JOBCTL, "broker"], capture_output=True, text=True, env=env, timeout=60, check=False
    )
    assert result.returncode == 1
    assert "`java` was not found" in result.stderr
    assert "Traceback" not in result.stderr


def test_failed_download_is_reported(tmp_path: Path) -> None:
    """When Maven cannot fetch the jars, the error says so and shows Maven's own words."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    mvn = bin_dir / "mvn"
    mvn.write_text("#!/bin/sh\necho 'Could not resolve org.apache.kafka:kafka_2.13' >&2\nexit 1\n")
    mvn.chmod(0o755)
    java = subprocess.run(["which", "java"], capture_output=True, text=True, check=True)
    (bin_dir / "java").symlink_to(java.stdout.strip())
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:/usr/bin:/bin",
        "JOBS_KAFKA_CACHE": str(tmp_path / "cache"),
    }
    result = subprocess.run(
        [*JOBCTL, "broker", "--fetch-only"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert "Maven could not download Apache Kafka" in result.stderr
    assert "Could not resolve" in result.stderr
    assert not (tmp_path / "cache" / "kafka_2.13-4.1.1" / ".complete").exists()


def test_broker_prints_its_address_and_stops_on_ctrl_c() -> None:
    """`jobctl broker` prints 127.0.0.1:PORT, serves it, and on Ctrl-C stops the JVM."""
    with subprocess.Popen(
        [*JOBCTL, "broker"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # As from a terminal: a shell without job control starts background commands (such
        # as a test run under `nohup ... &`) with SIGINT ignored, and the child inherits it.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    ) as proc:
        try:
            assert proc.stdout is not None
            address = None
            for line in proc.stdout:
                if re.fullmatch(r"127\.0\.0\.1:\d+", line.strip()):
                    address = line.strip()
                    break
            assert address is not None, proc.stderr.read() if proc.stderr else ""
            port = int(address.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=5):
                pass
            proc.send_signal(signal.SIGINT)
            # communicate() drains both pipes, so a chatty shutdown cannot block on them.
            out, errors = proc.communicate(timeout=60)
            assert proc.returncode == 0, f"{out}\n{errors}"
            with (
                pytest.raises(ConnectionRefusedError),
                socket.create_connection(("127.0.0.1", port), timeout=2),
            ):
                pass
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def test_demo_plays_its_scenario(kafka_bootstrap: str) -> None:
    """The demo runs its scenario on a broker, prints events and runs, and exits 0."""
    result = subprocess.run(
        [*JOBCTL, "demo", "--bootstrap", kafka_bootstrap],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for text in ("refused", "failed", "malformed_json", "rejected", "every outcome matched"):
        assert text in result.stdout


def test_run_refuses_mismatched_partition_counts(
    kafka_bootstrap: str, prefix: str, tmp_path: Path
) -> None:
    """`jobctl run` on topics with differing partition counts exits 1 naming each count."""
    topics = Topics.for_prefix(prefix)

    async def make() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        try:
            await admin.create_topics(
                [NewTopic(n, 3 if n == topics.dlq else 2, 1) for n in topics.all()]
            )
            await wait_for_leaders(admin, list(topics.all()))
        finally:
            await admin.close()

    asyncio.run(make())
    result = subprocess.run(
        [*JOBCTL, "run", "-b", kafka_bootstrap, "--prefix", prefix, "--db", str(tmp_path / "j.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"{prefix}.dlq=3" in result.stderr
    assert f"{prefix}.requests=2" in result.stderr
    assert "Traceback" not in result.stderr


def test_run_refuses_an_invalid_settings_file(tmp_path: Path) -> None:
    """`jobctl run` with an invalid TOML file exits 1 naming the file, the line and the field."""
    bad = tmp_path / "jobs.toml"
    bad.write_text('[defaults]\npolicy = "reject"\n\n[job_types.etl]\npolicy = "sometimes"\n')
    result = subprocess.run(
        [*JOBCTL, "run", "--config", str(bad), "--db", str(tmp_path / "j.db")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 1
    assert f"{bad}:5:" in result.stderr
    assert "job_types.etl.policy" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_shell_completion_are_offered() -> None:
    """`jobctl --version` prints the installed version; --help offers shell completion."""
    from importlib.metadata import version

    shown = subprocess.run(
        [*JOBCTL, "--version"], capture_output=True, text=True, timeout=60, check=False
    )
    assert shown.returncode == 0
    assert shown.stdout.strip() == f"jobctl {version('job-orchestrator')}"
    helped = subprocess.run(
        [*JOBCTL, "--help"], capture_output=True, text=True, timeout=60, check=False
    )
    assert "--install-completion" in helped.stdout


@pytest.mark.parametrize(
    "sizes",
    ["abc", "-5", "1,,2", "0", "1000,x", "\udcff\udcfe", "9" * 5000, "1" + "0" * 9, "1e6", "[[[["],
)
def test_bench_refuses_growth_sizes_it_cannot_run(sizes: str) -> None:
    """`--growth` takes counts from 1 to 10,000,000: anything else is one line naming the
    option, before a broker is started."""
    result = runner.invoke(app, ["bench", "--growth", sizes])
    assert result.exit_code == 1
    assert "--growth takes counts from 1 to 10,000,000" in result.output
    assert "starting a local Kafka broker" not in result.output
    assert len(result.output.strip().splitlines()) == 1


def test_bench_growth_only_needs_sizes() -> None:
    """`--growth-only` with `--growth none` has nothing to measure: one line, no broker."""
    result = runner.invoke(app, ["bench", "--growth-only", "--growth", "none"])
    assert result.exit_code == 1
    assert "--growth-only needs sizes" in result.output
    assert "starting a local Kafka broker" not in result.output
