"""`Value`: the base of the values a transition builds, native classes where compiled.

A transition builds several values (its input record and command, its job state, a run,
a run row, a window entry) and reads their fields many times. As dataclasses they stayed
Python classes in a compiled module, built by a generated Python `__init__` and read
through Python's attribute lookup; written as plain classes, mypyc makes them native
classes, built and read in C: building a command and reading four of its fields took
200-230 ns as a dataclass and 35-45 as a native class (docs/performance.md, "Native value
classes").

Each class lists its fields in `FIELDS`, in order, and sets them once in its `__init__`
as `Final` attributes: mypy refuses an assignment to one, and a compiled build refuses it at
run time. `Value` gives them what a frozen dataclass had: equality and hashing over the
fields (`COMPARED`), a `repr`, and `replace`. What pydantic validates and serializes of
them (job states, run rows) it reads from their shapes in `worker.core.shapes`.

A hot module (`worker.compiled`).
"""

from __future__ import annotations

from typing import Any, ClassVar, TypeVar, cast

V = TypeVar("V", bound="Value")


class Value:
    """A value built once and never changed, equal and hashed by its fields."""

    __slots__ = ()
    FIELDS: ClassVar[tuple[str, ...]] = ()  # every field, in order
    COMPARED: ClassVar[tuple[str, ...] | None] = None  # those equality compares; None: all

    def _compared(self) -> tuple[object, ...]:
        names = self.FIELDS if self.COMPARED is None else self.COMPARED
        return tuple(getattr(self, name) for name in names)

    def __eq__(self, other: object) -> bool:
        if type(other) is not type(self):
            return NotImplemented
        assert isinstance(other, Value)
        return self._compared() == other._compared()

    def __hash__(self) -> int:
        return hash(self._compared())

    def __repr__(self) -> str:
        shown = ", ".join(f"{name}={getattr(self, name)!r}" for name in self.FIELDS)
        return f"{type(self).__name__}({shown})"

    def as_dict(self) -> dict[str, Any]:
        """The fields and their values, in order (what pydantic and msgspec write)."""
        return {name: getattr(self, name) for name in self.FIELDS}

    @classmethod
    def __get_pydantic_core_schema__(cls, source: Any, handler: Any) -> Any:
        """Its shape's schema (`worker.core.shapes`), for the classes that have one."""
        from worker.core.shapes import schema_of  # it reads the classes: imported once built

        return schema_of(cls, handler)

    def replace(self: V, **changes: Any) -> V:
        """A copy with `changes` made: `dataclasses.replace` for these classes."""
        if unknown := changes.keys() - set(self.FIELDS):
            raise TypeError(f"{type(self).__name__} has no field {', '.join(sorted(unknown))}")
        values = {name: changes.get(name, getattr(self, name)) for name in self.FIELDS}
        made: V = cast(Any, type(self))(**values)
        return made
