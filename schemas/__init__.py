"""Wire models of job-orchestrator and the JSON Schema files generated from them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from schemas.asyncapi import asyncapi_document
from schemas.messages import (
    ALL_MODELS,
    ENDED_STATUSES,
    ENDING_EVENTS,
    RUN_ROW_PREFIX,
    RUN_ROW_VERSION,
    VIEW_ROW_KEY,
    VIEW_ROW_PREFIX,
    DeadLetter,
    DeadLetterReason,
    EventType,
    Header,
    JobRequest,
    JobResult,
    RunRecord,
    RunStatus,
    Source,
    StatusEvent,
    ViewMark,
    is_run_row,
    parse_run_row,
    parse_view_row,
    read_status_event,
    time_problem,
    view_row,
)

SCHEMA_DIR = Path(__file__).parent

__all__ = [
    "ALL_MODELS",
    "ENDED_STATUSES",
    "ENDING_EVENTS",
    "RUN_ROW_PREFIX",
    "RUN_ROW_VERSION",
    "SCHEMA_DIR",
    "VIEW_ROW_KEY",
    "VIEW_ROW_PREFIX",
    "DeadLetter",
    "DeadLetterReason",
    "EventType",
    "Header",
    "JobRequest",
    "JobResult",
    "RunRecord",
    "RunStatus",
    "Source",
    "StatusEvent",
    "ViewMark",
    "export_json_schemas",
    "is_run_row",
    "json_schema_documents",
    "parse_run_row",
    "parse_view_row",
    "read_status_event",
    "time_problem",
    "view_row",
]

# Inputs are described as accepted (validation); outputs as written (serialization).
_INPUTS = {"job_request", "job_result"}


def json_schema_documents() -> dict[str, str]:
    """File name -> text: the JSON Schema of every wire model, and the AsyncAPI document."""
    docs = {}
    for name, model in ALL_MODELS.items():
        mode: Literal["validation", "serialization"] = (
            "validation" if name in _INPUTS else "serialization"
        )
        schema = model.model_json_schema(mode=mode)
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"{name}.schema.json"
        docs[f"{name}.schema.json"] = json.dumps(schema, indent=2, sort_keys=True) + "\n"
    asyncapi = asyncapi_document(_version())
    docs["asyncapi.json"] = json.dumps(asyncapi, indent=2, sort_keys=True) + "\n"
    return docs


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("job-orchestrator")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0"


def export_json_schemas(directory: Path = SCHEMA_DIR) -> list[Path]:
    """Write the JSON Schema files into `directory`; return the paths written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for filename, text in json_schema_documents().items():
        path = directory / filename
        path.write_text(text)
        written.append(path)
    return written
