// The matrixjobs dashboard. Every text shown about a job (status word, percent, counts,
// ETA, timing, attempt) comes worded from the server (`text` of each item); this file
// only places it. Data goes into the page with textContent, never as HTML.
"use strict";

const FINISHED_SHOWN = 50;
// Finished items the page remembers (filters search these): a page left open for days
// must not keep every job it ever saw.
const FINISHED_KEPT = 500;
// After the stream was refused (a store that cannot be read answers 503), try again this
// often; EventSource itself gives up on an error answer.
const RECONNECT_MS = 2000;
const items = new Map(); // id -> {event, text}
let source = null;
let route = { kind: "list" };
let logAbort = null;
let renderQueued = false;

const $ = (id) => document.getElementById(id);

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(props)) {
    if (key === "text") node.textContent = value;
    else if (key === "class") node.className = value;
    else node.setAttribute(key, value);
  }
  for (const child of children) node.append(child);
  return node;
}

// -- the live stream --------------------------------------------------------------------------

function connect() {
  if (source) source.close();
  const focus = route.kind === "list" ? "" : `?focus=${encodeURIComponent(route.id)}`;
  source = new EventSource(`/v1/events${focus}`);
  source.addEventListener("open", () => { $("connection").textContent = "live"; });
  source.addEventListener("snapshot", (message) => {
    const snapshot = JSON.parse(message.data);
    items.clear();
    for (const item of snapshot.items) items.set(item.event.id, item);
    showHealth(snapshot.health);
    scheduleRender();
  });
  source.addEventListener("health", (message) => showHealth(JSON.parse(message.data)));
  const upsert = (message) => {
    const item = JSON.parse(message.data);
    const known = items.get(item.event.id);
    // A page keeps the newest state it has seen; a terminal state is final.
    if (known && known.event.updatedAt > item.event.updatedAt && !isTerminal(item.event)) return;
    if (known && isTerminal(known.event) && !isTerminal(item.event)) return;
    items.set(item.event.id, item);
    if (isTerminal(item.event)) prune();
    scheduleRender();
  };
  source.addEventListener("update", upsert);
  source.addEventListener("refresh", upsert);
  source.addEventListener("error", onStreamError);
}

async function onStreamError() {
  $("connection").textContent = "reconnecting…";
  const probe = await fetch("/v1/status", { method: "GET" }).catch(() => null);
  if (probe && probe.status === 401) {
    window.location.assign("/login");
    return;
  }
  if (probe && probe.status === 503) {
    // The store cannot even be read: the service's own words ("store: unreachable; …").
    const body = await probe.json().catch(() => null);
    if (body?.error?.code === "store_unavailable") showHealth({ text: body.error.message });
  }
  if (source.readyState === EventSource.CLOSED) setTimeout(connect, RECONNECT_MS);
}

// One line while the store is in trouble, worded by the service; hidden while it is fine.
function showHealth(health) {
  const text = health?.text ?? "";
  $("degraded").textContent = text;
  $("degraded").hidden = !text;
}

function prune() {
  const finished = [...items.values()].filter(
    (item) => isTerminal(item.event) && item.event.id !== route.id);
  if (finished.length <= FINISHED_KEPT) return;
  finished.sort((a, b) => ((a.event.finishedAt ?? "") > (b.event.finishedAt ?? "") ? 1 : -1));
  for (const item of finished.slice(0, finished.length - FINISHED_KEPT)) {
    items.delete(item.event.id);
  }
}

function isTerminal(event) {
  return ["completed", "failed", "cancelled"].includes(event.status);
}

function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}

// -- pieces -----------------------------------------------------------------------------------

function bar(item) {
  const value = item.text.bar;
  const fill = el("span");
  const attrs = { class: "bar", role: "progressbar", "aria-valuemin": "0", "aria-valuemax": "100",
                  "aria-label": `${item.event.id} progress` };
  if (value === null || value === undefined) {
    attrs.class = "bar indeterminate";
  } else {
    attrs["aria-valuenow"] = String(Math.floor(value));
    attrs["aria-valuetext"] = item.text.percent;
    fill.style.width = `${Math.min(value, 100)}%`;
  }
  return el("span", attrs, [fill]);
}

function progressCell(item) {
  return el("td", { class: "progress" }, [bar(item), `${item.text.percent} ${item.text.counts}`.trim()]);
}

function pageLink(event) {
  const kind = event.type === "batch" ? "batches" : "jobs";
  return el("a", { href: `#/${kind}/${encodeURIComponent(event.id)}`, text: event.id });
}

function step(event) {
  const operation = event.batchDetails?.currentOperation;
  return [operation, event.message].filter(Boolean).join(": ");
}

function target(event) {
  return event.name.split(" ")[0];
}

// -- the list ---------------------------------------------------------------------------------

function filtered() {
  const state = $("filter-state").value;
  const wantedTarget = $("filter-target").value;
  const requester = $("filter-requester").value;
  const search = $("search").value.trim().toLowerCase();
  const active = [];
  const finished = [];
  for (const item of items.values()) {
    const event = item.event;
    if (state === "active" && isTerminal(event)) continue;
    if (state && state !== "active" && event.status !== state) continue;
    if (wantedTarget && target(event) !== wantedTarget) continue;
    if (requester && (event.requester ?? "") !== requester) continue;
    if (search && !event.id.toLowerCase().includes(search)) continue;
    (isTerminal(event) ? finished : active).push(item);
  }
  const newest = (a, b) => (b.event.createdAt > a.event.createdAt ? 1 : -1);
  active.sort(newest);
  finished.sort((a, b) => ((b.event.finishedAt ?? "") > (a.event.finishedAt ?? "") ? 1 : -1));
  return [...active, ...finished.slice(0, FINISHED_SHOWN)];
}

function row(item) {
  const event = item.event;
  return el("tr", { class: `status-${event.status}`, "data-id": event.id }, [
    el("td", {}, [pageLink(event)]),
    el("td", { text: event.name }),
    el("td", { class: "status", text: item.text.status }),
    progressCell(item),
    el("td", { text: step(event) }),
    el("td", { text: item.text.timing }),
    el("td", { text: event.requester ?? "" }),
    el("td", { text: item.text.attempt }),
  ]);
}

function fillOptions(select, values) {
  const chosen = select.value;
  const wanted = ["", ...[...values].sort()];
  const present = [...select.options].map((option) => option.value);
  if (wanted.join("\n") === present.join("\n")) return;
  select.replaceChildren(...wanted.map((value) => el("option", { value, text: value || "all" })));
  select.value = wanted.includes(chosen) ? chosen : "";
}

function renderList() {
  const shown = filtered();
  $("items").tBodies[0].replaceChildren(...shown.map(row));
  $("empty").hidden = shown.length > 0;
  const all = [...items.values()].map((item) => item.event);
  fillOptions($("filter-target"), new Set(all.map(target)));
  fillOptions($("filter-requester"), new Set(all.map((event) => event.requester).filter(Boolean)));
}

// -- the job and batch pages ------------------------------------------------------------------

function fact(name, value) {
  return value ? [el("dt", { text: name }), el("dd", { text: value })] : [];
}

function renderDetail() {
  const item = items.get(route.id);
  $("detail-title").textContent = item ? `${item.event.id} ${item.event.name}` : route.id;
  $("detail-missing").hidden = Boolean(item);
  $("detail-body").hidden = !item;
  if (!item) return;
  const event = item.event;
  const facts = [
    ...fact("Status", item.text.status),
    ...fact("Step", step(event)),
    ...fact("Time", item.text.timing),
    ...fact("Requester", event.requester),
    ...fact("Started by", item.text.startedBy),
    ...fact("Attempt", item.text.attempt),
    ...fact("Approval", item.text.approval),
    ...fact("Error", event.error),
  ];
  const link = messageLinks.get(event.id);
  if (link) {
    facts.push(el("dt", { text: "In the room" }),
               el("dd", {}, [el("a", { href: link, rel: "noopener", text: "progress message" })]));
  }
  $("detail-facts").replaceChildren(...facts);
  $("detail-bar").replaceChildren(bar(item), ` ${item.text.percent} ${item.text.counts}`);
  $("cancel").disabled = isTerminal(event);
  for (const id of ["approve", "deny", "deny-reason"]) $(id).hidden = !item.text.awaiting;
  if (route.kind === "batches") renderOperations();
}

function renderOperations() {
  const operations = [...items.values()].filter((item) => item.event.jobDetails?.batchId === route.id);
  operations.sort((a, b) => (a.event.createdAt > b.event.createdAt ? 1 : -1));
  const rows = operations.map((item) => el("tr", { class: `status-${item.event.status}` }, [
    el("td", {}, [pageLink(item.event)]),
    el("td", { text: item.event.name }),
    el("td", { class: "status", text: item.text.status }),
    progressCell(item),
    el("td", { text: item.event.message ?? "" }),
    el("td", { text: item.text.timing }),
    el("td", { text: item.text.attempt }),
  ]));
  $("operations").querySelector("tbody").replaceChildren(...rows);
}

function render() {
  if (route.kind === "list") renderList();
  else if (route.kind !== "audit") renderDetail();
}

// The matrix.to link is read once per page (a store read on the server, not on every event).
const messageLinks = new Map();

async function loadMessageLink(kind, id) {
  const response = await fetch(`/v1/${kind}/${encodeURIComponent(id)}`).catch(() => null);
  if (!response || !response.ok) return;
  const event = await response.json();
  if (event.messageUrl && event.messageUrl.startsWith("https://matrix.to/")) {
    messageLinks.set(id, event.messageUrl);
    scheduleRender();
  }
}

async function followLog(id) {
  const pre = $("log-text");
  pre.replaceChildren();
  $("log").hidden = false;
  logAbort = new AbortController();
  try {
    const response = await fetch(`/v1/jobs/${encodeURIComponent(id)}/log?follow=true`,
                                  { signal: logAbort.signal });
    if (!response.ok || !response.body) {
      pre.textContent = "log not available";
      return;
    }
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      pre.append(value);
    }
  } catch (error) {
    if (error.name !== "AbortError") pre.append("\n(log interrupted)");
  }
}

async function act(action, body) {
  const kind = route.kind;
  const result = $("action-result");
  result.textContent = "…";
  const request = body === undefined ? { method: "POST" }
    : { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  const response = await fetch(`/v1/${kind}/${encodeURIComponent(route.id)}/${action}`, request)
    .catch(() => null);
  if (!response) {
    result.textContent = "the service cannot be reached";
  } else if (response.ok) {
    const event = await response.json();
    result.textContent = action === "rerun" ? `started ${event.id}` : `${event.id} ${event.status}`;
    if (action === "rerun") window.location.hash = `#/${kind}/${encodeURIComponent(event.id)}`;
  } else {
    const body = await response.json().catch(() => null);
    result.textContent = body?.error?.message ?? `failed (${response.status})`;
  }
}

// -- the audit page ---------------------------------------------------------------------------

const AUDIT_REFRESH_MS = 5000;
let auditTimer = null;

async function loadAudit() {
  if (route.kind !== "audit") return;
  const [listed, checked] = await Promise.all([
    fetch("/v1/audit?limit=200").catch(() => null),
    fetch("/v1/audit/verify").catch(() => null),
  ]);
  const verdict = $("audit-verdict");
  if (!listed || !listed.ok) {
    verdict.textContent = "the audit log cannot be read now";
  } else {
    const records = (await listed.json()).records.reverse(); // newest first
    $("audit").querySelector("tbody").replaceChildren(...records.map((record) => el("tr", {}, [
      el("td", { text: String(record.seq) }),
      el("td", { text: new Date(record.at * 1000).toISOString().slice(0, 19).replace("T", " ") }),
      el("td", { text: record.action }),
      el("td", { text: record.subject ?? "" }),
      el("td", { text: record.target ?? "" }),
      el("td", { text: record.actor }),
      el("td", { text: record.roomId ? `${record.via} ${record.roomId}` : record.via }),
      el("td", { text: Object.keys(record.detail).length ? JSON.stringify(record.detail) : "" }),
    ])));
    if (checked && checked.ok) {
      const result = await checked.json();
      verdict.textContent = result.ok ? `chain verified: ${result.records} records`
        : `chain broken: ${result.problems.join("; ")}`;
      verdict.className = result.ok ? "verified" : "broken";
    }
  }
  auditTimer = setTimeout(loadAudit, AUDIT_REFRESH_MS);
}

// -- routing ----------------------------------------------------------------------------------

function parseRoute() {
  if (window.location.hash === "#/audit") return { kind: "audit" };
  const match = window.location.hash.match(/^#\/(jobs|batches)\/([^/]+)$/);
  return match ? { kind: match[1], id: decodeURIComponent(match[2]) } : { kind: "list" };
}

function onRoute() {
  const previous = route;
  route = parseRoute();
  if (logAbort) logAbort.abort();
  $("list-view").hidden = route.kind !== "list";
  $("detail-view").hidden = route.kind === "list" || route.kind === "audit";
  $("audit-view").hidden = route.kind !== "audit";
  clearTimeout(auditTimer);
  if (route.kind === "audit") {
    loadAudit();
    return;
  }
  $("action-result").textContent = "";
  $("log").hidden = true;
  $("operations").hidden = route.kind !== "batches";
  if (route.kind !== "list") {
    loadMessageLink(route.kind, route.id);
    if (route.kind === "jobs") followLog(route.id);
  }
  // A job or batch page asks for its subject in the snapshot (it may be long finished).
  if (route.kind !== previous.kind || route.id !== previous.id || !source) connect();
  render();
}

async function showWho() {
  const response = await fetch("/v1/whoami").catch(() => null);
  if (!response || !response.ok) return;
  const who = await response.json();
  $("who").textContent = who.admin ? "service token" : who.user;
}

function init() {
  showWho();
  for (const id of ["filter-state", "filter-target", "filter-requester", "search"]) {
    $(id).addEventListener("input", scheduleRender);
  }
  $("search").addEventListener("keydown", (key) => {
    const wanted = $("search").value.trim().toLowerCase();
    const match = /^[jb]\d+$/.test(wanted) && key.key === "Enter";
    if (match) window.location.hash = `#/${wanted[0] === "b" ? "batches" : "jobs"}/${wanted}`;
  });
  $("cancel").addEventListener("click", () => act("cancel"));
  $("rerun").addEventListener("click", () => act("rerun"));
  $("approve").addEventListener("click", () => act("approve"));
  $("deny").addEventListener("click", () => {
    const reason = $("deny-reason").value.trim();
    act("deny", reason ? { reason } : {});
  });
  window.addEventListener("hashchange", onRoute);
  onRoute();
}

init();
