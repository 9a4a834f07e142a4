"""The client library: producers start and cancel jobs, executors run them and report.

It talks to the orchestrator only over Kafka, through the published wire models in
`schemas`; nothing of the engine is imported here.
"""

from worker.client.executor import Executor, RunContext
from worker.client.jobclient import (
    JobClient,
    JobError,
    JobRejectedError,
    JobTimeoutError,
    RunInfo,
    StartDecision,
)

__all__ = [
    "Executor",
    "JobClient",
    "JobError",
    "JobRejectedError",
    "JobTimeoutError",
    "RunContext",
    "RunInfo",
    "StartDecision",
]
