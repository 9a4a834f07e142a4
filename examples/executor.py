"""Run `report.daily` jobs: the return value completes the run, an exception fails it."""

import asyncio

from worker.client import Executor, JobClient, RunContext


async def main(stop: asyncio.Event) -> None:
    async with JobClient() as jobs:
        executor = Executor(jobs)

        @executor.job("report.daily")
        async def report(run: RunContext) -> dict[str, int]:
            await run.progress({"rows": 600})  # also renews the run's timeout
            return {"rows": 1200}

        await executor.run(stop)


if __name__ == "__main__":  # python -m examples.executor: runs until SIGTERM or Ctrl-C
    import signal

    async def until_stopped() -> None:
        stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
        await main(stop)

    from worker.client import JobError, SettingsError

    try:
        asyncio.run(until_stopped())
    except (JobError, SettingsError) as exc:  # no broker, bad settings...: one line, exit 1
        raise SystemExit(f"error: {exc}") from None
