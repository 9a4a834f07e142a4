"""The input models' fields as TypedDicts, for `worker.engine.codec`'s one pass over a record.

A request or result validated into its model (`JobRequest`, `JobResult`) costs twice what
the same fields validated into a dict do: the model's instance, its set of fields, reads of
its attributes through pydantic's `__getattr__` hook, and the Python validators on its
fields. A shape here is a TypedDict of its model's fields, built from the model itself: the
same types, string constraints, aliases (snake or camel case) and unknown fields refused,
without the Python validators (`AfterValidator`s on field types, the model's field and
model validators). What those check, `codec._plain` checks over the shape's output, or sends
the record the model's way, which says what is wrong: the shape never takes a record its
model refuses, and reads every field it takes as the model does
(`tests/test_codec.py` checks both over generated records).

Never compiled (`worker.compiled`): pydantic reads the annotations built here.
"""

from __future__ import annotations

import functools
import operator
import types
from typing import Annotated, Any, NotRequired, Union, get_args, get_origin

from pydantic import AfterValidator, BaseModel, ConfigDict, TypeAdapter
from typing_extensions import TypedDict

from schemas import JobRequest, JobResult


def without_python_checks(annotation: Any) -> Any:
    """`annotation` with every `AfterValidator` taken out, inside unions and `Annotated`
    alike; constraints, descriptions and everything else stay."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *metadata = get_args(annotation)
        kept = [m for m in metadata if not isinstance(m, AfterValidator)]
        base = without_python_checks(base)
        return Annotated[(base, *kept)] if kept else base
    if origin in (Union, types.UnionType):
        return functools.reduce(operator.or_, map(without_python_checks, get_args(annotation)))
    return annotation


def shape_of(model: type[BaseModel]) -> TypeAdapter[dict[str, Any]]:
    """A TypedDict of `model`'s fields, as `without_python_checks` leaves their types; a
    field with a default is optional (absent from the output when absent from the input)."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation = without_python_checks(info.annotation)
        kept = [m for m in info.metadata if not isinstance(m, AfterValidator)]
        if kept:
            annotation = Annotated[(annotation, *kept)]
        fields[name] = annotation if info.is_required() else NotRequired[annotation]
    shape = _typed_dict(f"{model.__name__}Fields", fields)
    config = model.model_config
    shape.__pydantic_config__ = ConfigDict(
        extra=config.get("extra"),
        alias_generator=config.get("alias_generator"),
        populate_by_name=config.get("populate_by_name", False),
    )
    adapter: TypeAdapter[dict[str, Any]] = TypeAdapter(shape)
    return adapter


_typed_dict: Any = TypedDict  # called with fields made at run time, which mypy cannot follow


REQUEST_FIELDS = shape_of(JobRequest)
RESULT_FIELDS = shape_of(JobResult)
