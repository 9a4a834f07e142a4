"""`immutable`: the dataclass of the values a transition builds, frozen to mypy only.

A frozen dataclass sets each field in `__init__` through `object.__setattr__`: building a
run (eleven fields) took 1.1 µs instead of 0.2, and a transition builds several (its input
record and command, its job state, a run, a run row, a window entry). These values are
built and never changed (`dataclasses.replace` makes the next one), so the check that
nothing changes them is mypy's, which reads `immutable` as `dataclass(frozen=True)` (an
assignment to a field is an error), and at run time they are slotted dataclasses, equal and
hashed by their fields as frozen ones are. In a compiled module such a class stays a Python
class (mypyc does not make it native), which builds faster still.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, TypeVar, dataclass_transform

from pydantic import Field

T = TypeVar("T")

# Integers a row read back (from the changelog, a status event) carries into SQLite's
# 64-bit INTEGER columns: bounded when validated, so that an out-of-range number is a row
# that does not validate (skipped, or reported), never an overflow where it is written.
Partition = Annotated[int, Field(ge=0, le=2**31 - 1)]  # a Kafka partition (int32)
Count = Annotated[int, Field(ge=0, le=2**63 - 1)]


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
def immutable(cls: type[T]) -> type[T]:
    """`cls` as a slotted dataclass with `__eq__` and `__hash__` over its fields."""
    return dataclass(slots=True, unsafe_hash=True)(cls)
