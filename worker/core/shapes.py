"""What pydantic reads of the native value classes: each one's fields and their types.

Job states, their runs and window entries, and run rows are native classes where compiled
(`worker.core.values`), which pydantic cannot read a schema from: mypyc keeps no
annotations of them. Each has its shape here, a TypedDict of the same fields with the
types and bounds pydantic validates; `Value.__get_pydantic_core_schema__` turns a class
into its shape's schema, validated into the class and serialized from its fields. This
module is never compiled (`worker.compiled`), so its annotations stay as written.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, NotRequired

from pydantic import Field, GetCoreSchemaHandler
from pydantic_core import CoreSchema, core_schema
from typing_extensions import TypedDict

from schemas import EventType, RunStatus
from worker.core.jobstate import Decided, EndedRun, JobState, Queued, Run
from worker.core.runs import RunRow
from worker.core.values import Value

# Integers a row read back (from the changelog, a status event) carries into SQLite's
# 64-bit INTEGER columns: bounded when validated, so that an out-of-range number is a row
# that does not validate (skipped, or reported), never an overflow where it is written.
Partition = Annotated[int, Field(ge=0, le=2**31 - 1)]  # a Kafka partition (int32)
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]


class RunShape(TypedDict):
    run_id: str
    job_type: str
    client_id: str | None
    request_id: str
    status: RunStatus
    started_at: datetime
    initial_data: NotRequired[Mapping[str, Any]]
    scope: NotRequired[str]
    deadline: NotRequired[datetime | None]
    size: NotRequired[int]
    was_queued: NotRequired[bool]


class QueuedShape(TypedDict):
    run_id: str
    request_id: str
    client_id: str | None
    scope: str
    queued_at: datetime
    size: NotRequired[int]
    initial_data: NotRequired[Mapping[str, Any]]


class EndedRunShape(TypedDict):
    run_id: str
    status: RunStatus
    ended_at: datetime


class DecidedShape(TypedDict):
    request_id: str
    type: EventType
    run_id: str | None


class JobStateShape(TypedDict):
    job_type: str
    active: NotRequired[tuple[Run, ...]]
    queue: NotRequired[tuple[Queued, ...]]
    ended: NotRequired[tuple[EndedRun, ...]]
    decided: NotRequired[tuple[Decided, ...]]
    ended_next: NotRequired[Count]
    decided_next: NotRequired[Count]


class RunRowShape(TypedDict):
    run_id: str
    job_type: str
    client_id: str | None
    request_id: str | None
    status: RunStatus
    partition: Partition
    started_at: datetime
    ended_at: datetime | None
    initial_data: dict[str, Any]
    metrics: dict[str, Any] | None
    reason: str | None


SHAPES: dict[type[Value], type] = {
    Run: RunShape,
    Queued: QueuedShape,
    EndedRun: EndedRunShape,
    Decided: DecidedShape,
    JobState: JobStateShape,
    RunRow: RunRowShape,
}


def schema_of(cls: type[Value], handler: GetCoreSchemaHandler) -> CoreSchema:
    """`cls`'s schema: its shape's, validated into an instance (by keyword) and serialized
    from its fields (`Value.as_dict`, in order), so that include and exclude apply."""
    shape = SHAPES.get(cls)
    if shape is None:
        raise TypeError(f"{cls.__name__} has no shape for pydantic")
    fields = handler.generate_schema(shape)
    return core_schema.no_info_after_validator_function(
        lambda values: cls(**values),
        fields,
        serialization=core_schema.wrap_serializer_function_ser_schema(_fields, schema=fields),
    )


def _fields(value: Value, serialize: core_schema.SerializerFunctionWrapHandler) -> Any:
    return serialize(value.as_dict())
