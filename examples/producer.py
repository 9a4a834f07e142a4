"""Start a job and act on the orchestrator's decision."""

from worker.client import JobClient


async def main() -> str | None:
    async with JobClient() as jobs:  # JOBS_BOOTSTRAP_SERVERS, JOBS_TOPIC_PREFIX, ...
        decision = await jobs.start_job("report.daily", initial_data={"day": "2026-11-28"})
        if decision.already_running:  # another run is active: not ours to complete
            print("already running as", decision.running_run_id)
        return decision.run_id  # ours, when started (None when refused)


if __name__ == "__main__":  # python -m examples.producer
    import asyncio

    from worker.client import JobError, SettingsError

    try:
        print("started run", asyncio.run(main()))
    except (JobError, SettingsError) as exc:  # no broker, bad settings...: one line, exit 1
        raise SystemExit(f"error: {exc}") from None
