"""`jobctl demo`: a scripted scenario on a real broker, checked step by step.

The demo runs a worker, a producer (`JobClient`) and an executor (`worker.client.executor`) in this
process against a real broker, prints each status event as the orchestrator publishes it,
then a table of runs from the worker's SQLite file. It returns the list of steps whose outcome
differed from the script.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console
from rich.table import Table
from rich.text import Text

from schemas import DeadLetter, EventType, StatusEvent
from worker.client import JobClient, JobRejectedError
from worker.client.executor import Executor, RunContext
from worker.client.watch import Item, StatusTail
from worker.engine import topics as topic_admin
from worker.engine.loop import Worker
from worker.engine.store import Store
from worker.kafkaio import connection
from worker.settings import Settings, Topics
from worker.shown import shown


def _print_item(console: Console) -> Callable[[Item], None]:
    colours = {
        EventType.STARTED: "green",
        EventType.COMPLETED: "bold green",
        EventType.REFUSED: "yellow",
        EventType.FAILED: "red",
        EventType.REJECTED: "magenta",
    }

    def show(item: Item) -> None:
        # The events' and dead letters' text is the inputs' (the scenario sends bad ones on
        # purpose): `shown`, never markup.
        if isinstance(item, StatusEvent):
            line = Text.assemble(
                "  ",
                (f"{item.type:<9}", colours.get(item.type, "white")),
                " ",
                shown(f"{item.job_type:<14} run={item.run_id} status={item.status}"),
            )
            if item.metrics:
                line.append_text(shown(f" metrics={json.dumps(item.metrics)}"))
            if item.reason:
                line.append_text(shown(f" — {item.reason}"))
        else:
            source = item.source
            line = Text.assemble(
                "  ",
                ("dead-letter", "red"),
                " ",
                shown(
                    f"{item.reason.code}: {item.reason.message} "
                    f"(from {source.topic}[{source.partition}]@{source.offset})"
                ),
            )
        console.print(line)

    return show


async def run_demo(bootstrap: str, console: Console) -> list[str]:
    """Play the scenario against `bootstrap`; return the failures (empty when all went well)."""
    prefix = f"demo-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="jobs-demo-") as tmp:
        settings = Settings(
            bootstrap_servers=bootstrap,
            topic_prefix=prefix,
            db_path=Path(tmp) / "demo.db",
            http_port=0,  # the scenario needs no endpoints, and 8080 may be taken
        )
        # JOBS_SECURITY_PROTOCOL and friends, from the environment, for a given cluster.
        kafka = connection(settings)
        admin = AIOKafkaAdminClient(**kafka)
        await admin.start()
        try:
            await topic_admin.create(admin, settings.topics, partitions=3)
        finally:
            await admin.close()
        console.print(f"[bold]topics[/] {', '.join(settings.topics.all())} (3 partitions)")

        worker = Worker(settings)
        stop = asyncio.Event()
        worker_task = asyncio.create_task(worker.run(stop))
        producer = AIOKafkaProducer(acks="all", **kafka)
        await producer.start()
        tail = StatusTail(kafka, settings.topics, on_item=_print_item(console))
        await tail.start()
        failures: list[str] = []
        try:
            await asyncio.wait_for(worker.ready.wait(), 60)
            failures = await _scenario(settings, producer, tail, console)
        finally:
            await tail.stop()
            await producer.stop()
            stop.set()
            await worker_task

        store = await Store.open(settings.db_path)
        try:
            runs = await store.runs()
        finally:
            await store.close()
        table = Table(title="runs recorded by the worker")
        for column in ("run ID", "job type", "status", "metrics"):
            table.add_column(column)
        for run in sorted(runs, key=lambda r: r.run_id):
            table.add_row(run.run_id, run.job_type, run.status, json.dumps(run.metrics or {}))
        console.print(table)
        expected = {"COMPLETED": 3, "FAILED": 1}
        got: dict[str, int] = {}
        for run in runs:
            got[run.status] = got.get(run.status, 0) + 1
        if got != expected:
            failures.append(f"runs by status: expected {expected}, recorded {got}")
        return failures


async def _scenario(
    settings: Settings, producer: AIOKafkaProducer, tail: StatusTail, console: Console
) -> list[str]:
    topics = settings.topics
    failures: list[str] = []
    gates = {"report.daily": asyncio.Event(), "index.rebuild": asyncio.Event()}

    async with JobClient(settings) as jobs:
        executor = Executor(jobs)

        @executor.job("report.daily")
        async def report(run: RunContext) -> dict[str, Any]:
            await gates["report.daily"].wait()  # held until the script has shown a refusal
            return {"rows": 1200 if run.initial_data.get("day") == "2026-11-27" else 1310}

        @executor.job("email.digest")
        async def digest(run: RunContext) -> dict[str, Any]:
            raise RuntimeError("SMTP timeout")

        @executor.job("index.rebuild")
        async def rebuild(run: RunContext) -> dict[str, Any]:
            await run.progress({"documents": 21})
            await gates["index.rebuild"].wait()
            return {"documents": 42}

        stop = asyncio.Event()
        executing = asyncio.create_task(executor.run(stop))
        try:
            await asyncio.wait_for(executor.ready.wait(), 60)
            failures = await _play(jobs, producer, topics, tail, gates, console)
        finally:
            stop.set()
            await executing
    return failures


async def _play(
    jobs: JobClient,
    producer: AIOKafkaProducer,
    topics: Topics,
    tail: StatusTail,
    gates: dict[str, asyncio.Event],
    console: Console,
) -> list[str]:
    failures: list[str] = []

    def step(title: str) -> None:
        console.print(f"[bold cyan]▶ {title}[/]")

    async def expect(what: str, **fields: Any) -> StatusEvent | None:
        try:
            return await tail.wait_event(timeout=30, **fields)
        except TimeoutError:
            failures.append(f"{what}: no event with {fields} within 30 s")
            return None

    step("start report.daily")
    daily = await jobs.start_job("report.daily", initial_data={"day": "2026-11-27"})
    step("start report.daily again while it runs")
    again = await jobs.start_job("report.daily", initial_data={"day": "2026-11-28"})
    if not daily.started or not again.already_running:
        failures.append("the second start of report.daily was not refused")
    elif again.running_run_id != daily.run_id or again.run_id is not None:
        failures.append("the refusal does not name the running run")
    step("the executor finishes report.daily")
    gates["report.daily"].set()
    await expect("report.daily completes", run_id=daily.run_id, type=EventType.COMPLETED)

    step("start email.digest for client acme; its executor raises")
    digest = await jobs.start_job("email.digest", client_id="acme")
    failed = await expect("email.digest fails", run_id=digest.run_id, type=EventType.FAILED)
    if failed is not None and "SMTP timeout" not in str(failed.metrics):
        failures.append("the failure does not carry the executor's error")

    step("a producer sends malformed JSON")
    sent = await producer.send_and_wait(
        topics.requests, b'{"job_type": "index.rebuild", oops', key=b"index.rebuild"
    )

    def is_letter(item: Item) -> bool:
        return (
            isinstance(item, DeadLetter)
            and item.source.partition == sent.partition
            and item.source.offset == sent.offset
            and item.reason.code == "malformed_json"
        )

    try:
        await tail.wait_for(is_letter, timeout=30)
    except TimeoutError:
        failures.append("the malformed message was not dead-lettered")

    step("an executor reports a result for a run that does not exist")
    try:
        await jobs.complete_job("index.rebuild", "261128-120000-0.999")
        failures.append("a result for an unknown run was accepted")
    except JobRejectedError:
        pass

    step("start index.rebuild; it reports progress, then completes")
    index = await jobs.start_job("index.rebuild")
    await expect("index.rebuild progress", run_id=index.run_id, type=EventType.PROGRESS)
    gates["index.rebuild"].set()
    await expect("index.rebuild completes", run_id=index.run_id, type=EventType.COMPLETED)

    step("start report.daily once more: the slot is free again")
    last = await jobs.start_job("report.daily", initial_data={"day": "2026-11-28"})
    if not last.started:
        failures.append("report.daily did not start after its run ended")
    else:
        await expect("report.daily completes again", run_id=last.run_id, type="completed")
    return failures
