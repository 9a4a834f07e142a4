"""React to completions: a plain read_committed consumer of the status topic."""

import json
import time

from aiokafka import AIOKafkaConsumer


async def main(bootstrap: str, prefix: str = "jobs") -> dict[str, object]:
    since_ms = int(time.time() * 1000)  # the first completion from now on, not an old one
    consumer = AIOKafkaConsumer(
        f"{prefix}.status",  # no group_id: every partition, nothing committed
        bootstrap_servers=bootstrap,
        isolation_level="read_committed",  # only what the orchestrator committed
    )
    await consumer.start()
    try:
        partitions = consumer.assignment()
        ends = await consumer.end_offsets(list(partitions))
        firsts = await consumer.offsets_for_times(dict.fromkeys(partitions, since_ms))
        for tp in partitions:  # the first event stamped since then, else what comes next
            consumer.seek(tp, firsts[tp].offset if firsts[tp] else ends[tp])
        async for record in consumer:
            event = json.loads(record.value)
            if event["type"] == "completed" and event["job_type"] == "report.daily":
                return {"run_id": event["run_id"], "metrics": event["metrics"]}
    finally:
        await consumer.stop()
    return {}


if __name__ == "__main__":  # python -m examples.downstream: waits for the next completion
    import asyncio
    import os

    from aiokafka.errors import KafkaError

    servers = os.environ.get("JOBS_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
    try:
        print(asyncio.run(main(servers, os.environ.get("JOBS_TOPIC_PREFIX", "jobs"))))
    except (KafkaError, ValueError) as exc:  # no broker answers, no address: one line, exit 1
        raise SystemExit(f"error: {servers!r}: {exc}") from None
