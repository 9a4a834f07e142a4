// The console's page: running runs (kept current by the event stream), recent runs with
// filters and pages, one run's history, and the job-type summary. No build step, no
// framework; every value from the API goes into the page as text, never as HTML.
"use strict";

const ENDINGS = new Set(["completed", "failed", "cancelled", "timed_out"]);
const PAGE_SIZE = 25;

const state = {
  running: new Map(), // run_id -> run
  filters: {},
  cursors: [null], // cursors[i]: the cursor of page i + 1
  page: 0,
  next: null,
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

function renderRunning() {
  const body = $("#running tbody");
  body.replaceChildren();
  const runs = [...state.running.values()].sort((a, b) => (a.started_at < b.started_at ? 1 : -1));
  for (const run of runs) {
    const row = document.createElement("tr");
    row.className = "clickable status-RUNNING";
    row.addEventListener("click", () => showRun(run.run_id));
    cell(row, run.job_type);
    cell(row, run.run_id, "code");
    cell(row, run.client_id);
    cell(row, when(run.started_at));
    cell(row, seconds((Date.now() - new Date(run.started_at)) / 1000), "num");
    cell(row, json(run.metrics), "code");
    body.appendChild(row);
  }
  $("#running-count").textContent = runs.length ? `(${runs.length})` : "";
  $("#running-empty").hidden = runs.length > 0;
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

// -- one run ----------------------------------------------------------------------------

async function showRun(runId) {
  let run;
  try {
    run = await api(`/api/runs/${encodeURIComponent(runId)}`);
  } catch (failure) {
    $("#run-title").textContent = `${runId}: ${failure.message}`;
    $("#run-section").hidden = false;
    return;
  }
  $("#run-title").textContent = run.run_id;
  const fields = $("#run-fields");
  fields.replaceChildren();
  for (const name of ["job_type", "status", "client_id", "request_id", "started_at", "ended_at"]) {
    const term = document.createElement("dt");
    term.textContent = name;
    const value = document.createElement("dd");
    value.textContent = run[name] === null ? "" : String(run[name]);
    fields.append(term, value);
  }
  for (const name of ["initial_data", "metrics"]) {
    const term = document.createElement("dt");
    term.textContent = name;
    const value = document.createElement("dd");
    value.className = "code";
    value.textContent = json(run[name]);
    fields.append(term, value);
  }
  const body = $("#run-events tbody");
  body.replaceChildren();
  for (const event of run.events) {
    const row = document.createElement("tr");
    row.className = event.status ? `status-${event.status}` : "";
    cell(row, event.seq, "num");
    cell(row, event.type);
    cell(row, event.status, "status");
    cell(row, when(event.occurred_at));
    cell(row, event.reason);
    cell(row, json(event.metrics), "code");
    const source = event.source;
    cell(row, source ? `${source.topic}[${source.partition}]@${source.offset}` : "", "code");
    body.appendChild(row);
  }
  $("#run-section").hidden = false;
  $("#run-section").scrollIntoView({ behavior: "smooth" });
}

// -- job types --------------------------------------------------------------------------

async function loadTypes() {
  const { job_types: types } = await api("/api/job-types");
  const body = $("#types tbody");
  body.replaceChildren();
  for (const entry of types) {
    const row = document.createElement("tr");
    row.className = "clickable";
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
    const last = entry.last_run;
    cell(row, last ? `${last.status}, ${when(last.started_at)}` : "");
    body.appendChild(row);
  }
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
    $("#following").textContent = `following ${status.topic}${caught}${lag}`;
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
  $("#run-close").addEventListener("click", () => {
    $("#run-section").hidden = true;
  });
  follow();
  loadRuns();
  loadTypes().catch(() => {});
  showFollowing();
  setInterval(showFollowing, 5000);
  setInterval(renderRunning, 1000);
  setInterval(() => loadTypes().catch(() => {}), 30000);
}

document.addEventListener("DOMContentLoaded", start);
