"""A JobClient that is never opened leaves nothing to close: no warning when collected."""

from __future__ import annotations

import gc
import warnings

import pytest

from worker.client import ClientNotOpenError, JobClient


async def test_a_client_never_opened_is_collected_without_warnings() -> None:
    """`c = JobClient(); await c.is_job_running("x")` refuses, and collecting `c` warns of
    nothing (four aiokafka clients made in `__init__` used to warn "Unclosed ...")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client = JobClient(bootstrap_servers="127.0.0.1:1")
        with pytest.raises(ClientNotOpenError):
            await client.is_job_running("x")
        await client.close()  # safe on a client never opened
        unclosed = JobClient(bootstrap_servers="127.0.0.1:1")
        del client, unclosed
        gc.collect()
    assert [str(w.message) for w in caught if "Unclosed" in str(w.message)] == []
