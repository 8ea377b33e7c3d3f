// One device: identity, model, engine and delegate chain, its charts with model changes
// marked, alerts and the recent events.

import { api, ago, clock, fill, h, kindClass, modelLabel, num, pendingTag, startPolling, takeToken, windowSelect }
  from "./common.js";
import { lineChart } from "./charts.js";
import { driftBadge, renderDeviceQuality } from "./quality.js";

const deviceId = decodeURIComponent(location.pathname.replace(/^\/devices\//, "").replace(/\/$/, ""));
document.getElementById("device-title").textContent = deviceId;
document.title = `${deviceId} · litefleet`;

takeToken();
const windowS = windowSelect(() => poller.refresh());
const poller = startPolling(load);

async function load() {
  const doc = await api(`/api/v1/devices/${encodeURIComponent(deviceId)}?since=-${windowS()}`);
  const now = Date.now() / 1000;
  const d = doc.device;
  renderSummary(d, now);
  renderIdentity(d);
  renderEngine(d);
  renderCharts(doc.telemetry, doc.since, now);
  renderAlerts(doc.alerts);
  renderEvents(doc.events);
  renderDrift(d, doc.quality);
}

function renderDrift(d, quality) {
  const threshold = quality ? quality.drift_threshold : null;
  fill("v-drift", driftBadge(d.drift, threshold));
  document.getElementById("card-drift").classList.toggle("bad", !!d.drift && threshold !== null && d.drift.score > threshold);
  renderDeviceQuality(document.getElementById("quality-rows"), quality);
}

function renderSummary(d, now) {
  const state = d.online ? "online" : "offline";
  document.getElementById("state-dot").className = `dot ${state}`;
  document.body.dataset.state = state;
  const card = document.getElementById("card-state");
  card.classList.toggle("ok", d.online);
  card.classList.toggle("bad", !d.online);
  fill("v-state", state + (d.online ? "" : d.offline_reason ? ` (${d.offline_reason})` : ""));
  fill("v-model", d.model ? modelLabel(d.model) : "no model", d.pending_deployment ? h("div", {}, pendingTag(d.pending_deployment)) : null);
  fill("v-delegate", d.delegate || "–");
  fill("v-p95", d.p95_ms === null || d.p95_ms === undefined ? "–" : `${num(d.p95_ms, 2)} ms`);
  fill("v-ips", num(d.inferences_per_s, 1));
  fill("v-seen", ago(d.last_seen, now));
}

function kv(dl, pairs) {
  fill(dl, pairs.filter(([, v]) => v !== null && v !== undefined && v !== "")
    .flatMap(([k, v]) => [h("dt", { text: k }), h("dd", {}, v)]));
}

function renderIdentity(d) {
  const hw = d.hardware || {};
  const labels = Object.entries(d.labels || {}).map(([k, v]) => `${k}=${v}`).join(", ");
  kv(document.getElementById("identity"), [
    ["Device", d.device_id], ["Fleet", d.fleet], ["Profile", d.profile],
    ["Groups", (d.groups || []).join(", ") || "–"], ["Labels", labels || "–"],
    ["Agent", d.agent_version ? `litefleet-agent ${d.agent_version}` : ""],
    ["Model", d.model ? `${modelLabel(d.model)}` : "no model"],
    ["Model sha256", d.model && d.model.sha256 ? h("code", { text: d.model.sha256.slice(0, 16) + "…", title: d.model.sha256 }) : ""],
    ["Hardware", Object.entries(hw).map(([k, v]) => `${k}: ${typeof v === "object" ? JSON.stringify(v) : v}`).join(" · ")],
    ["Status since", d.status_ts ? `${clock(d.status_ts, true)} (${ago(d.status_ts)})` : ""],
    ["Messages", `${d.received ?? 0} received, ${d.lost ?? 0} lost`],
  ]);
}

function renderEngine(d) {
  const e = d.engine || {};
  const nodes = e.total_nodes ? `${e.delegated_nodes ?? 0} of ${e.total_nodes} ops delegated` +
                                (e.full_graph ? " (full graph)" : "") : "";
  kv(document.getElementById("engine"), [
    ["Runtime", [e.runtime || d.runtime, e.runtime_version || d.runtime_version].filter(Boolean).join(" ")],
    ["Delegate in use", d.delegate || e.delegate || "–"],
    ["Threads", e.threads !== undefined ? `${e.threads}${e.workers ? `, ${e.workers} worker(s)` : ""}` : ""],
    ["Delegation", nodes],
    ["Available", (d.delegates_available || []).join(", ") || "–"],
  ]);
  const attempts = e.attempts || [];
  const tbody = document.querySelector("#attempts tbody");
  if (!attempts.length) {
    fill(tbody, h("tr", {}, h("td", { colspan: 3, class: "empty", text: "No delegate chain reported (CPU only)." })));
    return;
  }
  fill(tbody, attempts.map((a) => h("tr", { "data-outcome": a.outcome },
    h("td", {}, a.kind, a.library ? h("div", { class: "muted", text: a.library }) : null),
    h("td", {}, h("span", { class: `tag ${a.outcome === "used" ? "ok" : "warn"}`, text: a.outcome.replaceAll("_", " ") })),
    h("td", { style: "white-space: normal", text: a.reason || "" }))));
}

function renderCharts(rows, since, now) {
  // Model version changes inside the window, marked on every chart.
  const markers = [];
  for (let i = 1; i < rows.length; i++) {
    if ((rows[i].model_version || "") !== (rows[i - 1].model_version || "")) {
      markers.push({ t: rows[i].ts, label: `→ ${rows[i].model_version || "no model"}` });
    }
  }
  const byVersion = (key) => {
    const groups = new Map();
    for (const r of rows) {
      const label = r.model_version || "no model";
      if (!groups.has(label)) groups.set(label, []);
      groups.get(label).push([r.ts, r[key]]);
    }
    return [...groups.entries()].map(([label, points]) => ({ label, points }));
  };
  const single = (key, label, colour) => [{ label, colour, points: rows.map((r) => [r.ts, r[key]]) }];
  const common = { since, until: now, markers };
  lineChart(document.getElementById("chart-p95"), { ...common, series: byVersion("p95_ms"), unit: "ms", title: "p95 latency" });
  lineChart(document.getElementById("chart-ips"), { ...common, series: byVersion("inferences_per_s"), unit: "/s", title: "Throughput" });
  lineChart(document.getElementById("chart-cpu"), { ...common, series: single("cpu_percent", "CPU", "var(--c6)"), unit: "%", title: "CPU" });
  lineChart(document.getElementById("chart-temp"), { ...common, series: single("temperature_c", "temperature", "var(--c5)"),
                                                     unit: "°C", title: "Temperature", zero: false });
}

function renderAlerts(alerts) {
  const ul = document.getElementById("alerts");
  if (!alerts.length) {
    fill(ul, h("li", { class: "empty", text: "No alerts for this device." }));
    return;
  }
  fill(ul, [...alerts].sort((a, b) => (b.active - a.active) || b.opened_at - a.opened_at).map((a) =>
    h("li", { class: a.active ? "active" : "closed", "data-kind": a.kind },
      h("div", {}, h("span", { class: "kind", text: a.kind.replaceAll("_", " ") }), " · ",
        h("span", { class: "muted", text: a.active ? `open since ${ago(a.opened_at)}` : `closed ${ago(a.closed_at)}` })),
      h("div", { text: a.message || "" }))));
}

function renderEvents(events) {
  const ol = document.getElementById("events");
  if (!events.length) {
    fill(ol, h("li", { class: "empty", text: "No events reported." }));
    return;
  }
  fill(ol, events.map((e) => {
    const d = e.details || {};
    const extra = [e.command_id ? `command ${e.command_id.slice(0, 12)}` : "",
                   typeof d.percent === "number" ? `${Math.round(d.percent)}%` : "",
                   d.code && d.code !== e.kind ? `code ${d.code}` : ""].filter(Boolean).join(" · ");
    return h("li", { "data-kind": e.kind },
      h("time", { datetime: new Date(e.ts * 1000).toISOString(), title: new Date(e.ts * 1000).toLocaleString(),
                  text: clock(e.ts, true) }),
      h("div", {},
        h("span", { class: `kind ${kindClass(e.kind)}`, text: e.kind.replaceAll("_", " ") }),
        e.reason ? h("span", { text: ` — ${e.reason}` }) : null,
        extra ? h("div", { class: "muted", text: extra }) : null));
  }));
}

