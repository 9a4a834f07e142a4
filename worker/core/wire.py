"""Wire models from values the worker made itself, without validating them again.

A status event is made on every transition from values already of their fields' types: IDs
the core made, enums, aware datetimes, dicts validated when their request or result was
read. Validating them once more took most of the time of making an event (pydantic tries each
field's snake_case and camelCase name, and copies each dict). `made` builds the model as
validation leaves it: every field, in declaration order (the order of its JSON), defaults
filled in.

Nothing read from outside comes through here: inputs are validated where they are read
(`engine/codec.py`). `tests/test_lifecycle_properties.py` checks that every event the core
makes equals, and serializes as, the same values validated.
"""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel

M = TypeVar("M", bound=BaseModel)

_TEMPLATES: dict[type[BaseModel], dict[str, Any]] = {}


def _template(model: type[BaseModel]) -> dict[str, Any]:
    """Every field of `model` in declaration order, with its default (None if required)."""
    template = _TEMPLATES.get(model)
    if template is None:
        template = {}
        for name, info in model.model_fields.items():
            if info.default_factory is not None:
                raise TypeError(f"{model.__name__}.{name} has a default factory: validate it")
            template[name] = None if info.is_required() else info.default
        _TEMPLATES[model] = template
    return template


def made(model: type[M], **values: Any) -> M:
    """`model(**values)` for values already of their fields' types, not validated again.

    `values` names fields by their Python names; the fields it leaves out take their
    defaults. A name that is no field raises TypeError.
    """
    template = _template(model)
    if not template.keys() >= values.keys():
        unknown = ", ".join(sorted(values.keys() - template.keys()))
        raise TypeError(f"{model.__name__} has no field {unknown}")
    instance = model.__new__(model)
    fields = dict(template)
    fields.update(values)
    # What pydantic's `model_construct` sets, without its per-field alias lookups.
    object.__setattr__(instance, "__dict__", fields)
    object.__setattr__(instance, "__pydantic_fields_set__", set(values))
    object.__setattr__(instance, "__pydantic_extra__", None)
    object.__setattr__(instance, "__pydantic_private__", None)
    return instance
