"""The console's page in a real browser: Debian's Chromium driven by Playwright.

Playwright's own browser download is never used: the tests launch the system's `chromium`
(`make test` installs it with apt-get when it can) and skip, saying so, when there is none.
Everything is asserted on what a user sees, and waited for with Playwright's `expect`.

`python -m tests.test_console_browser [docs/console.png]` (`make console-screenshot`) starts
a broker, a worker and a console with some runs, and takes the README's screenshot;
`python -m tests.test_console_browser --measure 100000` times the page (and the API) on a
console whose file holds that many runs.
"""

from __future__ import annotations

import asyncio
import os
import re
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

import aiohttp
import pytest

from schemas import EventType, RunStatus, StatusEvent
from tests.conftest import RunningWorker
from tests.test_console import Api, expected, folded, lifecycle, publish, until
from worker.client import JobClient
from worker.console.service import Console
from worker.settings import Settings

try:
    from playwright.async_api import Browser, Page, async_playwright, expect
except ImportError:  # pragma: no cover
    pytest.skip(
        "the playwright package is not installed (pip install -e '.[test]')",
        allow_module_level=True,
    )


def find_chromium() -> str | None:
    """The system's Chromium: $CHROMIUM, `chromium` on the PATH, or Debian's path."""
    for candidate in (os.environ.get("CHROMIUM"), shutil.which("chromium"), "/usr/bin/chromium"):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = find_chromium()
pytestmark = [
    pytest.mark.kafka,
    pytest.mark.skipif(
        CHROMIUM is None,
        reason="no chromium found (apt-get install chromium, or set CHROMIUM to its path)",
    ),
]

WAIT_MS = 20_000  # Playwright's wait for what the page should come to show
FAILED_RED = "rgb(176, 0, 32)"  # console.css: .status-FAILED td.status
CANCELLED_GREY = "rgb(107, 107, 107)"  # console.css: .status-CANCELLED td.status

CHART_HEIGHT = 30  # console.js: a duration chart's tallest bar
BAR_FILL = {  # console.css: svg.durations .bar
    "COMPLETED": "rgb(27, 127, 58)",
    "FAILED": FAILED_RED,
    "TIMED_OUT": "rgb(179, 92, 0)",
    "CANCELLED": "rgb(154, 154, 154)",
}

expect.set_options(timeout=WAIT_MS)


class Watched:
    """A page, every error its console logged or its scripts threw, and every URL it
    requested."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.requested: list[str] = []
        page.on("console", self._console)
        page.on("request", lambda request: self.requested.append(request.url))
        page.on("pageerror", lambda error: self.errors.append(f"uncaught: {error}"))

    def _console(self, message: Any) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} ({message.location.get('url')})")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Chromium, headless, without Playwright's browser download."""
    async with async_playwright() as playwright:
        instance = await playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield instance
        await instance.close()


OpenPage = Callable[[Console], Awaitable[Watched]]


@pytest.fixture
async def open_page(browser: Browser) -> AsyncIterator[OpenPage]:
    """Open a console's page (closed before the console stops) once it has loaded its
    status: the header names the topic it follows."""
    contexts = []

    async def opening(console: Console) -> Watched:
        context = await browser.new_context(viewport={"width": 1280, "height": 900})
        contexts.append(context)
        watched = Watched(await context.new_page())
        await watched.page.goto(console.url)
        assert console.follower is not None
        try:
            await expect(watched.page.locator("#following")).to_contain_text(
                f"following {console.follower.topic}"
            )
        except AssertionError as failure:
            raise AssertionError(f"{failure}\npage errors: {watched.errors}") from None
        return watched

    yield opening
    for context in contexts:
        await context.close()


async def make_console(topics: Settings, path: Path, *, allow_cancel: bool) -> Console:
    return await Console(topics, path, port=0, allow_cancel=allow_cancel).start()


def parse_offset(text: str) -> float:
    """A timeline offset as the page shows it ("+12 ms", "+1.5 s", "-3 ms") in seconds."""
    found = re.fullmatch(r"([+-])([0-9.]+) (ms|s|min|h)", text)
    assert found, f"not an offset: {text!r}"
    scale = {"ms": 0.001, "s": 1.0, "min": 60.0, "h": 3600.0}[found[3]]
    value = float(found[2]) * scale
    return -value if found[1] == "-" else value


def offset_tolerance(text: str) -> float:
    """How far an offset shown as `text` may be from the true one: half its last digit."""
    return {"ms": 0.0005, "s": 0.05, "min": 3.0, "h": 180.0}[text.rsplit(" ", 1)[1]] + 1e-9


def at_ms(iso: str) -> float:
    """An API time in seconds, cut to milliseconds (as a browser's Date keeps it)."""
    return int(datetime.fromisoformat(iso).timestamp() * 1000) / 1000


# -- the page --------------------------------------------------------------------------------


async def test_the_page_shows_runs_and_the_duration_charts(
    topics: Settings, console: Console, session: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """With some history, the page loads without a console error: recent runs coloured by
    status, and each job type's summary with a bar for each of its ended runs."""
    api = Api(session, console.url)
    runs = [lifecycle(n) for n in range(15)]
    events = [e for run in runs for e in run]
    await publish(topics, events)
    await folded(api, len(events))

    watched = await open_page(console)
    page = watched.page
    recent = page.locator("#runs tbody tr")
    await expect(recent).to_have_count(15)
    failed = page.locator("#runs tbody tr.status-FAILED")
    await expect(failed).to_have_count(sum(1 for run in runs if run[-1].type.value == "failed"))
    await expect(failed.first.locator("td.status")).to_have_text("FAILED")
    await expect(failed.first.locator("td.status")).to_have_css("color", FAILED_RED)
    running = [run[0] for run in runs if len(run) == 1]
    await expect(page.locator("#running tbody tr")).to_have_count(len(running))
    await expect(page.locator("#running-count")).to_have_text(f"({len(running)})")

    await expect(page.locator("#types tbody tr")).to_have_count(3)
    for job_type in ("etl", "mail", "report"):
        ended = [run for run in runs if run[0].job_type == job_type and len(run) == 2]
        row = page.locator(f"#types tbody tr[data-job-type='{job_type}']")
        await expect(row.locator("td").first).to_have_text(job_type)
        await expect(row.locator("td").nth(1)).to_have_text(
            str(sum(1 for run in runs if run[0].job_type == job_type))
        )
        bars = row.locator("svg.durations rect.bar")
        await expect(bars).to_have_count(len(ended))
        # oldest on the left, each named in its tooltip, as tall as its share of the
        # longest run, in the colour of its end
        titles = await bars.locator("title").all_text_contents()
        assert [t.split(":")[0] for t in titles] == [run[0].run_id for run in ended]
        durations = [(run[1].occurred_at - run[0].occurred_at).total_seconds() for run in ended]
        drawn = await bars.evaluate_all(
            "bars => bars.map(b => [+b.getAttribute('x'), +b.getAttribute('height'), "
            "getComputedStyle(b).fill])"
        )
        assert [x for x, _, _ in drawn] == sorted(x for x, _, _ in drawn)
        for (_, height, fill), duration, run in zip(drawn, durations, ended, strict=True):
            assert height == pytest.approx(max(1, duration / max(durations) * CHART_HEIGHT))
            assert fill == BAR_FILL[run[1].status.value if run[1].status else ""]
    assert watched.errors == []


async def test_a_run_shows_up_live_then_ends_with_its_timeline(
    worker: RunningWorker, topics: Settings, console: Console, open_page: OpenPage
) -> None:
    """A run started through a real worker appears among the running runs without a reload;
    its timeline, open while it runs, follows its events; it moves to the recent runs in its
    end status's colour, and its timeline lists its events in time order with the offsets
    between them. This console may not cancel: no buttons."""
    watched = await open_page(console)
    page = watched.page
    await expect(page.locator("#running-empty")).to_be_visible()
    await expect(page.locator("#following")).not_to_contain_text("cancelled here")

    section = page.locator("#run-section")
    timeline = page.locator("#run-timeline tbody tr")
    async with JobClient(topics) as client:
        started = await client.start_job("nightly", "acme", {"day": 1})
        run_id = started.run_id
        assert run_id is not None
        row = page.locator("#running tbody tr", has_text=run_id)
        await expect(row).to_be_visible()
        await expect(row.locator("td").first).to_have_text("nightly")
        await expect(page.locator("#running-empty")).to_be_hidden()
        await expect(page.locator("#running button")).to_have_count(0)  # not --allow-cancel

        await row.click()  # its timeline, kept current while it runs
        await expect(page.locator("#run-title")).to_have_text(run_id)
        await expect(timeline.locator("td.type")).to_have_text(["started"])
        await expect(page.locator("#run-span")).to_contain_text("Running for")
        await expect(page.locator("#run-actions button")).to_have_count(0)
        await client.report_progress("nightly", run_id, {"rows": 5})
        await expect(row.locator("td").nth(5)).to_have_text('{"rows":5}')
        await expect(timeline.locator("td.type")).to_have_text(["started", "progress"])
        await client.fail_job("nightly", run_id, error="disk full")
        await expect(timeline.locator("td.type")).to_have_text(["started", "progress", "failed"])
        await expect(page.locator("#run-span")).to_contain_text("FAILED after")

    await expect(page.locator("#running tbody tr")).to_have_count(0)
    await expect(page.locator("#running-empty")).to_be_visible()
    ended = page.locator("#runs tbody tr", has_text=run_id)
    await expect(ended).to_have_class(re.compile(r"\bstatus-FAILED\b"))
    await expect(ended.locator("td.status")).to_have_text("FAILED")
    await expect(ended.locator("td.status")).to_have_css("color", FAILED_RED)

    await page.locator("#run-close").click()
    await expect(section).to_be_hidden()
    await ended.click()
    await expect(section).to_be_visible()
    await expect(page.locator("#run-title")).to_have_text(run_id)
    await expect(timeline.locator("td.type")).to_have_text(["started", "progress", "failed"])
    await expect(page.locator("#run-track circle.mark")).to_have_count(3)

    async with aiohttp.ClientSession() as http:
        run = await Api(http, console.url).ok(f"/api/runs/{run_id}")
    times = sorted(at_ms(e["occurred_at"]) for e in run["events"])
    shown_at = await timeline.locator("td.at").all_text_contents()
    shown_gap = await timeline.locator("td.gap").all_text_contents()
    assert shown_gap[0] == ""
    for i, (at, gap) in enumerate(zip(shown_at, shown_gap, strict=True)):
        assert abs(parse_offset(at) - (times[i] - at_ms(run["started_at"]))) <= offset_tolerance(
            at
        ), (i, at, run["events"])
        if i:
            assert abs(parse_offset(gap) - (times[i] - times[i - 1])) <= offset_tolerance(gap)
    assert watched.errors == []


async def test_cancel_from_the_page(
    worker: RunningWorker,
    topics: Settings,
    cancelling: Console,
    session: aiohttp.ClientSession,
    open_page: OpenPage,
) -> None:
    """With --allow-cancel each running run has a cancel button; pressing it (and confirming)
    ends the run CANCELLED."""
    api = Api(session, cancelling.url)
    watched = await open_page(cancelling)
    page = watched.page
    await expect(page.locator("#following")).to_contain_text("runs may be cancelled here")
    async with JobClient(topics) as client:
        started = await client.start_job("nightly", "acme")
    run_id = started.run_id
    assert run_id is not None

    row = page.locator("#running tbody tr", has_text=run_id)
    button = row.get_by_role("button", name="cancel")
    await expect(button).to_have_text("cancel")
    await button.click()
    await expect(button).to_have_text("confirm cancel")
    assert (await api.ok(f"/api/runs/{run_id}"))["status"] == "RUNNING"  # not yet sent
    await button.click()

    await expect(page.locator("#cancel-notice")).to_have_text(f"Run {run_id} is cancelled.")
    await expect(row).to_have_count(0)
    ended = page.locator("#runs tbody tr", has_text=run_id)
    await expect(ended.locator("td.status")).to_have_text("CANCELLED")
    await expect(ended.locator("td.status")).to_have_css("color", CANCELLED_GREY)
    run = await api.ok(f"/api/runs/{run_id}")
    assert run["status"] == "CANCELLED"
    await ended.click()
    await expect(page.locator("#run-timeline td.type")).to_have_text(["started", "cancelled"])
    await expect(page.locator("#run-timeline tbody tr").last).to_contain_text(
        "cancelled from the console"
    )
    assert watched.errors == []


# -- filters, pages, a failed run's metrics ------------------------------------------------------

PAGE_SIZE = 25  # console.js: runs a page of the recent runs shows
TYPES_PAGE_SIZE = 25  # console.js: job types a page of the summary shows
HISTORY = 60  # runs: more than two pages


@pytest.fixture
async def history(
    topics: Settings, console: Console, session: aiohttp.ClientSession
) -> list[StatusEvent]:
    """`HISTORY` synthetic runs (every ending, some still running, three job types) folded by
    the console; their started events."""
    runs = [lifecycle(n) for n in range(HISTORY)]
    events = [e for run in runs for e in run]
    await publish(topics, events)
    await folded(Api(session, console.url), len(events))
    return [run[0] for run in runs]


def status_of(started: StatusEvent) -> str:
    """The status `lifecycle` gave the run `started` began."""
    n = int(started.event_id[1:])
    ending = ["COMPLETED", "COMPLETED", "FAILED", "TIMED_OUT", "CANCELLED"][n % 5]
    return "RUNNING" if n % 7 == 0 else ending


async def test_filter_the_recent_runs_by_job_type_and_status(
    history: list[StatusEvent], console: Console, open_page: OpenPage
) -> None:
    """The filter form narrows the recent runs to a job type, a status, or both; clicking a
    job type in the summary filters by it, keeping the status chosen."""
    watched = await open_page(console)
    page = watched.page
    shown = page.locator("#runs tbody tr td:nth-child(2)")  # the run IDs, in order
    statuses = page.locator("#runs tbody tr td.status")
    await expect(shown).to_have_text(expected(history, lambda e: True)[:PAGE_SIZE])

    form = page.locator("#filters")
    apply = form.get_by_role("button", name="apply")
    await form.locator("[name=job_type]").fill("mail")
    await apply.click()
    await expect(shown).to_have_text(expected(history, lambda e: e.job_type == "mail"))
    await expect(page.locator("#runs tbody tr td:first-child")).to_have_text(
        ["mail"] * len(expected(history, lambda e: e.job_type == "mail"))
    )

    await form.locator("[name=status]").select_option("FAILED")
    await apply.click()
    mail_failed = expected(history, lambda e: e.job_type == "mail" and status_of(e) == "FAILED")
    assert 1 < len(mail_failed) < PAGE_SIZE
    await expect(shown).to_have_text(mail_failed)
    await expect(statuses).to_have_text(["FAILED"] * len(mail_failed))

    await form.locator("[name=job_type]").fill("")
    await apply.click()
    failed = expected(history, lambda e: status_of(e) == "FAILED")
    assert len(failed) > len(mail_failed)
    await expect(shown).to_have_text(failed)
    await expect(statuses).to_have_text(["FAILED"] * len(failed))

    await page.locator("#types tbody tr[data-job-type='etl']").click()
    await expect(form.locator("[name=job_type]")).to_have_value("etl")
    await expect(shown).to_have_text(
        expected(history, lambda e: e.job_type == "etl" and status_of(e) == "FAILED")
    )

    await form.locator("[name=job_type]").fill("nope")
    await apply.click()
    await expect(page.locator("#runs tbody tr")).to_have_count(0)
    await expect(page.locator("#older")).to_be_disabled()
    assert watched.errors == []


async def test_older_runs_are_a_page_at_a_time(
    history: list[StatusEvent], console: Console, open_page: OpenPage
) -> None:
    """More runs than a page: the page shows the newest page with an enabled "older" button;
    each older page shows the next older runs, from the previous page's cursor, never the
    whole history; "newer" goes back."""
    watched = await open_page(console)
    page = watched.page
    shown = page.locator("#runs tbody tr td:nth-child(2)")
    older, newer = page.locator("#older"), page.locator("#newer")
    pages = [
        expected(history, lambda e: True)[at : at + PAGE_SIZE]
        for at in range(0, HISTORY, PAGE_SIZE)
    ]
    assert [len(runs) for runs in pages] == [PAGE_SIZE, PAGE_SIZE, HISTORY - 2 * PAGE_SIZE]

    await expect(shown).to_have_text(pages[0])
    await expect(page.locator("#page-number")).to_have_text("page 1")
    await expect(newer).to_be_disabled()
    for number, runs in enumerate(pages[1:], start=2):
        await expect(older).to_be_enabled()
        await older.click()
        await expect(page.locator("#page-number")).to_have_text(f"page {number}")
        await expect(shown).to_have_text(runs)
        await expect(newer).to_be_enabled()
    await expect(older).to_be_disabled()  # the oldest page

    await newer.click()
    await expect(page.locator("#page-number")).to_have_text("page 2")
    await expect(shown).to_have_text(pages[1])
    await newer.click()
    await expect(shown).to_have_text(pages[0])
    await expect(newer).to_be_disabled()

    asked = [  # the query of every GET /api/runs the page made
        dict(parse_qsl(url.query))
        for url in map(urlsplit, watched.requested)
        if url.path == "/api/runs"
    ]
    assert asked, "the page asked for no runs"
    assert all(query.get("limit") == str(PAGE_SIZE) for query in asked), asked
    assert sum(1 for query in asked if "cursor" in query) >= 3, asked  # pages 2, 3, 2
    assert watched.errors == []


async def test_job_types_are_a_page_at_a_time(
    topics: Settings, console: Console, session: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """More job types than a page: the summary shows the first page by name, each with its
    chart; "next" shows the rest, "previous" goes back; every load asks for one page of the
    summary and of the charts, never every job type."""
    names = [f"type-{n:02d}" for n in range(TYPES_PAGE_SIZE + 5)]
    runs = [
        [e.model_copy(update={"job_type": name}) for e in lifecycle(n)]
        for n, name in enumerate(names)
    ]
    events = [e for run in runs for e in run]
    await publish(topics, events)
    await folded(Api(session, console.url), len(events))

    watched = await open_page(console)
    page = watched.page
    shown = page.locator("#types tbody tr td:first-child")
    previous, following = page.locator("#types-previous"), page.locator("#types-next")
    numbers = page.locator("#types-page-number")
    await expect(shown).to_have_text(names[:TYPES_PAGE_SIZE])
    await expect(numbers).to_have_text(f"job types 1-{TYPES_PAGE_SIZE}")
    await expect(previous).to_be_disabled()

    await following.click()
    await expect(shown).to_have_text(names[TYPES_PAGE_SIZE:])
    await expect(numbers).to_have_text(f"job types {TYPES_PAGE_SIZE + 1}-{len(names)}")
    await expect(following).to_be_disabled()
    for name, run in zip(names[TYPES_PAGE_SIZE:], runs[TYPES_PAGE_SIZE:], strict=True):
        row = page.locator(f"#types tbody tr[data-job-type='{name}']")
        await expect(row.locator("svg.durations rect.bar")).to_have_count(len(run) - 1)

    await previous.click()
    await expect(shown).to_have_text(names[:TYPES_PAGE_SIZE])
    await expect(previous).to_be_disabled()
    await expect(following).to_be_enabled()

    asked = [
        (url.path, dict(parse_qsl(url.query)))
        for url in map(urlsplit, watched.requested)
        if url.path.startswith("/api/job-types")
    ]
    assert asked, "the page asked for no job types"
    for path, query in asked:
        size = query.get("limit" if path == "/api/job-types" else "types")
        assert size == str(TYPES_PAGE_SIZE), (path, query)
    assert sum(1 for _, query in asked if "cursor" in query) >= 2, asked  # page 2, both calls
    assert watched.errors == []


def failed_run(n: int, error: str) -> list[StatusEvent]:
    """A run that reported progress, then failed with `error` in its metrics, as a worker
    records `fail_job(..., error=...)`."""
    started = lifecycle(7 * n)[0]  # n * 7: a run lifecycle leaves running
    progress = started.model_copy(
        update={
            "event_id": f"p{n}",
            "type": EventType.PROGRESS,
            "from_status": RunStatus.RUNNING,
            "initial_data": None,
            "metrics": {"done": 40},
            "occurred_at": started.occurred_at + timedelta(seconds=2),
        }
    )
    failed = progress.model_copy(
        update={
            "event_id": f"f{n}",
            "type": EventType.FAILED,
            "status": RunStatus.FAILED,
            "metrics": {"done": 40, "error": error},
            "occurred_at": started.occurred_at + timedelta(seconds=5),
        }
    )
    return [started, progress, failed]


async def test_a_failed_runs_metrics_and_error_are_shown(
    topics: Settings, console: Console, session: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """A failed run is red among the recent runs and counted among its job type's failures;
    its timeline shows its progress metrics and the error it failed with, and its fields the
    final metrics."""
    events = [e for n in (1, 2) for e in failed_run(n, f"disk {n} full")]
    await publish(topics, events)
    await folded(Api(session, console.url), len(events))
    run_id = events[-1].run_id
    assert run_id is not None

    watched = await open_page(console)
    page = watched.page
    row = page.locator("#runs tbody tr", has_text=run_id)
    await expect(row.locator("td.status")).to_have_text("FAILED")
    await expect(row.locator("td.status")).to_have_css("color", FAILED_RED)
    summary = page.locator(f"#types tbody tr[data-job-type='{events[-1].job_type}']")
    await expect(summary.locator("td").nth(3)).to_have_text("1")  # failures

    await row.click()
    await expect(page.locator("#run-title")).to_have_text(run_id)
    timeline = page.locator("#run-timeline tbody tr")
    await expect(timeline.locator("td.type")).to_have_text(["started", "progress", "failed"])
    metrics = timeline.locator("td:nth-child(7)")
    await expect(metrics).to_have_text(["", '{"done":40}', '{"done":40,"error":"disk 2 full"}'])
    await expect(timeline.last).to_have_class(re.compile(r"\bstatus-FAILED\b"))
    await expect(page.locator("#run-span")).to_have_text("FAILED after 5.0 s, 3 events.")
    await expect(page.locator("#run-track circle.mark.failed")).to_have_count(1)
    fields = page.locator("#run-fields")
    await expect(fields.locator("dt:text-is('metrics') + dd")).to_have_text(
        '{"done":40,"error":"disk 2 full"}'
    )
    await expect(fields.locator("dt:text-is('status') + dd")).to_have_text("FAILED")
    assert watched.errors == []


# -- the README's screenshot ------------------------------------------------------------------

SHOT_TYPES = {  # job type: (runs, shortest and longest run in seconds, every n-th fails)
    "report.daily": (9, 0.3, 1.6, 4),
    "etl.orders": (12, 0.1, 0.9, 5),
    "mail.digest": (14, 0.05, 0.4, 7),
    "index.rebuild": (6, 0.8, 2.5, 0),
}


async def _runs_of(client: JobClient, job_type: str, seed: int) -> None:
    """Runs of `job_type` one after another, with progress, some failing."""
    import random

    count, shortest, longest, failing = SHOT_TYPES[job_type]
    rng = random.Random(seed)
    for n in range(count):
        decision = await client.start_job(job_type, "acme", {"batch": n})
        assert decision.run_id is not None
        await client.report_progress(job_type, decision.run_id, {"done": 50})
        await asyncio.sleep(rng.uniform(shortest, longest))  # the run's work
        if failing and n % failing == failing - 1:
            await client.fail_job(job_type, decision.run_id, error="upstream timed out")
        else:
            await client.complete_job(job_type, decision.run_id, {"rows": rng.randrange(10**4)})


async def _photograph(console: Console, path: Path, run_id: str) -> None:
    assert CHROMIUM is not None, "no chromium found: apt-get install chromium"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM)
        page = await browser.new_page(viewport={"width": 1280, "height": 900})
        await page.goto(console.url)
        await expect(page.locator("#types svg.durations")).to_have_count(len(SHOT_TYPES))
        await expect(page.locator("#running button.cancel")).to_have_count(2)
        await page.locator("#runs tbody tr", has_text=run_id).click()
        await expect(page.locator("#run-timeline td.type")).to_have_count(3)
        await page.mouse.move(0, 0)  # no row highlighted by the pointer
        await page.evaluate("window.scrollTo(0, 0)")
        path.parent.mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(path), full_page=True)
        await browser.close()


async def screenshot(path: Path, bootstrap: str) -> None:
    """A worker and a console on the broker at `bootstrap` with some runs (ended, cancelled
    and running); the page with one run's timeline open, written to `path`."""
    import tempfile

    from tests.conftest import create_topics

    with tempfile.TemporaryDirectory() as directory:
        settings = Settings(
            bootstrap_servers=bootstrap,
            topic_prefix="jobs",
            db_path=Path(directory) / "worker.db",
            poll_timeout_ms=100,
            http_port=0,
        )
        await create_topics(settings, 2)
        worker = await RunningWorker(settings).start()
        console = await make_console(settings, Path(directory) / "console.db", allow_cancel=True)
        try:
            async with JobClient(settings) as client:
                await asyncio.gather(*(_runs_of(client, t, i) for i, t in enumerate(SHOT_TYPES)))
                cancelled = await client.start_job("etl.orders", "umbrella")
                assert cancelled.run_id is not None
                await client.cancel_job("etl.orders", cancelled.run_id, reason="wrong input")
                for job_type in ("report.daily", "index.rebuild"):
                    started = await client.start_job(job_type, "umbrella", {"day": "today"})
                    assert started.run_id is not None
                    await client.report_progress(job_type, started.run_id, {"done": 30})
            await _photograph(console, path, await _last_ended(console))
        finally:
            await console.stop()
            await worker.stop()
    print(f"wrote {path}")


async def _last_ended(console: Console) -> str:
    """The newest failed run (its timeline is the one shown)."""
    async with aiohttp.ClientSession() as http:
        api = Api(http, console.url)

        async def failed() -> Any:
            runs = (await api.ok("/api/runs", status="FAILED", limit=1))["runs"]
            return runs[0]["run_id"] if runs else None

        return str(await until(failed, "no failed run was read"))


# -- the page's time over a long history ------------------------------------------------------

# Installed before the page's own script: `window.rendered` is the time (ms from the start of
# the navigation) of the first frame in which the recent runs and the job-type summary both
# have rows.
RENDERED = """
(() => {
  const observer = new MutationObserver(() => {
    if (document.querySelector("#runs tbody tr") && document.querySelector("#types tbody tr")) {
      observer.disconnect();
      requestAnimationFrame(() => { window.rendered = performance.now(); });
    }
  });
  observer.observe(document, { childList: true, subtree: true });
})();
"""

# Filter the page to `job_type` and `status` with its form; the ms from the submit to the
# first frame that shows the filtered runs.
FILTER = """
async ([jobType, status]) => {
  const form = document.querySelector("#filters");
  form.elements.job_type.value = jobType;
  form.elements.status.value = status;
  const shown = new Promise((resolve) => {
    new MutationObserver((_, observer) => {
      observer.disconnect();
      requestAnimationFrame(() => resolve(performance.now()));
    }).observe(document.querySelector("#runs tbody"), { childList: true });
  });
  const started = performance.now();
  form.requestSubmit();
  return (await shown) - started;
}
"""


# What the browser timed of the load, in ms: when the document was parsed, and how long each
# of the requests the first render waits for took.
LOAD_TIMES = """
() => {
  const times = { parsed: performance.getEntriesByType("navigation")[0].domContentLoadedEventEnd };
  for (const entry of performance.getEntriesByType("resource")) {
    const path = new URL(entry.name).pathname;
    if (["/api/runs", "/api/job-types", "/api/job-types/durations"].includes(path)) {
      times[`GET ${path}`] = entry.responseEnd - entry.startTime;
    }
  }
  return times;
}
"""


async def time_page(browser: Browser, url: str) -> dict[str, float]:
    """Open the page in a fresh context (nothing cached): the ms to its runs and job types
    shown (and what the browser timed of that load), and the ms the filter form takes to
    show etl's failed runs."""
    context = await browser.new_context(viewport={"width": 1280, "height": 900})
    try:
        page = await context.new_page()
        await page.add_init_script(RENDERED)
        await page.goto(url, wait_until="commit")
        await expect(page.locator("#runs tbody tr")).to_have_count(PAGE_SIZE)
        await expect(page.locator("#types tbody tr")).to_have_count(3)
        await page.wait_for_function("window.rendered !== undefined")
        times = {"runs and job types shown": float(await page.evaluate("window.rendered"))}
        times |= {k: float(v) for k, v in (await page.evaluate(LOAD_TIMES)).items()}
        times["filter (etl, FAILED) to its runs shown"] = float(
            await page.evaluate(FILTER, ["etl", "FAILED"])
        )
        await expect(page.locator("#runs tbody tr td.status")).to_have_text(["FAILED"] * PAGE_SIZE)
        await expect(page.locator("#runs tbody tr td:first-child")).to_have_text(
            ["etl"] * PAGE_SIZE
        )
        return times
    finally:
        await context.close()


async def measure_page(runs: int, bootstrap: str, rounds: int = 5) -> None:
    """A console following a real broker, its file holding `runs` synthetic runs (written
    as the follower folds them); the page's times in Chromium (median of `rounds` loads,
    each in a fresh context, after one not counted) and the API's over the same file."""
    import sqlite3
    import statistics
    import tempfile
    import time

    from tests.conftest import create_topics
    from tests.test_console import build_history, measure, measure_http

    assert CHROMIUM is not None, "no chromium found: apt-get install chromium"
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "console.db"
        started = time.perf_counter()
        await build_history(path, runs)  # the file of the topic jobs.status
        print(f"folded {runs:,} runs in {time.perf_counter() - started:.1f}s")
        with sqlite3.connect(path) as db:
            stored = db.execute("SELECT COUNT(*) FROM runs").fetchone()[0]
            running = db.execute("SELECT COUNT(*) FROM runs WHERE status = 'RUNNING'")
            print(f"runs: {stored:,}, of which running: {running.fetchone()[0]:,}")
        settings = Settings(
            bootstrap_servers=bootstrap,
            topic_prefix="jobs",
            db_path=Path(directory) / "worker.db",
            http_port=0,
        )
        await create_topics(settings, 2)
        # The broker's topic is empty: the follower finds its stored offsets past the end,
        # starts from the beginning and is caught up.
        console = await make_console(settings, path, allow_cancel=False)
        try:
            assert console.follower is not None
            await asyncio.wait_for(console.follower.caught_up.wait(), 60)
            async with async_playwright() as playwright:
                browser = await playwright.chromium.launch(executable_path=CHROMIUM)
                await time_page(browser, console.url)  # a first load, not counted
                loads = [await time_page(browser, console.url) for _ in range(rounds)]
                await browser.close()
        finally:
            await console.stop()
        for label in loads[0]:
            samples = sorted(load[label] for load in loads)
            shown = ", ".join(f"{ms:.0f}" for ms in samples)
            print(f"{statistics.median(samples):8.1f} ms  page: {label} ({shown})")
        for label, ms in (await measure(path)).items():
            print(f"{ms:8.2f} ms  {label}")
        for label, ms in (await measure_http(path)).items():
            print(f"{ms:8.2f} ms  over HTTP: {label}")


if __name__ == "__main__":
    # python -m tests.test_console_browser [docs/console.png]: the README's screenshot
    # python -m tests.test_console_browser --measure [runs]: the page's time over many runs
    import sys

    from worker.devtools.localkafka import LocalKafka

    with LocalKafka() as kafka:
        if sys.argv[1:2] == ["--measure"]:
            count = int(sys.argv[2]) if len(sys.argv) > 2 else 100_000
            asyncio.run(measure_page(count, kafka.bootstrap_servers))
        else:
            target = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/console.png")
            asyncio.run(screenshot(target, kafka.bootstrap_servers))


async def test_thousands_running_at_once_draw_only_the_newest(
    topics: Settings, console: Console, session: aiohttp.ClientSession, open_page: OpenPage
) -> None:
    """With more runs running than the page draws, it draws the newest 200 and says how
    many there are, so a busy fleet's page stays usable."""
    events = [lifecycle(n)[0] for n in range(0, 7 * 230, 7)]  # every 7th run stays running
    await publish(topics, events)
    await folded(Api(session, console.url), len(events))
    page = (await open_page(console)).page
    await expect(page.locator("#running-count")).to_have_text("(230; the newest 200 shown)")
    await expect(page.locator("#running tbody tr")).to_have_count(200)
    newest = max(events, key=lambda e: e.started_at or e.occurred_at)
    assert newest.run_id is not None
    await expect(page.locator("#running tbody tr").first).to_contain_text(newest.run_id)
