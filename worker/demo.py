"""`jobctl demo`: a scripted scenario on a real broker, checked step by step.

The demo plays a producer and an executor against a worker running in this process, prints
each status event as the orchestrator publishes it, then a table of runs from the worker's
SQLite file. It returns the list of steps whose outcome differed from the script.
"""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from rich.console import Console
from rich.table import Table

from schemas import DeadLetter, EventType, StatusEvent
from worker import topics as topic_admin
from worker.runner import Worker
from worker.settings import Settings
from worker.store import Store
from worker.watch import Item, StatusTail


@dataclass
class Step:
    """One line of the script: what is sent and what must come back."""

    title: str
    expect: str


def _print_item(console: Console) -> Callable[[Item], None]:
    colours = {
        EventType.STARTED: "green",
        EventType.COMPLETED: "bold green",
        EventType.REFUSED: "yellow",
        EventType.FAILED: "red",
        EventType.REJECTED: "magenta",
    }

    def show(item: Item) -> None:
        if isinstance(item, StatusEvent):
            colour = colours.get(item.type, "white")
            extra = f" metrics={json.dumps(item.metrics)}" if item.metrics else ""
            reason = f" — {item.reason}" if item.reason else ""
            console.print(
                f"  [{colour}]{item.type:<9}[/] {item.job_type:<14} run={item.run_id}"
                f" status={item.status}{extra}{reason}"
            )
        else:
            console.print(
                f"  [red]dead-letter[/] {item.reason.code}: {item.reason.message} "
                f"(from {item.source.topic}[{item.source.partition}]@{item.source.offset})"
            )

    return show


async def run_demo(bootstrap: str, console: Console) -> list[str]:
    """Play the scenario against `bootstrap`; return the failures (empty when all went well)."""
    prefix = f"demo-{uuid.uuid4().hex[:6]}"
    with tempfile.TemporaryDirectory(prefix="jobs-demo-") as tmp:
        settings = Settings(
            bootstrap_servers=bootstrap, topic_prefix=prefix, db_path=Path(tmp) / "demo.db"
        )
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            await topic_admin.create(admin, settings.topics, partitions=3)
        finally:
            await admin.close()
        console.print(f"[bold]topics[/] {', '.join(settings.topics.all())} (3 partitions)")

        worker = Worker(settings)
        stop = asyncio.Event()
        worker_task = asyncio.create_task(worker.run(stop))
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
        await producer.start()
        tail = StatusTail(bootstrap, settings.topics, on_item=_print_item(console))
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

    async def request(job_type: str, **fields: Any) -> str:
        request_id = fields.pop("request_id", None) or str(uuid.uuid4())
        body = {"job_type": job_type, "request_id": request_id, **fields}
        await producer.send_and_wait(
            topics.requests, json.dumps(body).encode(), key=job_type.encode()
        )
        return request_id

    async def result(job_type: str, run_id: str, status: str, metrics: dict[str, Any]) -> str:
        request_id = str(uuid.uuid4())
        body = {
            "job_type": job_type,
            "run_id": run_id,
            "status": status,
            "final_metrics": metrics,
            "request_id": request_id,
        }
        await producer.send_and_wait(
            topics.results, json.dumps(body).encode(), key=job_type.encode()
        )
        return request_id

    async def expect(step: str, **fields: Any) -> StatusEvent | None:
        console.print(f"[bold cyan]▶ {step}[/]")
        try:
            return await tail.wait_event(timeout=30, **fields)
        except TimeoutError:
            failures.append(f"{step}: no event with {fields} within 30 s")
            return None

    r = await request("report.daily", initial_data={"day": "2026-11-27"})
    daily = await expect("start report.daily", request_id=r, type=EventType.STARTED)
    r = await request("report.daily", initial_data={"day": "2026-11-28"})
    refused = await expect("start report.daily again", request_id=r, type=EventType.REFUSED)
    if daily and refused and refused.run_id != daily.run_id:
        failures.append("the refusal does not name the running run")
    r = await request("email.digest", client_id="acme")
    digest = await expect("start email.digest for client acme", request_id=r, type="started")
    r = await request("index.rebuild")
    index = await expect("start index.rebuild", request_id=r, type=EventType.STARTED)
    if daily and daily.run_id:
        r = await result("report.daily", daily.run_id, "COMPLETED", {"rows": 1200})
        await expect("report.daily completes", request_id=r, type=EventType.COMPLETED)
    if digest and digest.run_id:
        r = await result("email.digest", digest.run_id, "FAILED", {"error": "SMTP timeout"})
        await expect("email.digest fails", request_id=r, type=EventType.FAILED)

    console.print("[bold cyan]▶ a producer sends malformed JSON[/]")
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

    r = await result("index.rebuild", "261128-120000-0.999", "COMPLETED", {})
    await expect("a result for an unknown run", request_id=r, type=EventType.REJECTED)
    if index and index.run_id:
        r = await result("index.rebuild", index.run_id, "COMPLETED", {"documents": 42})
        await expect("index.rebuild completes", request_id=r, type=EventType.COMPLETED)
    r = await request("report.daily", initial_data={"day": "2026-11-28"})
    again = await expect("start report.daily once more", request_id=r, type=EventType.STARTED)
    if again and again.run_id:
        r = await result("report.daily", again.run_id, "COMPLETED", {"rows": 1310})
        await expect("report.daily completes again", request_id=r, type=EventType.COMPLETED)
    return failures
