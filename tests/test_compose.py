"""docker-compose.yml, Prometheus and Grafana files agree with the code they run.

No Docker engine is needed: the files are read and checked against the settings, the
worker's HTTP endpoints and the metrics it exports.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from worker.engine.observe import Metrics
from worker.settings import Settings

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
SERVICES: dict[str, Any] = COMPOSE["services"]


def exported_metrics() -> set[str]:
    """Every series name the worker's registry exposes (counters with `_total`, histograms
    with `_bucket`, `_sum`, `_count`)."""
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for family in Metrics().registry.collect():
        names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def test_every_jobs_variable_is_a_setting() -> None:
    """Each `JOBS_*` the compose file sets is a setting the code reads."""
    known = {f"JOBS_{name.upper()}" for name in Settings.model_fields}
    for name, service in SERVICES.items():
        for variable in service.get("environment", {}):
            if variable.startswith("JOBS_"):
                assert variable in known, f"{name}: {variable} is not a setting"


def test_images_are_pinned() -> None:
    """Every image names a version: no `latest`, no bare name."""
    for name, service in SERVICES.items():
        if "image" in service:
            image = service["image"]
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: {image} is not pinned"
            assert not image.endswith(":latest"), f"{name}: {image}"


def test_the_worker_is_checked_on_its_real_endpoint_and_kept_running() -> None:
    """The health check asks /healthz on the port the worker serves; it restarts on failure;
    Kafka and SQLite keep their data in volumes."""
    worker = SERVICES["worker"]
    port = worker["environment"]["JOBS_HTTP_PORT"]
    probe = " ".join(worker["healthcheck"]["test"])
    assert f"http://localhost:{port}/healthz" in probe
    assert worker["restart"] == "unless-stopped"
    assert any(v.endswith(":/data") for v in worker["volumes"])
    assert "/data/jobs.db" in worker["command"]
    kafka = SERVICES["kafka"]
    log_dirs = kafka["environment"]["KAFKA_LOG_DIRS"]
    assert any(v.endswith(f":{log_dirs}") for v in kafka["volumes"])
    assert set(COMPOSE["volumes"]) >= {"kafka-data", "worker-data"}


def test_the_image_runs_unprivileged_with_its_file_in_the_volume() -> None:
    """The image's last stage runs as a user of its own, which owns /data (the worker's
    volume, which starts with the image's ownership), its default SQLite file is there, and
    it exposes the HTTP port the compose file maps."""
    final = (ROOT / "Dockerfile").read_text().rsplit("\nFROM ", 1)[1]
    assert "\nUSER jobs\n" in final
    assert "chown jobs /data" in final
    assert "JOBS_DB_PATH=/data/jobs.db" in final
    port = SERVICES["worker"]["environment"]["JOBS_HTTP_PORT"]
    assert f"\nEXPOSE {port}\n" in final


def test_the_executor_runs_the_example() -> None:
    """The example executor service runs a module that exists and has a main block."""
    command = SERVICES["executor"]["command"]
    assert command[:2] == ["python", "-m"]
    module = ROOT / (command[2].replace(".", "/") + ".py")
    assert 'if __name__ == "__main__":' in module.read_text()
    assert "COPY examples" in (ROOT / "Dockerfile").read_text()


def test_prometheus_scrapes_the_worker() -> None:
    """Prometheus' target is the worker service on its HTTP port, behind the profile."""
    config = yaml.safe_load((ROOT / "deploy" / "prometheus.yml").read_text())
    targets = [
        t for job in config["scrape_configs"] for s in job["static_configs"] for t in s["targets"]
    ]
    port = SERVICES["worker"]["environment"]["JOBS_HTTP_PORT"]
    assert targets == [f"worker:{port}"]
    assert (
        SERVICES["prometheus"]["profiles"] == SERVICES["grafana"]["profiles"] == ["observability"]
    )


def test_the_dashboard_asks_for_metrics_the_worker_exports() -> None:
    """Every query of the provisioned dashboard names exported series, and it shows events
    by type, p99 commit latency, lag and active runs."""
    dashboard = json.loads(
        (ROOT / "deploy" / "grafana" / "dashboards" / "job-orchestrator.json").read_text()
    )
    exported = exported_metrics()
    queries = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    for query in queries:
        named = set(re.findall(r"\bjobs_[a-z_]+\b", query))
        assert named, query
        assert named <= exported, f"{query}: {named - exported} not exported"
    joined = " ".join(queries)
    for needed in (
        "jobs_status_events_total",
        "jobs_commit_seconds_bucket",
        "jobs_consumer_lag",
        "jobs_active_runs",
    ):
        assert needed in joined
    assert "histogram_quantile(0.99" in joined
    provisioning = yaml.safe_load(
        (
            ROOT / "deploy" / "grafana" / "provisioning" / "dashboards" / "job-orchestrator.yml"
        ).read_text()
    )
    mounted = {v.split(":")[1] for v in SERVICES["grafana"]["volumes"]}
    assert provisioning["providers"][0]["options"]["path"] in mounted


def test_the_stack_publishes_its_ports_on_the_loopback_interface_only() -> None:
    """Kafka without authentication and Grafana without login are not offered to the
    network the host is on: every published port is bound to 127.0.0.1."""
    published = [
        port for service in COMPOSE["services"].values() for port in service.get("ports", [])
    ]
    assert published, "the stack publishes no port"
    assert all(str(port).startswith("127.0.0.1:") for port in published), published
