// litefleet dashboard: what every page shares — the token, API calls, polling, the banner, formatting.
//
// The token: the server prints the dashboard URL as http://HOST:PORT/#token=T. The fragment
// never reaches the server; we read it once, keep it in sessionStorage (this tab only, gone
// when the tab closes), and strip it from the address bar so it is not bookmarked or shared
// in a screenshot. Every API call sends it as "Authorization: Bearer T".

export const TOKEN_KEY = "litefleet.token";
const REFRESH_KEY = "litefleet.refresh_s";
export const REFRESH_CHOICES = [1, 2, 5, 10, 30, 0];   // seconds; 0 = paused

/** Move a #token=... fragment into sessionStorage and out of the URL; the token or null. */
export function takeToken() {
  const hash = location.hash.replace(/^#/, "");
  if (hash) {
    const params = new URLSearchParams(hash);
    const token = params.get("token");
    if (token !== null) {
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      params.delete("token");
      const rest = params.toString();
      history.replaceState(history.state, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    }
  }
  return sessionStorage.getItem(TOKEN_KEY);
}

export class ApiError extends Error {
  /** kind: "token" (missing or refused), "network" (unreachable), "unavailable" (503), "http" (other). */
  constructor(kind, status, message) {
    super(message);
    this.kind = kind;
    this.status = status;
  }
}

/** GET an API path with the bearer token; the decoded JSON or an ApiError saying what is wrong. */
export async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  if (!token) {
    throw new ApiError("token", 0, "No API token in this tab. Open the dashboard URL the server printed " +
      "(it ends in #token=…), or paste the token from the server's data directory (api-token) below.");
  }
  let resp;
  try {
    resp = await fetch(path, { headers: { Authorization: "Bearer " + token, Accept: "application/json" },
                               cache: "no-store" });
  } catch (err) {
    throw new ApiError("network", 0, `The fleet server at ${location.host} cannot be reached (${err.message}). ` +
      "Is `litefleet server` running? The page keeps retrying.");
  }
  let body = null;
  try { body = await resp.json(); } catch { body = null; }
  const message = (body && body.error) || `${resp.status} ${resp.statusText}`;
  if (resp.status === 401) {
    throw new ApiError("token", 401, `The server refused the token: ${message}`);
  }
  if (!resp.ok) {
    throw new ApiError(resp.status === 503 ? "unavailable" : "http", resp.status,
                       `The server answered ${resp.status} for ${path}: ${message}`);
  }
  return body;
}

/** Build an element: h("td", {class: "num"}, "12"). Text is always set as text, never as HTML. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (key === "class") el.className = value;
    else if (key === "text") el.textContent = value;
    else if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

/** Replace the children of the element with id ``id`` (or the element itself). */
export function fill(target, ...children) {
  const el = typeof target === "string" ? document.getElementById(target) : target;
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
  return el;
}

// Formatting ---------------------------------------------------------------------------------

export function num(value, digits = 1) {
  if (value === null || value === undefined || !Number.isFinite(Number(value))) return "–";
  const v = Number(value);
  if (Math.abs(v) >= 1000) return v.toLocaleString(undefined, { maximumFractionDigits: 0 });
  return v.toFixed(digits);
}

export function ago(ts, now = Date.now() / 1000) {
  if (!ts) return "never";
  const s = Math.max(0, Math.round(now - ts));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

export function clock(ts, withDate = false) {
  const d = new Date(ts * 1000);
  const t = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  return withDate ? `${d.toLocaleDateString([], { month: "short", day: "numeric" })} ${t}` : t;
}

export function isoTime(ts) {
  return new Date(ts * 1000).toISOString();
}

export function modelLabel(model) {
  if (!model || !model.name) return "no model";
  return model.version !== null && model.version !== undefined ? `${model.name} v${model.version}` : model.name;
}

/** Compare "digits v10" after "digits v9": names alphabetically, versions numerically. */
export function labelCompare(a, b) {
  const ma = /^(.*) v(\d+)$/.exec(a), mb = /^(.*) v(\d+)$/.exec(b);
  if (ma && mb && ma[1] === mb[1]) return Number(ma[2]) - Number(mb[2]);
  return a.localeCompare(b);
}

export const DEPLOY_KINDS = ["deploy_accepted", "deploy_progress", "installed", "install_failed",
                             "deploy_rejected", "rolled_back"];
const KIND_CLASS = { installed: "ok", install_failed: "bad", deploy_rejected: "bad", rolled_back: "warn",
                     health_breach: "bad", accelerator_mismatch: "warn", delegate_fallback: "warn" };
export function kindClass(kind) { return KIND_CLASS[kind] || ""; }

/** Where a link to a device's page goes; it keeps this page's ?refresh= and ?window=. */
export function deviceHref(deviceId) {
  const keep = new URLSearchParams();
  const here = new URLSearchParams(location.search);
  for (const key of ["refresh", "window"]) if (here.has(key)) keep.set(key, here.get(key));
  const query = keep.toString();
  return `/devices/${encodeURIComponent(deviceId)}${query ? "?" + query : ""}`;
}

/** The tag that says what a device's pending deployment is doing ("deploying digits v3 · 50%"). */
export function pendingTag(pending) {
  if (!pending) return null;
  const what = pending.name ? `${pending.name} v${pending.version}` : "";
  const pct = pending.percent !== null && pending.percent !== undefined ? ` · ${Math.round(pending.percent)}%` : "";
  const text = pending.kind === "deploy_accepted" ? `accepted${what ? " " + what : ""}` : `deploying ${what}${pct}`;
  return h("span", { class: "tag pending", title: pending.reason || "", text: text.trim() });
}

/**
 * The charts' time window from the #window select (seconds), kept in the URL as ?window=N so a
 * link or a reload shows the same range. ``onChange`` runs after the user picks another one.
 */
export function windowSelect(onChange) {
  const select = document.getElementById("window");
  const wanted = new URLSearchParams(location.search).get("window");
  if (wanted && [...select.options].some((o) => o.value === wanted)) select.value = wanted;
  select.addEventListener("change", () => {
    const params = new URLSearchParams(location.search);
    params.set("window", select.value);
    history.replaceState(history.state, "", `${location.pathname}?${params}${location.hash}`);
    onChange();
  });
  return () => Number(select.value);
}

// Polling ------------------------------------------------------------------------------------

/** The refresh period in seconds: ?refresh=N in the URL wins, then the last choice in this browser. */
export function refreshSeconds() {
  const q = new URLSearchParams(location.search).get("refresh");
  if (q !== null && Number.isFinite(Number(q)) && Number(q) >= 0) return Number(q);
  const stored = localStorage.getItem(REFRESH_KEY);
  if (stored !== null && Number.isFinite(Number(stored))) return Number(stored);
  return 5;
}

/**
 * Call ``load()`` now and every few seconds; keep "updated Ns ago" ticking; show the banner
 * when a load fails (unreachable server, wrong token) and hide it when one succeeds.
 * Pauses while the tab is hidden. Returns {refresh()} to reload at once.
 */
export function startPolling(load) {
  let period = refreshSeconds();
  let lastOk = 0;
  let failing = null;        // the last load's ApiError kind, null when it succeeded
  let timer = null;
  let running = false;
  const status = document.getElementById("updated");
  const select = document.getElementById("refresh");

  if (select) {
    const choices = REFRESH_CHOICES.includes(period) ? REFRESH_CHOICES : [...REFRESH_CHOICES, period].sort((a, b) => a - b);
    select.replaceChildren(...choices.map((s) =>
      h("option", { value: s, selected: s === period }, s === 0 ? "paused" : `every ${s}s`)));
    select.addEventListener("change", () => {
      period = Number(select.value);
      localStorage.setItem(REFRESH_KEY, String(period));
      schedule(0);
    });
  }

  function tick() {
    if (!status) return;
    const note = failing === "token" ? "not authorised" : failing ? "retrying" : "";
    if (!lastOk) { status.textContent = note || "loading…"; return; }
    status.textContent = `updated ${ago(lastOk / 1000, Date.now() / 1000)}${note ? " · " + note : ""}`;
    status.dataset.updatedAt = String(lastOk);
    status.classList.toggle("stale", Boolean(failing));
  }

  function schedule(delayS) {
    clearTimeout(timer);
    if (delayS === null) return;
    timer = setTimeout(run, delayS * 1000);
  }

  async function run() {
    if (running) return;
    if (document.hidden && lastOk) { schedule(null); return; }   // resumes on visibilitychange
    running = true;
    try {
      await load();
      lastOk = Date.now();
      failing = null;
      showBanner(null);
      document.body.dataset.loads = String(Number(document.body.dataset.loads || 0) + 1);
    } catch (err) {
      failing = err.kind || "error";
      showBanner(err, lastOk);
      if (!(err instanceof ApiError)) console.warn("dashboard update failed:", err);
    } finally {
      running = false;
      tick();
      // A refused token stays refused: stop asking until the user gives another one (the
      // banner's form reloads the page). Anything else may heal: keep retrying, at most every 2 s.
      const next = failing === "token" || period <= 0 ? null : failing ? Math.max(period, 2) : period;
      schedule(next);
    }
  }

  document.addEventListener("visibilitychange", () => { if (!document.hidden) schedule(0); });
  setInterval(tick, 1000);
  run();
  return { refresh: () => schedule(0) };
}

/** Show what is wrong (err: ApiError or Error) or hide the banner (err: null). */
export function showBanner(err, lastOk = 0) {
  const banner = document.getElementById("banner");
  if (!banner) return;
  if (!err) {
    banner.hidden = true;
    banner.dataset.kind = "";
    return;
  }
  const kind = err.kind || "error";
  const titles = { token: "Not authorised", network: "Fleet server unreachable",
                   unavailable: "Database unavailable", http: "The server refused a request", error: "Display error" };
  const parts = [h("strong", { text: titles[kind] || titles.error }), h("span", { text: err.message })];
  const stale = lastOk && kind !== "token" ? ` The figures below are from ${ago(lastOk / 1000)}.` : "";
  if (stale) parts.push(h("span", { class: "stale", text: stale }));
  if (kind === "token") {
    const input = h("input", { type: "password", name: "token", autocomplete: "off", "aria-label": "API token",
                               placeholder: "paste the API token" });
    parts.push(h("form", {
      onsubmit: (ev) => {
        ev.preventDefault();
        if (input.value.trim()) {
          sessionStorage.setItem(TOKEN_KEY, input.value.trim());
          location.reload();
        }
      },
    }, input, h("button", { type: "submit", text: "Use token" })));
  }
  // Rebuild only when the message changes, so a half-typed token is not wiped by the next poll.
  const key = kind + "|" + err.message + "|" + stale;
  if (banner.dataset.key !== key || banner.hidden) {
    banner.replaceChildren(...parts);
    banner.dataset.key = key;
  }
  banner.dataset.kind = kind;
  banner.hidden = false;
}
