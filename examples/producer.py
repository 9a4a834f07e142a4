"""Start a job and act on the orchestrator's decision."""

from worker.client import JobClient


async def main() -> str | None:
    async with JobClient() as jobs:  # JOBS_BOOTSTRAP_SERVERS, JOBS_TOPIC_PREFIX, ...
        decision = await jobs.start_job("report.daily", initial_data={"day": "2026-11-28"})
        assert decision is not None
        if decision.already_running:
            print("already running as", decision.run_id)
        return decision.run_id
