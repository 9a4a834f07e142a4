"""A job lock as one would write it with Quix Streams: the bench's reference for the worker.

`jobctl bench --quix` runs this file with an interpreter of its own that has Quix Streams
installed (`worker.devtools.quixref`); it imports nothing of the project. It reads the same
topics as the worker (`<prefix>.requests` and `<prefix>.results`, merged by timestamp with
`concat`), keeps one run per job type in Quix's RocksDB state (with its changelog topic),
and writes an event per decision to `<prefix>.status`, exactly-once (Kafka transactions),
committing every `QUIX_COMMIT_INTERVAL` seconds (0.1 by default: Quix's own default of
5 s would hold every decision back that long).

It does the least a lock needs: a start of a job type with no run starts one (a run ID from
a counter), any other start is refused; a result for the running run ends it, any other
result is rejected. Nothing else of the worker's contract is here: no idempotency window,
no queueing or replacing, no time-outs, no validation beyond JSON, no dead letters, no run
history, no audit. An input it cannot decode or decide (not JSON, not an object, no key, a
key over `MAX_KEY` bytes) is logged and skipped: Quix stops on it by default. So its
figures say what the worker's contract costs over the least a stream processor does for
the same lifecycles.

Configured like the worker: `JOBS_BOOTSTRAP_SERVERS`, `JOBS_TOPIC_PREFIX`; plaintext only.
Stopped with SIGTERM (Quix exits 0 on it).
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import Any

from quixstreams import Application  # type: ignore[import-not-found]

log = logging.getLogger("quixlock")
MAX_KEY = 1_000  # bytes of a job type


def _skip(exc: Exception, *_: Any, **__: Any) -> bool:
    """Log an input that could not be read or decided, and go on (True: suppressed)."""
    log.warning("skipped an input: %s", type(exc).__name__)
    return True


def decide(
    value: dict[str, Any], key: bytes, timestamp: int, headers: Any, state: Any
) -> dict[str, Any]:
    """One input's event: a start (no `run_id`) or an executor's result."""
    if len(key) > MAX_KEY:
        raise ValueError("job type too long")  # its event would pass Kafka's record limit
    job_type = key.decode()
    run = state.get("run")
    if "run_id" not in value:
        request_id = value.get("request_id")
        if run is not None:
            return {"type": "refused", "job_type": job_type, "request_id": request_id}
        number = state.get("n", 0) + 1
        run_id = f"{job_type}.{number}"
        state.set("n", number)
        state.set("run", run_id)
        return {
            "type": "started",
            "job_type": job_type,
            "run_id": run_id,
            "request_id": request_id,
            "occurred_at": timestamp,
        }
    if value["run_id"] == run:
        state.delete("run")
        return {"type": "completed", "job_type": job_type, "run_id": run, "occurred_at": timestamp}
    return {"type": "rejected", "job_type": job_type, "run_id": value["run_id"]}


def main() -> None:
    prefix = os.environ["JOBS_TOPIC_PREFIX"]
    app = Application(
        broker_address=os.environ["JOBS_BOOTSTRAP_SERVERS"],
        consumer_group=f"{prefix}.quix",
        processing_guarantee="exactly-once",
        auto_offset_reset="earliest",
        commit_interval=float(os.environ.get("QUIX_COMMIT_INTERVAL", "0.1")),
        state_dir=tempfile.mkdtemp(prefix="quixlock-"),
        loglevel="WARNING",
        on_consumer_error=_skip,
        on_processing_error=_skip,
        on_producer_error=_skip,
    )
    requests = app.topic(f"{prefix}.requests", value_deserializer="json")
    results = app.topic(f"{prefix}.results", value_deserializer="json")
    status = app.topic(f"{prefix}.status", value_serializer="json")
    decisions = app.dataframe(requests).concat(app.dataframe(results))
    decisions.apply(decide, stateful=True, metadata=True).to_topic(status)
    app.run()


if __name__ == "__main__":
    main()
