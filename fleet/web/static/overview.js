// The fleet overview page: summary cards, devices by model version, alerts, the device table,
// fleet-wide latency and throughput by model version, rollouts and deployments in progress.

import { api, ago, deviceHref, fill, h, labelCompare, num, pendingTag, startPolling, takeToken, windowSelect, DEPLOY_KINDS }
  from "./common.js";
import { barChart, lineChart } from "./charts.js";
import { renderDeployments } from "./deployments.js";
import { fetchRollouts, renderRollouts } from "./rollouts.js";
import { driftBadge, renderQuality } from "./quality.js";

takeToken();
const windowS = windowSelect(() => poller.refresh());
const poller = startPolling(load);

let driftThreshold = null;    // the server's drift threshold, from the devices summary

async function load() {
  const since = -windowS();
  const quality = api("/api/v1/quality");
  quality.catch(() => {});     // its failure is the poller's to show, through the awaits below
  const [devices, alerts, p95, ips, deploys, rollouts] = await Promise.all([
    api("/api/v1/devices"),
    api("/api/v1/alerts"),
    api(`/api/v1/series?metric=p95_ms&by=model_version&since=${since}`),
    api(`/api/v1/series?metric=inferences_per_s&by=model_version&since=${since}`),
    api(`/api/v1/events?kind=${DEPLOY_KINDS.join(",")}&limit=1000`),
    fetchRollouts(),
  ]);
  const now = devices.summary.time || Date.now() / 1000;
  renderSummary(devices.summary, devices.devices);
  renderModels(devices.devices);
  renderAlerts(alerts.alerts);
  renderTable(devices.devices, now, alerts.alerts);
  renderSeries("p95-chart", p95.series, p95.since, now, "ms", "p95 latency by model version");
  renderSeries("ips-chart", ips.series, ips.since, now, "/s", "Throughput by model version");
  renderDeployments(document.getElementById("deploys"), deploys.events);
  renderRollouts(document.getElementById("rollout-list"), rollouts, now);
  renderQuality(document.getElementById("quality-rows"), document.getElementById("quality-note"), await quality);
}

function renderSummary(sum, devices) {
  const set = (id, v) => { document.getElementById(id).textContent = String(v); };
  set("n-online", sum.online);
  set("n-offline", sum.offline);
  set("n-total", sum.total);
  set("n-alerts", sum.alerts ?? 0);
  set("n-pending", sum.pending_deployments ?? devices.filter((d) => d.pending_deployment).length);
  set("n-lost", sum.lost ?? 0);
  set("n-drifting", sum.drifting ?? 0);
  document.getElementById("n-drifting").parentElement.classList.toggle("bad", (sum.drifting ?? 0) > 0);
  driftThreshold = sum.drift_threshold ?? null;
  document.getElementById("n-offline").parentElement.classList.toggle("bad", sum.offline > 0);
  document.getElementById("n-alerts").parentElement.classList.toggle("bad", (sum.alerts ?? 0) > 0);
  document.getElementById("n-lost").parentElement.classList.toggle("warn", (sum.lost ?? 0) > 0);
  const fleets = [...new Set(devices.map((d) => d.fleet).filter(Boolean))];
  document.getElementById("fleet-name").textContent = fleets.length === 1 ? `fleet ${fleets[0]}` : "Fleet overview";
}

function renderModels(devices) {
  const counts = new Map();
  for (const d of devices) {
    const label = d.model_version || "no model";
    const c = counts.get(label) || { online: 0, total: 0 };
    c.total += 1;
    if (d.online) c.online += 1;
    counts.set(label, c);
  }
  const items = [...counts.entries()].sort((a, b) => labelCompare(a[0], b[0]))
    .map(([label, c]) => ({ label, value: c.total, title: `${label}: ${c.total} device(s), ${c.online} online` }));
  barChart(document.getElementById("models-chart"), items, { title: "Devices by model version" });
  document.getElementById("models-note").textContent = `${counts.size} version${counts.size === 1 ? "" : "s"}`;
}

function renderAlerts(alerts) {
  const ul = document.getElementById("alerts");
  document.getElementById("alerts-note").textContent = alerts.length ? `${alerts.length} active` : "";
  if (!alerts.length) {
    fill(ul, h("li", { class: "empty", text: "No active alerts." }));
    return;
  }
  fill(ul, alerts.slice(0, 30).map((a) => h("li", { "data-kind": a.kind, "data-device": a.device_id || "" },
    h("div", {},
      h("span", { class: "kind", text: a.kind.replaceAll("_", " ") }), " · ",
      a.device_id ? h("a", { href: deviceHref(a.device_id), text: a.device_id }) : "fleet"),
    h("div", { text: a.message || "" }),
    h("div", { class: "muted", text: `since ${ago(a.opened_at)}` }))));
}

function renderTable(devices, now, alerts) {
  const alerting = new Set(alerts.map((a) => `${a.device_id}|${a.kind}`));
  const tbody = document.getElementById("device-rows");
  const online = devices.filter((d) => d.online).length;
  document.getElementById("devices-note").textContent = `${online} of ${devices.length} online`;
  if (!devices.length) {
    fill(tbody, h("tr", {}, h("td", { colspan: 11, class: "empty",
      text: "No device has reported yet. Devices appear here when their birth message arrives." })));
    return;
  }
  // Offline devices first (they need attention), then by id.
  const sorted = [...devices].sort((a, b) => (a.online - b.online) || a.device_id.localeCompare(b.device_id));
  fill(tbody, sorted.map((d) => {
    const state = d.online ? "online" : "offline";
    const hot = alerting.has(`${d.device_id}|temperature`);
    const slow = alerting.has(`${d.device_id}|latency_regression`);
    return h("tr", { class: state, "data-device-id": d.device_id, "data-state": state },
      h("th", { scope: "row" }, h("a", { href: deviceHref(d.device_id), text: d.device_id })),
      h("td", { title: d.online ? "" : (d.offline_reason || "") },
        h("span", { class: `dot ${state}`, "aria-hidden": "true" }), state),
      h("td", { class: "model", text: d.model_version || "no model" }),
      h("td", { text: d.delegate || "–" }),
      h("td", { class: "num p95", title: slow ? "latency regression after a deployment" : "" },
        slow ? h("span", { class: "hot", text: num(d.p95_ms, 2) }) : num(d.p95_ms, 2)),
      h("td", { class: "num ips", text: num(d.inferences_per_s, 1) }),
      h("td", { class: "num", text: num(d.cpu_percent, 0) }),
      h("td", { class: "num", title: hot ? "over the profile's temperature limit" : "" },
        hot ? h("span", { class: "hot", text: num(d.temperature_c, 1) }) : num(d.temperature_c, 1)),
      h("td", { class: "num drift" }, driftBadge(d.drift, driftThreshold)),
      h("td", { class: "seen", title: d.last_seen ? new Date(d.last_seen * 1000).toLocaleString() : "",
                text: ago(d.last_seen, now) }),
      h("td", {}, pendingTag(d.pending_deployment) || h("span", { class: "muted", text: "–" })));
  }));
}

function renderSeries(id, series, since, now, unit, title) {
  const labels = Object.keys(series).sort(labelCompare);
  lineChart(document.getElementById(id), {
    series: labels.map((label) => ({ label, points: series[label] })),
    since, until: now, unit, title,
  });
}
