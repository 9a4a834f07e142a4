"""The least Kafka ACLs of each role, as code: `jobctl acls` prints them and applies them.

Roles and what the broker then enforces:

- the **orchestrator** alone writes `<prefix>.status`, `<prefix>.state` and `<prefix>.dlq`, owns
  its consumer group and its transactional IDs;
- **producers** write start and cancel requests and read the decisions (status) and the
  running view (the state topic's run rows);
- **executors** write results, read status and the running view, and own the consumer groups
  `<prefix>.executors*` (one per job type set);
- **readers** read status and the running view, nothing else.

Reading or writing a topic implies describing it, and reading a group implies describing it
(Kafka's implied operations), so no separate DESCRIBE is listed. Since Kafka 3.0, WRITE on a
topic also allows an idempotent producer, so no cluster ACL is needed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from worker.settings import Topics

Resource = Literal["TOPIC", "GROUP", "TRANSACTIONAL_ID"]
Pattern = Literal["LITERAL", "PREFIXED"]
Operation = Literal["READ", "WRITE", "DESCRIBE_CONFIGS"]


@dataclass(frozen=True, slots=True)
class Rule:
    """One ALLOW ACL: a principal may do `operation` on the resource, from any host."""

    role: str
    principal: str
    operation: Operation
    resource: Resource
    pattern: Pattern
    name: str
    why: str


class PrincipalError(ValueError):
    """A principal not of the form `User:<name>`."""


def check_principal(principal: str) -> str:
    """`principal` if it is `User:<name>`; else `PrincipalError` saying so."""
    kind, _, name = principal.partition(":")
    if kind != "User" or not name or name != name.strip():
        raise PrincipalError(f"principal {principal!r} is not of the form User:<name>")
    return principal


def rules(
    topics: Topics,
    group: str,
    *,
    orchestrator: str,
    producer: str,
    executor: str,
    reader: str | None = None,
) -> list[Rule]:
    """The ACLs each role needs, and nothing more; `group` is the orchestrator's group."""
    prefix = topics.requests.removesuffix(".requests")
    out: list[Rule] = []

    def allow(
        role: str,
        principal: str,
        operation: Operation,
        resource: Resource,
        name: str,
        why: str,
        pattern: Pattern = "LITERAL",
    ) -> None:
        out.append(Rule(role, check_principal(principal), operation, resource, pattern, name, why))

    o = "orchestrator"
    for topic in (topics.requests, topics.results):
        allow(o, orchestrator, "READ", "TOPIC", topic, "its input")
        allow(o, orchestrator, "DESCRIBE_CONFIGS", "TOPIC", topic, "checks LogAppendTime at start")
        allow(o, orchestrator, "WRITE", "TOPIC", topic, "moves records sent to the wrong partition")
    allow(o, orchestrator, "WRITE", "TOPIC", topics.status, "publishes every decision")
    allow(o, orchestrator, "WRITE", "TOPIC", topics.state, "its changelog and the run rows")
    allow(o, orchestrator, "READ", "TOPIC", topics.state, "restores a partition's state")
    allow(o, orchestrator, "WRITE", "TOPIC", topics.dlq, "dead-letters bad input")
    allow(o, orchestrator, "READ", "GROUP", group, "its consumer group")
    allow(
        o,
        orchestrator,
        "WRITE",
        "TRANSACTIONAL_ID",
        f"{group}.",
        "its transactional producers (per partition, or per worker)",
        "PREFIXED",
    )

    p = "producer"
    allow(p, producer, "WRITE", "TOPIC", topics.requests, "start and cancel requests")
    allow(p, producer, "READ", "TOPIC", topics.status, "the decisions")
    allow(p, producer, "READ", "TOPIC", topics.state, "the running view (run rows)")

    e = "executor"
    allow(e, executor, "WRITE", "TOPIC", topics.results, "results, progress, heartbeats")
    allow(e, executor, "READ", "TOPIC", topics.status, "started and cancelled runs")
    allow(e, executor, "READ", "TOPIC", topics.state, "the running view (run rows)")
    allow(
        e,
        executor,
        "READ",
        "GROUP",
        f"{prefix}.executors",
        "executor groups, one per job type set",
        "PREFIXED",
    )

    if reader is not None:
        allow("reader", reader, "READ", "TOPIC", topics.status, "the decision log")
        allow("reader", reader, "READ", "TOPIC", topics.state, "the running view (run rows)")
    return out
