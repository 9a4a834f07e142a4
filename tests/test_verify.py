"""`jobctl verify` over a real history: settings that changed partway, inputs the retention
deleted, a window, one line per divergence and a JSON report."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from aiokafka import TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, RecordsToDelete
from typer.testing import CliRunner, Result

from tests.conftest import RunningWorker
from worker.cli import app
from worker.client import JobClient
from worker.kafkaio import connection
from worker.settings import Settings

pytestmark = pytest.mark.timeout(300)


async def jobctl(s: Settings, *args: str) -> Result:
    """`jobctl <args>` on the test's broker and prefix (in a thread: it runs its own loop)."""
    common = ["-b", s.bootstrap_servers, "--prefix", s.topic_prefix]
    return await asyncio.to_thread(CliRunner().invoke, app, [*args, *common])


async def report_of(s: Settings, *args: str) -> tuple[int, dict[str, Any]]:
    result = await jobctl(s, "verify", "--json", *args)
    return result.exit_code, json.loads(result.stdout.strip().splitlines()[-1])


async def two_settings(topics: Settings, tmp_path: Path) -> tuple[Path, list[str]]:
    """A history decided first with the defaults (`reject`), then, by a worker started on a
    settings file, with `queue`. Returns that file and the run IDs in start order."""
    runs: list[str] = []
    first = await RunningWorker(topics).start()
    try:
        async with JobClient(topics) as client:
            started = await client.start_job("nightly", request_id="a1")
            refused = await client.start_job("nightly", request_id="a2")
            assert started.run_id is not None
            assert refused.run_id is None  # reject
            await client.complete_job("nightly", started.run_id, {"rows": 1})
            runs.append(started.run_id)
    finally:
        await first.stop()
    queue = tmp_path / "queue.toml"
    queue.write_text('[defaults]\npolicy = "queue"\n')
    second = await RunningWorker(topics.model_copy(update={"config": queue})).start()
    try:
        async with JobClient(topics) as client:
            started = await client.start_job("nightly", request_id="b1")
            queued = await client.start_job("nightly", request_id="b2")
            assert started.run_id is not None
            assert queued.run_id is not None
            assert queued.type == "queued"
            await client.complete_job("nightly", started.run_id, {"rows": 2})
            await client.complete_job("nightly", queued.run_id, {"rows": 3})
            runs += [started.run_id, queued.run_id]
    finally:
        await second.stop()
    return queue, runs


async def test_verify_follows_the_settings_in_force_and_answers_what_others_would_have(
    topics: Settings, tmp_path: Path
) -> None:
    """A log decided under two settings verifies clean with no `--config`; with `--config`
    it names, one line each, the decisions those settings would have made otherwise; a
    window verifies from the state the events before it imply."""
    queue, _ = await two_settings(topics, tmp_path)

    clean = await jobctl(topics, "verify")
    assert clean.exit_code == 0, clean.output
    assert "0 divergences" in clean.output
    code, report = await report_of(topics)
    assert code == 0
    assert report["ok"] is True
    assert len(report["settings"]) == 2  # each worker's settings, recorded in the log
    assert report["missing_settings"] == []
    assert report["unrecorded"] == 0

    what_if = await jobctl(topics, "verify", "--config", str(queue))
    assert what_if.exit_code == 1
    lines = [line for line in what_if.stdout.splitlines() if line.startswith("✗")]
    # Under `queue` the second start would have been queued, not refused.
    assert any("logged refused" in line and "now queued" in line for line in lines), lines
    code, what_if_report = await report_of(topics, "--config", str(queue))
    assert code == 1
    assert len(lines) == len(what_if_report["divergences"])

    # A window: the events before it are taken as logged, the rest re-decided from the
    # state they imply.
    code, window = await report_of(topics, "--from-offset", "3")
    assert code == 0, window
    assert window["adopted"] >= 1  # offsets count transaction markers too
    assert window["events"] + window["adopted"] == report["events"] + report["adopted"]
    assert window["events"] < report["events"]
    both = await jobctl(topics, "verify", "--from-offset", "1", "--from-timestamp", "2026-01-01")
    assert both.exit_code == 2  # a usage error
    assert "not both" in both.output


async def test_inputs_the_retention_deleted_are_not_divergences(
    topics: Settings, tmp_path: Path
) -> None:
    """With the first inputs of a partition deleted, their events are taken as logged and
    every later decision is still re-decided and checked."""
    await two_settings(topics, tmp_path)
    admin = AIOKafkaAdminClient(**connection(topics))
    await admin.start()
    try:
        tps = [TopicPartition(topics.topics.requests, p) for p in range(2)]
        ends = await _ends(topics, tps)
        nightly = next(tp for tp in tps if ends[tp] > 0)
        # Delete the first two requests: the first worker's start and its refused repeat.
        await admin.delete_records({nightly: RecordsToDelete(before_offset=2)})
    finally:
        await admin.close()
    code, report = await report_of(topics)
    assert code == 0, report
    assert report["unretained"] == 2
    assert report["adopted"] >= 2
    assert report["inputs"] >= 4  # the later starts and results, re-decided
    result = await jobctl(topics, "verify")
    assert "inputs are no longer retained" in result.stdout


async def _ends(s: Settings, tps: list[TopicPartition]) -> dict[TopicPartition, int]:
    from aiokafka import AIOKafkaConsumer

    consumer = AIOKafkaConsumer(**connection(s))
    await consumer.start()
    try:
        return await consumer.end_offsets(tps)
    finally:
        await consumer.stop()
