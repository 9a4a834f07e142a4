"""Small transport helpers around aiokafka that the worker, the CLI and the tests share."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, Literal, Protocol

from aiokafka import AIOKafkaConsumer, TopicPartition

from worker import compat
from worker.settings import Settings, tls_context


def cleartext_password(settings: Settings) -> str | None:
    """A warning when these settings send the SASL password as it is over an unencrypted
    connection (PLAIN without TLS; SCRAM never sends it), else None."""
    if settings.security_protocol == "SASL_PLAINTEXT" and settings.sasl_mechanism == "PLAIN":
        return (
            "SASL PLAIN without TLS: the password crosses the network in the clear; use "
            "SASL_SSL (JOBS_SECURITY_PROTOCOL) or a SCRAM mechanism (JOBS_SASL_MECHANISM)"
        )
    return None


def connection(settings: Settings) -> dict[str, Any]:
    """The keyword arguments that connect any aiokafka client to the cluster: the bootstrap
    servers and, from `JOBS_SECURITY_PROTOCOL` and friends, TLS and SASL. The one place
    every client of this project takes them from."""
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap_servers,
        "security_protocol": settings.security_protocol,
    }
    if settings.security_protocol in ("SSL", "SASL_SSL"):
        kwargs["ssl_context"] = tls_context(settings)
    if settings.security_protocol.startswith("SASL_"):
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = settings.password()
    return kwargs


class _Client(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


async def start_client(client: _Client) -> None:
    """`client.start()`; when it fails (no broker answers, a login refused), the client is
    stopped again before the error goes on, so nothing is left unclosed behind it."""
    try:
        await client.start()
    except BaseException:
        with contextlib.suppress(Exception):
            await client.stop()
        raise


async def stop_task(task: asyncio.Task[Any] | None) -> None:
    """Cancel a background reader and wait until it has stopped."""
    if task is None:
        return
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def assign_all(
    consumer: AIOKafkaConsumer, topic: str, *, at: Literal["beginning", "end"]
) -> list[TopicPartition]:
    """Assign every partition of `topic` at its beginning or its end, resolved now (so what
    is written after this call is read)."""
    partitions = await partitions_of(consumer, topic)
    consumer.assign(partitions)
    if at == "beginning":
        await consumer.seek_to_beginning(*partitions)
    else:
        await consumer.seek_to_end(*partitions)
        for tp in partitions:
            await consumer.position(tp)
    return partitions


def librdkafka_config(settings: Settings) -> dict[str, str | int | float | bool]:
    """The same connection as `connection`, for a librdkafka (confluent-kafka) client."""
    conf: dict[str, str | int | float | bool] = {
        "bootstrap.servers": settings.bootstrap_servers,
        "security.protocol": settings.security_protocol,
    }
    for key, path in (
        ("ssl.ca.location", settings.ssl_cafile),
        ("ssl.certificate.location", settings.ssl_certfile),
        ("ssl.key.location", settings.ssl_keyfile),
    ):
        if path is not None and settings.security_protocol in ("SSL", "SASL_SSL"):
            conf[key] = str(path)
    if settings.ssl_key_password is not None and settings.security_protocol in ("SSL", "SASL_SSL"):
        conf["ssl.key.password"] = settings.ssl_key_password.get_secret_value()
    if settings.security_protocol.startswith("SASL_"):
        conf["sasl.mechanisms"] = settings.sasl_mechanism
        conf["sasl.username"] = settings.sasl_username or ""
        conf["sasl.password"] = settings.password() or ""
    return conf


async def partitions_of(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`, fetching metadata when the consumer has none for it yet.

    A started consumer without a subscription knows no topics, and `topics()` does not update
    what `partitions_for_topic` reads; the client's full metadata fetch answers directly.
    """
    found = consumer.partitions_for_topic(topic)
    if not found:
        cluster = await compat.fetch_all_metadata(consumer)
        found = cluster.partitions_for_topic(topic)
    if not found:
        raise LookupError(f"topic {topic!r} does not exist")
    return [TopicPartition(topic, p) for p in sorted(found)]


# How long one fetch for records waits while reading up to known end offsets. A fetch that
# brings only a transaction marker (often the last entry of a partition) returns no records
# but moves the position to the end, and `getmany` keeps waiting out its whole timeout after
# it: with a one-second wait every replay and restore ended with a second of nothing.
_READ_WAIT_MS = 50


async def read_until(
    consumer: AIOKafkaConsumer, ends: Mapping[TopicPartition, int], *, max_records: int
) -> AsyncIterator[tuple[TopicPartition, list[Any]]]:
    """Batches of records from the (assigned, positioned) partitions of `ends` until each
    position reaches its end offset (for read_committed, the last stable offset)."""
    todo = [tp for tp, end in ends.items() if await consumer.position(tp) < end]
    while todo:
        batch = await consumer.getmany(*todo, timeout_ms=_READ_WAIT_MS, max_records=max_records)
        for tp, records in batch.items():
            yield tp, records
        todo = [tp for tp in todo if await consumer.position(tp) < ends[tp]]
