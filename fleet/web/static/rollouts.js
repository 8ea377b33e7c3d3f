// Staged rollouts as they progress: the server's rollout records (GET /api/v1/rollouts), one item each.
//
// Unlike a deployment, which the page pieces together from devices' events, a rollout is state the
// server keeps (fleet/rollout.py): which stage it is in, how big each stage is, why it stopped, and
// the last health verdict of the stage's updated devices against their own pre-rollout baseline.
// Each item shows stage N of M, a bar of the target devices (installed, deploying, failed, rolled
// back, with a mark where each stage ends), the state, the reason when it stopped, and that verdict.

import { api, ago, clock, h, num } from "./common.js";

// state -> [text, tag class]
const STATES = {
  pending: ["pending", "pending"], deploying: ["deploying", "pending"], soaking: ["soaking", "pending"],
  paused: ["paused", "warn"], rolling_back: ["rolling back", "bad"], aborted: ["aborted", "bad"],
  completed: ["completed", "ok"],
};
const STOPPED = new Set(["paused", "rolling_back", "aborted"]);
const FINAL = new Set(["aborted", "completed"]);
// bar segments, in order: [class, device states counted, text]
const SEGMENTS = [
  ["installed", ["installed"], "installed"],
  ["pending", ["deploying"], "deploying"],
  ["failed", ["failed", "rollback_failed"], "failed"],
  ["rolled_back", ["rolling_back", "rolled_back"], "rolled back"],
];

/** Device counts of a rollout for its bar and text. Pure. */
export function rolloutCounts(r) {
  const by = r.devices_by_state || {};
  const counts = { total: r.target_devices ?? 0 };
  for (const [key, states] of SEGMENTS) counts[key] = states.reduce((sum, s) => sum + (by[s] || 0), 0);
  counts.waiting = by.waiting || 0;
  counts.excluded = by.excluded || 0;
  return counts;
}

/** "digits v2", or "digits v2 (x86-cpu), v3 (rpi4-cpu)" when profiles get different versions. */
export function rolloutWhat(r) {
  const versions = Object.entries(r.versions || {}).sort((a, b) => a[0].localeCompare(b[0]));
  const distinct = [...new Set(versions.map(([, v]) => v))];
  if (distinct.length <= 1) return `${r.model || "model"}${distinct.length ? " v" + distinct[0] : ""}`;
  return `${r.model} ` + versions.map(([p, v]) => `v${v} (${p})`).join(", ");
}

/** Active rollouts first, then the most recent finished ones; newest first within each. Pure. */
export function orderRollouts(rollouts, keepFinished = 10) {
  const newest = (a, b) => (b.created_at || 0) - (a.created_at || 0);
  const active = rollouts.filter((r) => !FINAL.has(r.state)).sort(newest);
  const done = rollouts.filter((r) => FINAL.has(r.state)).sort(newest).slice(0, keepFinished);
  return [...active, ...done];
}

function bar(r, counts) {
  const total = Math.max(counts.total, 1);
  const label = SEGMENTS.map(([key, , text]) => `${counts[key]} ${text}`).join(", ");
  const el = h("div", { class: "rollout-bar", role: "img",
                        "aria-label": `${counts.installed} of ${counts.total} installed (${label}); ` +
                                      `stage ${r.stage} of ${r.stages} takes ${r.stage_target}` });
  for (const [key, , text] of SEGMENTS) {
    if (!counts[key]) continue;
    const seg = h("span", { class: key, title: `${counts[key]} ${text}` });
    seg.style.width = `${(100 * counts[key]) / total}%`;
    el.append(seg);
  }
  (r.stage_counts || []).forEach((n, i) => {
    if (n >= counts.total) return;                  // the last stage ends at the bar's end
    const mark = h("i", { class: i + 1 === r.stage ? "edge current" : "edge", title: `stage ${i + 1} ends at ${n}` });
    mark.style.left = `${(100 * n) / total}%`;
    el.append(mark);
  });
  return el;
}

function healthLine(health) {
  if (!health || !health.post) return null;
  const post = health.post, base = health.baseline || {};
  const parts = [];
  if (post.p95 !== null && post.p95 !== undefined) {
    parts.push(`p95 ${num(post.p95, 2)} ms vs baseline ${base.p95 !== null && base.p95 !== undefined ? num(base.p95, 2) + " ms" : "–"}`);
  }
  if (post.error_rate !== null && post.error_rate !== undefined) {
    const pct = (v) => (v === null || v === undefined ? "–" : `${num(100 * v, 2)}%`);
    parts.push(`errors ${pct(post.error_rate)} vs ${pct(base.error_rate)}`);
  }
  if (post.drift !== null && post.drift !== undefined) {
    parts.push(`drift ${num(post.drift, 3)} vs ${base.drift !== null && base.drift !== undefined ? num(base.drift, 3) : "–"}`);
  }
  if (post.field_accuracy !== null && post.field_accuracy !== undefined) {
    const acc = (v) => (v === null || v === undefined ? "–" : `${num(100 * v, 1)}%`);
    parts.push(`field accuracy ${acc(post.field_accuracy)} vs ${acc(base.field_accuracy)}`);
  }
  parts.push(`${post.samples || 0} sample${post.samples === 1 ? "" : "s"}`);
  const bad = (health.violations || []).length > 0;
  const note = !health.judged && health.notes && health.notes.length ? health.notes[0] : "";
  return h("div", { class: `rollout-health${bad ? " bad" : ""}`, title: health.rule ? `health rule: ${health.rule}` : "" },
    h("span", { class: "label", text: `health, stage ${health.stage}: ` }),
    h("span", { class: "figures", text: parts.join(" · ") }),
    bad ? h("span", { class: "violations", text: ` — ${health.violations.join("; ")}` }) : null,
    !bad && health.judged && health.rule ? h("span", { class: "holds", text: ` — within ${health.rule}` }) : null,
    note ? h("span", { class: "muted", text: ` (${note})` }) : null);
}

/** The server's rollouts, or null from a server that has no rollout API (404). */
export async function fetchRollouts() {
  try {
    return (await api("/api/v1/rollouts")).rollouts;
  } catch (err) {
    if (err.status === 404) return null;
    throw err;
  }
}

/** The rollouts list into element ``ul``; ``now`` is the server's time (epoch seconds). */
export function renderRollouts(ul, rollouts, now = Date.now() / 1000) {
  if (rollouts === null) {
    ul.replaceChildren(h("li", { class: "empty", text: "This server does not serve rollouts." }));
    return [];
  }
  const shown = orderRollouts(rollouts || []);
  if (!shown.length) {
    ul.replaceChildren(h("li", { class: "empty",
      text: "No rollouts yet. Start one with `litefleet rollout start BUNDLE --target ...`." }));
    return shown;
  }
  ul.replaceChildren(...shown.map((r) => {
    const counts = rolloutCounts(r);
    const [stateText, stateClass] = STATES[r.state] || [r.state, ""];
    const stopped = STOPPED.has(r.state);
    let soak = null;
    if (r.state === "soaking" && r.soak_started_at && r.soak_s !== null && r.soak_s !== undefined) {
      const done = Math.min(r.soak_s, Math.max(0, now - r.soak_started_at));
      soak = h("span", { class: "soak", text: `soaked ${Math.floor(done)} s of ${num(r.soak_s, 0)} s` });
    }
    return h("li", { "data-rollout": r.id, "data-state": r.state, "data-stage": r.stage, "data-stages": r.stages,
                     "data-installed": counts.installed, "data-stage-target": r.stage_target,
                     "data-total": counts.total, class: stopped ? "stopped" : null },
      h("div", { class: "deploy-head" },
        h("span", { class: "what", text: r.id }),
        h("span", { class: "model", text: rolloutWhat(r) }),
        h("span", { class: `tag state ${stateClass}`, text: stateText }),
        h("span", { class: "muted", text: `target ${r.target}` }),
        h("span", { class: "muted", text: `started ${clock(r.created_at, true)} · updated ${ago(r.updated_at, now)}` })),
      bar(r, counts),
      h("div", { class: "deploy-counts" },
        h("span", { class: "stage", text: r.stages ? `stage ${r.stage} of ${r.stages}` : "no stages" }),
        h("span", { class: "sizes", text: `${counts.installed} installed / ${r.stage_target} in stage / ${counts.total} devices` }),
        counts.pending ? h("span", { text: `${counts.pending} deploying` }) : null,
        counts.failed ? h("span", { text: `${counts.failed} failed` }) : null,
        counts.rolled_back ? h("span", { text: `${counts.rolled_back} rolled back` }) : null,
        counts.excluded ? h("span", { text: `${counts.excluded} excluded` }) : null,
        soak),
      h("div", { class: stopped ? "rollout-reason why" : "rollout-reason muted" },
        stopped ? h("strong", { text: r.state === "paused" ? "Paused: " : "Stopped: " }) : null,
        h("span", { class: "text", text: r.reason || "" })),
      healthLine(r.health));
  }));
  return shown;
}
