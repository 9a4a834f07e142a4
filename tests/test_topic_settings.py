"""Topics that exist with settings the worker does not work with: `jobctl topics create`
and `describe` name them and the fix; the worker warns of what the broker will delete."""

from __future__ import annotations

import asyncio

import structlog
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from typer.testing import CliRunner

from tests.conftest import RunningWorker
from worker.cli import app
from worker.engine.topics import TOPIC_CONFIGS
from worker.kafkaio import connection
from worker.settings import Settings

runner = CliRunner()
WEEK = "604800000"


async def _make(settings: Settings, configs: dict[str, dict[str, str]]) -> None:
    admin = AIOKafkaAdminClient(**connection(settings))
    await admin.start()
    try:
        await admin.create_topics(
            [
                NewTopic(name, 2, 1, topic_configs=configs.get(name, {}))
                for name in settings.topics.all()
            ]
        )
    finally:
        await admin.close()


def _wrong(settings: Settings) -> dict[str, dict[str, str]]:
    """Inputs stamped by producers, a status topic with a week's retention, a state topic
    that is not compacted."""
    t = settings.topics
    return {
        t.requests: {"message.timestamp.type": "CreateTime"},
        t.results: dict(TOPIC_CONFIGS["results"]),
        t.status: {"retention.ms": WEEK},
        t.state: {"cleanup.policy": "delete"},
    }


def test_topics_create_and_describe_name_settings_the_worker_does_not_work_with(
    settings: Settings,
) -> None:
    """`topics create` on such topics still says `exists`, then exits 1 naming each wrong
    setting and the kafka-configs command; `describe` shows what the broker has, marked."""
    asyncio.run(_make(settings, _wrong(settings)))
    t = settings.topics
    base = ["-b", settings.bootstrap_servers, "--prefix", settings.topic_prefix]
    created = runner.invoke(app, ["topics", "create", "--partitions", "2", *base])
    assert created.exit_code == 1, created.output
    assert created.output.count(": exists") == 5, created.output
    said = " ".join(created.output.split())
    assert f"{t.requests} has message.timestamp.type=CreateTime, needs LogAppendTime" in said
    assert f"{t.status} has retention.ms={WEEK}, needs -1" in said
    assert f"{t.state} has cleanup.policy=delete, needs compact" in said
    assert t.results not in said.split("exists")[-1]  # its settings are right
    assert f"--entity-name {t.status} --add-config retention.ms=-1" in said
    assert "kafka-configs.sh" in said

    described = runner.invoke(app, ["topics", "describe", *base])
    assert described.exit_code == 1, described.output
    shown = " ".join(described.output.split())
    assert "retention.ms=" + WEEK in shown
    assert "(needs -1)" in shown
    assert "cleanup.policy=delete" in shown
    assert "(needs compact)" in shown
    assert "message.timestamp.type=CreateTime" in shown
    assert "(needs LogAppendTime)" in shown


def test_topics_create_and_describe_pass_topics_it_made(settings: Settings) -> None:
    """Topics `topics create` made have what the worker needs: both commands exit 0, and
    describe shows the broker's values, unmarked."""
    base = ["-b", settings.bootstrap_servers, "--prefix", settings.topic_prefix]
    assert runner.invoke(app, ["topics", "create", "--partitions", "2", *base]).exit_code == 0
    again = runner.invoke(app, ["topics", "create", "--partitions", "2", *base])
    assert again.exit_code == 0, again.output
    described = runner.invoke(app, ["topics", "describe", *base])
    assert described.exit_code == 0, described.output
    shown = " ".join(described.output.split())
    assert "needs" not in shown
    assert "retention.ms=-1" in shown
    assert "cleanup.policy=compact" in shown


async def test_the_worker_warns_of_a_status_topic_with_retention_and_a_state_not_compacted(
    settings: Settings,
) -> None:
    """The worker starts on such topics (its input topics right) and says, in one warning,
    which settings let the broker delete what it needs kept, and how to set them."""
    configs = _wrong(settings)
    configs[settings.topics.requests] = dict(TOPIC_CONFIGS["requests"])
    await _make(settings, configs)
    with structlog.testing.capture_logs() as logs:
        running = await RunningWorker(settings).start()
        await running.stop()
    warned = [e for e in logs if e["log_level"] == "warning" and "kept" in e["event"]]
    assert len(warned) == 1, logs
    (line,) = warned
    assert f"{settings.topics.status} has retention.ms={WEEK}, needs -1" in line["event"]
    assert f"{settings.topics.state} has cleanup.policy=delete, needs compact" in line["event"]
    assert "kafka-configs.sh" in line["fix"]


async def test_the_worker_does_not_warn_on_topics_made_as_it_needs(topics: Settings) -> None:
    """Topics made with the worker's settings give no such warning."""
    with structlog.testing.capture_logs() as logs:
        running = await RunningWorker(topics).start()
        await running.stop()
    assert not [e for e in logs if "kept" in str(e.get("event"))], logs
