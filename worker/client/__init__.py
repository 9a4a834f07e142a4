"""The client library: producers start and cancel jobs, executors run them and report.

It talks to the orchestrator only over Kafka, through the published wire models in
`schemas`; nothing of the engine is imported here.
"""

from worker.client.answers import (
    ClientNotOpenError,
    JobConnectionError,
    JobError,
    JobInvalidError,
    JobRejectedError,
    JobTimeoutError,
    RunInfo,
    StartDecision,
)
from worker.client.execution import RunContext
from worker.client.executor import Executor
from worker.client.jobclient import JobClient
from worker.settings import SettingsError

__all__ = [
    "ClientNotOpenError",
    "Executor",
    "JobClient",
    "JobConnectionError",
    "JobError",
    "JobInvalidError",
    "JobRejectedError",
    "JobTimeoutError",
    "RunContext",
    "RunInfo",
    "SettingsError",
    "StartDecision",
]
