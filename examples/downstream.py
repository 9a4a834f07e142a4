"""React to completions: a plain read_committed consumer of the status topic."""

import json

from aiokafka import AIOKafkaConsumer


async def main(bootstrap: str, prefix: str = "jobs") -> dict[str, object]:
    consumer = AIOKafkaConsumer(
        f"{prefix}.status",
        bootstrap_servers=bootstrap,
        group_id="report-mailer",
        isolation_level="read_committed",  # only what the orchestrator committed
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        async for record in consumer:
            event = json.loads(record.value)
            if event["type"] == "completed" and event["job_type"] == "report.daily":
                return {"run_id": event["run_id"], "metrics": event["metrics"]}
    finally:
        await consumer.stop()
    return {}
