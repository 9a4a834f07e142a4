// The console's page: running runs (kept current by the event stream), recent runs with
// filters and pages, one run's timeline, and the job-type summary with a chart of recent
// durations. No build step, no framework; every value from the API goes into the page as
// text, never as HTML.
"use strict";

const ENDINGS = new Set(["completed", "failed", "cancelled", "timed_out"]);
const PAGE_SIZE = 25;
const TYPES_PAGE_SIZE = 25; // job types a page of the summary
const CHART_RUNS = 40; // ended runs a job type's duration chart shows
const SVG = "http://www.w3.org/2000/svg";
const ARMED_MS = 4000; // how long a pressed cancel button waits for its confirmation

const state = {
  running: new Map(), // run_id -> run
  filters: {},
  cursors: [null], // cursors[i]: the cursor of page i + 1
  page: 0,
  next: null,
  typeCursors: [null], // typeCursors[i]: the cursor of the job types' page i + 1
  typePage: 0,
  typesNext: null,
  typeRequests: 0, // job types' loads so far: only the latest one is shown
  allowCancel: false, // from /api/status: the console was started with --allow-cancel
  armed: new Map(), // run_id -> when its cancel button stops waiting for confirmation
  cancelling: new Set(), // run IDs whose cancel request is on its way
  shown: null, // the run ID whose timeline is open
  shownRun: null, // and that run, as last read
  showRequests: 0, // requests for a run's timeline so far
};

function $(selector) {
  return document.querySelector(selector);
}

async function api(path, params) {
  const query = new URLSearchParams();
  for (const [name, value] of Object.entries(params || {})) {
    if (value !== null && value !== undefined && value !== "") query.set(name, value);
  }
  const url = query.toString() ? `${path}?${query}` : path;
  const response = await fetch(url, { headers: { Accept: "application/json" } });
  const body = await response.json();
  if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
  return body;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : "";
}

function seconds(value) {
  if (value === null || value === undefined) return "";
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(1)} s`;
  if (value < 7200) return `${(value / 60).toFixed(1)} min`;
  return `${(value / 3600).toFixed(1)} h`;
}

function json(value) {
  return value === null || value === undefined ? "" : JSON.stringify(value);
}

// -- running ----------------------------------------------------------------------------

function elapsed(run) {
  return seconds((Date.now() - new Date(run.started_at)) / 1000);
}

// Rows drawn at most: a fleet with thousands of runs running at once stays a usable page
// (the count says how many there are; the API and `jobctl status` list them all).
const RUNNING_SHOWN = 200;

function renderRunning() {
  const body = $("#running tbody");
  body.replaceChildren();
  const runs = [...state.running.values()].sort((a, b) => (a.started_at < b.started_at ? 1 : -1));
  for (const run of runs.slice(0, RUNNING_SHOWN)) {
    const row = document.createElement("tr");
    row.className = "clickable status-RUNNING";
    row.dataset.runId = run.run_id;
    row.addEventListener("click", () => showRun(run.run_id));
    cell(row, run.job_type);
    cell(row, run.run_id, "code");
    cell(row, run.client_id);
    cell(row, when(run.started_at));
    cell(row, elapsed(run), "num elapsed");
    cell(row, json(run.metrics), "code");
    if (state.allowCancel) row.appendChild(cancelCell(run));
    body.appendChild(row);
  }
  $("#running-action").hidden = !state.allowCancel;
  $("#running-count").textContent =
    runs.length > RUNNING_SHOWN
      ? `(${runs.length}; the newest ${RUNNING_SHOWN} shown)`
      : runs.length
        ? `(${runs.length})`
        : "";
  $("#running-empty").hidden = runs.length > 0;
}

// Only the "for" column changes with time: updated in place, so rows (and their buttons)
// stay the same elements between two events.
function tickRunning() {
  for (const row of $("#running tbody").rows) {
    const run = state.running.get(row.dataset.runId);
    if (run) row.querySelector(".elapsed").textContent = elapsed(run);
  }
  const now = Date.now();
  for (const [runId, until] of state.armed) {
    if (until <= now) {
      state.armed.delete(runId);
      renderRunning();
    }
  }
  const shown = state.shownRun;
  if (shown && shown.status === "RUNNING" && !$("#run-section").hidden) {
    renderRunActions(shown);
    renderTimeline(shown);
  }
}

// -- cancelling (only when the console runs with --allow-cancel) ------------------------

function cancelButton(runId) {
  const button = document.createElement("button");
  button.type = "button";
  button.className = "cancel";
  const armed = state.armed.has(runId);
  button.textContent = state.cancelling.has(runId) ? "cancelling…" : armed ? "confirm cancel" : "cancel";
  button.disabled = state.cancelling.has(runId);
  if (armed) button.classList.add("armed");
  button.addEventListener("click", (clicked) => {
    clicked.stopPropagation(); // not a click on the row
    if (!state.armed.has(runId)) {
      state.armed.set(runId, Date.now() + ARMED_MS);
    } else {
      state.armed.delete(runId);
      cancelRun(runId);
    }
    renderRunning();
    if (state.shownRun && state.shownRun.run_id === runId) renderRunActions(state.shownRun);
  });
  return button;
}

function cancelCell(run) {
  const td = document.createElement("td");
  td.appendChild(cancelButton(run.run_id));
  return td;
}

async function cancelRun(runId) {
  state.cancelling.add(runId);
  const notice = $("#cancel-notice");
  try {
    const response = await fetch(`/api/runs/${encodeURIComponent(runId)}`, {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify({ status: "CANCELLED", reason: "cancelled from the console" }),
    });
    const body = await response.json();
    if (!response.ok) throw new Error(body.error || `HTTP ${response.status}`);
    notice.textContent = `Run ${runId} is cancelled.`;
    notice.className = "notice";
  } catch (failure) {
    notice.textContent = `Run ${runId} was not cancelled: ${failure.message}`;
    notice.className = "notice error";
  } finally {
    state.cancelling.delete(runId);
    notice.hidden = false;
    renderRunning();
    if (state.shown === runId) showRun(runId, false);
  }
}

async function loadRunning() {
  const found = new Map();
  let cursor = null;
  for (let pages = 0; pages < 20; pages++) {
    const page = await api("/api/runs/running", { limit: 500, cursor });
    for (const run of page.runs) found.set(run.run_id, run);
    if (!page.next) break;
    cursor = page.next;
  }
  state.running = found;
  renderRunning();
}

function applyToRunning(event) {
  if (!event.run_id) return;
  if (event.type === "started") {
    state.running.set(event.run_id, {
      run_id: event.run_id,
      job_type: event.job_type,
      client_id: event.client_id,
      started_at: event.started_at || event.occurred_at,
      metrics: null,
    });
  } else if (ENDINGS.has(event.type)) {
    state.running.delete(event.run_id);
    state.armed.delete(event.run_id);
  } else if (event.type === "progress" && state.running.has(event.run_id)) {
    state.running.get(event.run_id).metrics = event.metrics;
  } else {
    return;
  }
  renderRunning();
}

// -- recent runs ------------------------------------------------------------------------

async function loadRuns() {
  const error = $("#runs-error");
  try {
    const page = await api("/api/runs", {
      ...state.filters,
      limit: PAGE_SIZE,
      cursor: state.cursors[state.page],
    });
    error.hidden = true;
    state.next = page.next;
    renderRuns(page.runs);
  } catch (failure) {
    error.textContent = failure.message;
    error.hidden = false;
  }
  $("#newer").disabled = state.page === 0;
  $("#older").disabled = !state.next;
  $("#page-number").textContent = `page ${state.page + 1}`;
}

function renderRuns(runs) {
  const body = $("#runs tbody");
  body.replaceChildren();
  for (const run of runs) {
    const row = document.createElement("tr");
    row.className = `clickable status-${run.status}`;
    row.addEventListener("click", () => showRun(run.run_id));
    cell(row, run.job_type);
    cell(row, run.run_id, "code");
    cell(row, run.client_id);
    cell(row, run.status, "status");
    cell(row, when(run.started_at));
    cell(row, seconds(run.duration_s), "num");
    cell(row, run.reason);
    body.appendChild(row);
  }
}

function readFilters(form) {
  const filters = {};
  for (const [name, value] of new FormData(form).entries()) {
    if (!value) continue;
    filters[name] = name === "since" || name === "until" ? new Date(value).toISOString() : value;
  }
  return filters;
}

// -- one run: its fields and its timeline ----------------------------------------------

function svg(name, attributes, parent) {
  const element = document.createElementNS(SVG, name);
  for (const [key, value] of Object.entries(attributes)) element.setAttribute(key, String(value));
  if (parent) parent.appendChild(element);
  return element;
}

function tooltip(element, text) {
  svg("title", {}, element).textContent = text;
}

function offset(value) {
  if (value === null || value === undefined) return "";
  return value < 0 ? `-${seconds(-value)}` : `+${seconds(value)}`;
}

// The run's events in time order (the stream's order among equal times), with when each
// occurred after the run started and after the event before it.
function timeline(run) {
  const start = new Date(run.started_at).getTime();
  const events = [...run.events].sort((a, b) => {
    const at = new Date(a.occurred_at) - new Date(b.occurred_at);
    return at !== 0 ? at : a.seq - b.seq;
  });
  let previous = null;
  return events.map((event) => {
    const at = new Date(event.occurred_at).getTime();
    const entry = {
      event,
      sinceStart: (at - start) / 1000,
      sincePrevious: previous === null ? null : (at - previous) / 1000,
    };
    previous = at;
    return entry;
  });
}

function runFields(run) {
  const fields = $("#run-fields");
  fields.replaceChildren();
  const names = ["job_type", "status", "client_id", "request_id", "started_at", "ended_at"];
  for (const name of [...names, "initial_data", "metrics"]) {
    const term = document.createElement("dt");
    term.textContent = name;
    const value = document.createElement("dd");
    if (name === "initial_data" || name === "metrics") {
      value.className = "code";
      value.textContent = json(run[name]);
    } else {
      value.textContent = run[name] === null ? "" : String(run[name]);
    }
    fields.append(term, value);
  }
}

function drawTrack(run, entries) {
  const track = $("#run-track");
  track.replaceChildren();
  const width = 600;
  const left = 10;
  const right = width - 10;
  const running = run.status === "RUNNING";
  const last = entries.length ? entries[entries.length - 1].sinceStart : 0;
  const now = (Date.now() - new Date(run.started_at)) / 1000;
  const span = Math.max(running ? now : last, 0.001);
  const first = Math.min(0, entries.length ? entries[0].sinceStart : 0);
  const x = (t) => left + ((t - first) / (span - first)) * (right - left);
  svg("line", { x1: x(0), x2: x(span), y1: 14, y2: 14, class: running ? "span open" : "span" }, track);
  for (const entry of entries) {
    const dot = svg("circle", { cx: x(entry.sinceStart), cy: 14, r: 6, class: `mark ${entry.event.type}` }, track);
    tooltip(dot, `${entry.event.type} ${offset(entry.sinceStart)}`);
  }
  svg("text", { x: left, y: 34, class: "axis" }, track).textContent = "started";
  const end = svg("text", { x: right, y: 34, class: "axis end" }, track);
  end.textContent = running ? `running for ${seconds(now)}` : `${run.status} ${offset(last)}`;
}

function renderTimeline(run) {
  const entries = timeline(run);
  const duration = run.duration_s;
  $("#run-span").textContent =
    run.status === "RUNNING"
      ? `Running for ${elapsed(run)}, ${entries.length} events so far.`
      : `${run.status} after ${seconds(duration)}, ${entries.length} events.`;
  drawTrack(run, entries);
  const body = $("#run-timeline tbody");
  body.replaceChildren();
  for (const { event, sinceStart, sincePrevious } of entries) {
    const row = document.createElement("tr");
    row.className = event.status ? `status-${event.status}` : "";
    cell(row, offset(sinceStart), "num at");
    cell(row, offset(sincePrevious), "num gap");
    cell(row, event.type, "type");
    cell(row, event.status, "status");
    cell(row, when(event.occurred_at));
    cell(row, event.reason);
    cell(row, json(event.metrics), "code");
    const source = event.source;
    cell(row, source ? `${source.topic}[${source.partition}]@${source.offset}` : "", "code");
    body.appendChild(row);
  }
}

function renderRunActions(run) {
  const actions = $("#run-actions");
  actions.replaceChildren();
  if (state.allowCancel && run.status === "RUNNING") actions.appendChild(cancelButton(run.run_id));
}

async function showRun(runId, scroll = true) {
  // Events may ask for the same run again before an earlier answer came: only the answer
  // to the latest request is shown, so an older one never replaces a newer one.
  const request = ++state.showRequests;
  let run;
  try {
    run = await api(`/api/runs/${encodeURIComponent(runId)}`);
  } catch (failure) {
    if (request !== state.showRequests) return;
    $("#run-title").textContent = `${runId}: ${failure.message}`;
    $("#run-section").hidden = false;
    return;
  }
  if (request !== state.showRequests) return;
  state.shown = runId;
  state.shownRun = run;
  $("#run-title").textContent = run.run_id;
  runFields(run);
  renderRunActions(run);
  renderTimeline(run);
  $("#run-section").hidden = false;
  if (scroll) $("#run-section").scrollIntoView({ behavior: "smooth" });
}

// -- job types and their duration charts ------------------------------------------------

// Bars of the last ended runs' durations, the newest on the right edge, each as tall as its
// share of the longest, coloured by how the run ended.
function durationChart(runs) {
  const width = 200;
  const height = 32;
  const chart = svg("svg", { class: "durations", width, height, viewBox: `0 0 ${width} ${height}`, role: "img" });
  const longest = Math.max(...runs.map((r) => r.duration_s || 0), 0);
  chart.setAttribute("aria-label", `${runs.length} ended runs, the longest ${seconds(longest)}`);
  const step = width / CHART_RUNS;
  runs.forEach((run, index) => {
    const h = longest > 0 ? Math.max(1, (run.duration_s / longest) * (height - 2)) : 1;
    const bar = svg("rect", {
      x: width - (runs.length - index) * step,
      y: height - h,
      width: Math.max(1, step - 1),
      height: h,
      class: `bar status-${run.status}`,
    }, chart);
    tooltip(bar, `${run.run_id}: ${run.status} after ${seconds(run.duration_s)}`);
  });
  return chart;
}

async function loadTypes() {
  const request = ++state.typeRequests;
  const page = { types: TYPES_PAGE_SIZE, cursor: state.typeCursors[state.typePage] };
  const [{ job_types: types, next }, { job_types: charts }] = await Promise.all([
    api("/api/job-types", { limit: page.types, cursor: page.cursor }),
    api("/api/job-types/durations", { limit: CHART_RUNS, ...page }),
  ]);
  if (request !== state.typeRequests) return; // a later load (another page) answers instead
  const durations = new Map(charts.map((entry) => [entry.job_type, entry.runs]));
  const body = $("#types tbody");
  body.replaceChildren();
  for (const entry of types) {
    const row = document.createElement("tr");
    row.className = "clickable";
    row.dataset.jobType = entry.job_type;
    row.addEventListener("click", () => {
      $("#filters [name=job_type]").value = entry.job_type;
      $("#filters").requestSubmit();
    });
    cell(row, entry.job_type);
    cell(row, entry.runs, "num");
    cell(row, entry.running, "num");
    cell(row, entry.failures, "num");
    cell(row, entry.timeouts, "num");
    cell(row, entry.cancelled, "num");
    cell(row, seconds(entry.median_duration_s), "num");
    cell(row, seconds(entry.p95_duration_s), "num");
    const recent = durations.get(entry.job_type) || [];
    cell(row, "", "chart").appendChild(durationChart(recent));
    const last = entry.last_run;
    cell(row, last ? `${last.status}, ${when(last.started_at)}` : "");
    body.appendChild(row);
  }
  $("#types-empty").hidden = types.length > 0 || state.typePage > 0;
  state.typesNext = next;
  const first = state.typePage * TYPES_PAGE_SIZE + 1;
  $("#types-page-number").textContent = types.length
    ? `job types ${first}-${first + types.length - 1}`
    : "no more job types";
  $("#types-previous").disabled = state.typePage === 0;
  $("#types-next").disabled = !next;
}

// -- the event stream and the status line ----------------------------------------------

function later(action, delay) {
  let timer = null;
  return () => {
    if (timer === null) {
      timer = setTimeout(() => {
        timer = null;
        action().catch(() => {});
      }, delay);
    }
  };
}

function follow() {
  const refreshRuns = later(() => (state.page === 0 ? loadRuns() : Promise.resolve()), 1000);
  const refreshTypes = later(loadTypes, 5000);
  const stream = new EventSource("/api/events");
  let loaded = false;
  const early = [];
  stream.addEventListener("open", () => {
    // The stream is subscribed: what started since is in it, so the list may be loaded.
    if (!loaded) {
      loadRunning()
        .then(() => {
          loaded = true;
          early.splice(0).forEach(applyToRunning);
        })
        .catch(() => {});
    }
  });
  stream.addEventListener("message", (message) => {
    const event = JSON.parse(message.data);
    if (loaded) applyToRunning(event);
    else early.push(event);
    if (event.run_id && event.run_id === state.shown) showRun(event.run_id, false);
    refreshRuns();
    if (ENDINGS.has(event.type) || event.type === "started") refreshTypes();
  });
  // An overflow closes the stream; EventSource reconnects with Last-Event-ID and catches up.
}

async function showFollowing() {
  try {
    const status = await api("/api/status");
    const lag = status.lag === null ? "" : `, ${status.lag} behind`;
    const caught = status.caught_up ? "" : " (catching up)";
    const cancel = status.allow_cancel ? "; runs may be cancelled here" : "";
    $("#following").textContent = `following ${status.topic}${caught}${lag}${cancel}`;
    if (status.allow_cancel !== state.allowCancel) {
      state.allowCancel = status.allow_cancel;
      renderRunning();
    }
  } catch (failure) {
    $("#following").textContent = `the console does not answer: ${failure.message}`;
  }
}

function start() {
  $("#filters").addEventListener("submit", (submitted) => {
    submitted.preventDefault();
    state.filters = readFilters(submitted.target);
    state.cursors = [null];
    state.page = 0;
    loadRuns();
  });
  $("#older").addEventListener("click", () => {
    if (!state.next) return;
    state.cursors[state.page + 1] = state.next;
    state.page += 1;
    loadRuns();
  });
  $("#newer").addEventListener("click", () => {
    if (state.page === 0) return;
    state.page -= 1;
    loadRuns();
  });
  $("#types-next").addEventListener("click", () => {
    if (!state.typesNext) return;
    state.typeCursors[state.typePage + 1] = state.typesNext;
    state.typePage += 1;
    loadTypes().catch(() => {});
  });
  $("#types-previous").addEventListener("click", () => {
    if (state.typePage === 0) return;
    state.typePage -= 1;
    loadTypes().catch(() => {});
  });
  $("#run-close").addEventListener("click", () => {
    $("#run-section").hidden = true;
    state.shown = null;
    state.shownRun = null;
    state.showRequests += 1; // an answer on its way is not shown
  });
  follow();
  loadRuns();
  loadTypes().catch(() => {});
  showFollowing();
  setInterval(showFollowing, 5000);
  setInterval(tickRunning, 1000);
  setInterval(() => loadTypes().catch(() => {}), 30000);
}

document.addEventListener("DOMContentLoaded", start);
