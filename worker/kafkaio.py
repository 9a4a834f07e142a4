"""Small transport helpers around aiokafka that the worker, the CLI and the tests share."""

from __future__ import annotations

from aiokafka import AIOKafkaConsumer, TopicPartition


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`, fetching metadata when the consumer has none for it yet.

    A started consumer without a subscription knows no topics, and `topics()` does not update
    what `partitions_for_topic` reads; the client's full metadata fetch answers directly.
    """
    found = consumer.partitions_for_topic(topic)
    if not found:
        cluster = await consumer._client.fetch_all_metadata()
        found = cluster.partitions_for_topic(topic)
    if not found:
        raise LookupError(f"topic {topic!r} does not exist")
    return [TopicPartition(topic, p) for p in sorted(found)]
