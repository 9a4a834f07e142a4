"""The five topics: their configurations, idempotent creation and the partition-count check."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import for_code

from worker.settings import Topics

# Requests and results carry broker time, so run IDs and timeouts never depend on a
# producer's clock; the status topic is the decision log and is kept; the state topic is
# a changelog, compacted to the latest row per key.
TOPIC_CONFIGS: Mapping[str, Mapping[str, str]] = {
    "requests": {"message.timestamp.type": "LogAppendTime"},
    "results": {"message.timestamp.type": "LogAppendTime"},
    "status": {"retention.ms": "-1"},
    "state": {"cleanup.policy": "compact"},
    "dlq": {},
}

_TOPIC_ALREADY_EXISTS = 36


class TopicError(RuntimeError):
    """The topics are missing or inconsistent; the message names them and says what to do."""


class PartitionCountChanged(TopicError):
    """The topics' partition count is not the one a partition's state was decided with:
    partitions were added to the topics, and a job type's records now go to another
    partition than its state (README, "The partition count is fixed")."""

    def __init__(self, where: str, decided: int, now: int) -> None:
        super().__init__(
            f"{where} was decided with {decided} partitions and the topics have {now} now: "
            "added partitions send a job type's records to another partition than its "
            "state, where a running job type would start again; the worker does not decide "
            'on them (README, "The partition count is fixed", says what to do)'
        )


@dataclass(frozen=True, slots=True)
class TopicInfo:
    """A topic as the cluster describes it."""

    name: str
    partitions: int | None  # None when the topic does not exist


def _role_configs(topics: Topics) -> dict[str, Mapping[str, str]]:
    return {
        topics.requests: TOPIC_CONFIGS["requests"],
        topics.results: TOPIC_CONFIGS["results"],
        topics.status: TOPIC_CONFIGS["status"],
        topics.state: TOPIC_CONFIGS["state"],
        topics.dlq: TOPIC_CONFIGS["dlq"],
    }


async def describe(admin: AIOKafkaAdminClient, topics: Topics) -> list[TopicInfo]:
    """Partition counts of the five topics (None for missing ones)."""
    found = await admin.describe_topics(list(topics.all()))
    counts: dict[str, int | None] = dict.fromkeys(topics.all())
    for entry in found:
        if entry.get("error_code", 0) == 0:
            counts[entry["topic"]] = len(entry["partitions"])
    return [TopicInfo(name, counts[name]) for name in topics.all()]


def check_counts(infos: list[TopicInfo]) -> int:
    """Return the common partition count, or raise `TopicError` naming what is wrong."""
    missing = [i.name for i in infos if i.partitions is None]
    if missing:
        raise TopicError(
            f"missing topics: {', '.join(missing)}. Create them with `jobctl topics create`."
        )
    counts = {i.partitions for i in infos}
    if len(counts) != 1:
        listing = ", ".join(f"{i.name}={i.partitions}" for i in infos)
        raise TopicError(
            "all five topics must have the same partition count, so that records about a job "
            f"type live on the same partition everywhere; found {listing}"
        )
    (count,) = counts
    assert count is not None
    return count


_TIMESTAMP_TYPE = "message.timestamp.type"


async def check_timestamps(admin: AIOKafkaAdminClient, topics: Topics) -> None:
    """Raise `TopicError` unless both input topics stamp records with broker time.

    Run IDs, time-outs and the decision order all read the records' timestamps; with
    CreateTime they would be whatever each producer's clock says.
    """
    names = [topics.requests, topics.results]
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, {_TIMESTAMP_TYPE: None}) for name in names
    ]
    wrong = []
    for response in await admin.describe_configs(resources):
        for _code, _message, _type, name, entries in response.resources:
            found = {entry[0]: entry[1] for entry in entries}
            if found.get(_TIMESTAMP_TYPE) != "LogAppendTime":
                wrong.append(f"{name} ({found.get(_TIMESTAMP_TYPE, 'unknown')})")
    if wrong:
        raise TopicError(
            f"input topics must use broker time (message.timestamp.type=LogAppendTime): "
            f"{', '.join(wrong)} do not. Set it with kafka-configs.sh --alter --add-config "
            "message.timestamp.type=LogAppendTime, or create the topics with "
            "`jobctl topics create`."
        )


# The settings `describe` shows for every topic: those `TOPIC_CONFIGS` asks of some topic.
SHOWN_CONFIGS = (_TIMESTAMP_TYPE, "retention.ms", "cleanup.policy")


@dataclass(frozen=True, slots=True)
class ConfigMismatch:
    """An existing topic's setting that is not what the worker needs."""

    topic: str
    key: str
    wanted: str
    found: str | None  # None: the broker did not say

    def __str__(self) -> str:
        return f"{self.topic} has {self.key}={self.found or 'unknown'}, needs {self.wanted}"


async def topic_configs(
    admin: AIOKafkaAdminClient, names: list[str]
) -> dict[str, dict[str, str | None]]:
    """What the broker says of `SHOWN_CONFIGS` for each topic of `names` that exists (its
    own settings and the broker's defaults alike)."""
    if not names:
        return {}
    resources = [
        ConfigResource(ConfigResourceType.TOPIC, name, dict.fromkeys(SHOWN_CONFIGS))
        for name in names
    ]
    found: dict[str, dict[str, str | None]] = {}
    for response in await admin.describe_configs(resources):
        for code, _message, _type, name, entries in response.resources:
            if code == 0:
                found[name] = {entry[0]: entry[1] for entry in entries}
    return found


def config_mismatches(
    topics: Topics, configs: Mapping[str, Mapping[str, str | None]]
) -> list[ConfigMismatch]:
    """The settings of the described topics `configs` that differ from `TOPIC_CONFIGS`."""
    wrong = []
    for name, wanted in _role_configs(topics).items():
        if name not in configs:
            continue
        for key, value in wanted.items():
            found = configs[name].get(key)
            if found != value:
                wrong.append(ConfigMismatch(name, key, value, found))
    return wrong


def fix_command(mismatches: list[ConfigMismatch], bootstrap: str) -> str:
    """What sets `mismatches` right: kafka-configs.sh, one topic a command."""
    by_topic: dict[str, list[str]] = {}
    for m in mismatches:
        by_topic.setdefault(m.topic, []).append(f"{m.key}={m.wanted}")
    return "; ".join(
        f"kafka-configs.sh --bootstrap-server {bootstrap} --alter --entity-type topics "
        f"--entity-name {topic} --add-config {','.join(settings)}"
        for topic, settings in by_topic.items()
    )


async def check_configs(admin: AIOKafkaAdminClient, topics: Topics, bootstrap: str) -> None:
    """Raise `TopicError` naming every existing topic's setting that is not what the worker
    needs (`TOPIC_CONFIGS`), and the commands that set them."""
    configs = await topic_configs(admin, list(topics.all()))
    wrong = config_mismatches(topics, configs)
    if wrong:
        raise TopicError(
            f"topics exist with settings the worker does not work with: "
            f"{'; '.join(str(m) for m in wrong)}. Set them with "
            f"{fix_command(wrong, bootstrap)} (or the admin API's IncrementalAlterConfigs)"
        )


async def unkept(admin: AIOKafkaAdminClient, topics: Topics) -> list[ConfigMismatch]:
    """The status topic's retention and the state topic's cleanup policy where they are not
    what the worker needs: records the broker will delete."""
    configs = await topic_configs(admin, [topics.status, topics.state])
    return config_mismatches(topics, configs)


async def create(
    admin: AIOKafkaAdminClient,
    topics: Topics,
    partitions: int,
    replication_factor: int | None = None,
) -> list[str]:
    """Create the missing topics; refuse when existing ones have another count. Idempotent."""
    existing = await describe(admin, topics)
    wrong = [i for i in existing if i.partitions is not None and i.partitions != partitions]
    if wrong:
        listing = ", ".join(f"{i.name} has {i.partitions}" for i in wrong)
        raise TopicError(
            f"cannot use {partitions} partitions: {listing}. All five topics must have the "
            "same count; pass --partitions to match, or delete and recreate the topics."
        )
    if replication_factor is None:
        brokers = (await admin.describe_cluster())["brokers"]
        replication_factor = min(3, len(brokers))
    configs = _role_configs(topics)
    new = [
        NewTopic(i.name, partitions, replication_factor, topic_configs=dict(configs[i.name]))
        for i in existing
        if i.partitions is None
    ]
    if not new:
        return []
    response = await admin.create_topics(new)
    errors = []
    for name, code, *rest in response.topic_errors:
        if code not in (0, _TOPIC_ALREADY_EXISTS):
            message = rest[0] if rest and rest[0] else for_code(code).__name__
            errors.append(f"{name}: {message}")
    if errors:
        raise TopicError("could not create topics: " + "; ".join(errors))
    await wait_for_leaders(admin, [t.name for t in new])
    # A concurrent creator may have won with another count; check what exists now.
    check_counts(await describe(admin, topics))
    return [t.name for t in new]


async def wait_for_leaders(
    admin: AIOKafkaAdminClient, names: list[str], timeout: float = 30
) -> None:
    """Wait until every partition of `names` has a leader, so first reads and writes succeed."""
    async with asyncio.timeout(timeout):
        while True:
            found = await admin.describe_topics(names)
            if all(
                t.get("error_code", 0) == 0
                and t["partitions"]
                and all(p["leader"] >= 0 for p in t["partitions"])
                for t in found
            ):
                return
            await asyncio.sleep(0.05)
