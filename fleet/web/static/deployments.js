// Deployments as they progress: the devices' deploy events grouped by command id.
//
// A command (deploy to a group, a profile, the fleet) has no server-side record here: what the
// dashboard knows is what each device reported. A device's state in a command is its latest
// deploy event for that command: accepted/progress = pending, installed, failed
// (install_failed, deploy_rejected) or rolled back.

import { ago, clock, deviceHref, h, labelCompare } from "./common.js";

const STATE_OF = { deploy_accepted: "pending", deploy_progress: "pending", installed: "installed",
                   install_failed: "failed", deploy_rejected: "failed", rolled_back: "rolled_back" };
const STATE_TEXT = { pending: "pending", installed: "installed", failed: "failed", rolled_back: "rolled back" };

/** Group deploy events (any order) into commands, newest command first. Pure. */
export function groupDeployments(events) {
  const commands = new Map();
  const sorted = [...events].sort((a, b) => a.ts - b.ts || a.seq - b.seq);
  for (const ev of sorted) {
    const id = ev.command_id;
    const state = STATE_OF[ev.kind];
    if (!id || !state) continue;
    let cmd = commands.get(id);
    if (!cmd) {
      cmd = { command_id: id, started: ev.ts, updated: ev.ts, what: null, devices: new Map() };
      commands.set(id, cmd);
    }
    cmd.updated = Math.max(cmd.updated, ev.ts);
    const d = ev.details || {};
    if (d.name && d.version !== undefined && d.version !== null) cmd.what = `${d.name} v${d.version}`;
    if (!cmd.what) {
      const m = /of (\S+) v(\d+)/.exec(ev.reason || "");
      if (m) cmd.what = `${m[1]} v${m[2]}`;
    }
    cmd.devices.set(ev.device_id, { device_id: ev.device_id, state, kind: ev.kind, ts: ev.ts, reason: ev.reason,
                                    percent: typeof d.percent === "number" ? d.percent : (state === "pending" ? 0 : null) });
  }
  const out = [];
  for (const cmd of commands.values()) {
    const devices = [...cmd.devices.values()].sort((a, b) => labelCompare(a.device_id, b.device_id));
    const counts = { installed: 0, failed: 0, rolled_back: 0, pending: 0 };
    for (const d of devices) counts[d.state] += 1;
    out.push({ ...cmd, devices, counts, total: devices.length, done: counts.pending === 0 });
  }
  return out.sort((a, b) => b.started - a.started);
}

/** The deployments list into element ``ul``. */
export function renderDeployments(ul, events) {
  const commands = groupDeployments(events);
  if (!commands.length) {
    ul.replaceChildren(h("li", { class: "empty", text: "No deployments reported by devices yet." }));
    return commands;
  }
  ul.replaceChildren(...commands.slice(0, 20).map((cmd) => {
    const { counts, total } = cmd;
    const status = cmd.done
      ? (counts.failed || counts.rolled_back ? h("span", { class: "tag bad", text: "finished with failures" })
                                             : h("span", { class: "tag ok", text: "complete" }))
      : h("span", { class: "tag pending", text: "in progress" });
    const bar = h("div", { class: "progress", role: "img",
                           "aria-label": `${counts.installed} of ${total} installed, ${counts.failed} failed, ` +
                                         `${counts.rolled_back} rolled back, ${counts.pending} pending` });
    for (const key of ["installed", "rolled_back", "failed", "pending"]) {
      if (!counts[key]) continue;
      const seg = h("span", { class: key, title: `${counts[key]} ${STATE_TEXT[key]}` });
      seg.style.width = `${(100 * counts[key]) / total}%`;
      if (key === "pending") {
        // How far the pending devices' downloads are, on average, as a darker part of their share.
        const pending = cmd.devices.filter((d) => d.state === "pending");
        const pct = pending.reduce((sum, d) => sum + (d.percent || 0), 0) / pending.length;
        seg.title += `, ${Math.round(pct)}% downloaded on average`;
        seg.style.background = `linear-gradient(90deg, var(--accent) ${pct}%, transparent ${pct}%), ` +
                               "color-mix(in srgb, var(--accent) 35%, transparent)";
      }
      bar.append(seg);
    }
    const rows = cmd.devices.map((d) => h("tr", { "data-state": d.state },
      h("td", {}, h("a", { href: deviceHref(d.device_id), text: d.device_id })),
      h("td", {}, h("span", { class: `tag ${d.state === "installed" ? "ok" : d.state === "pending" ? "pending" : "bad"}`,
                              text: STATE_TEXT[d.state] + (d.state === "pending" && d.percent ? ` ${Math.round(d.percent)}%` : "") })),
      h("td", { class: "muted", text: ago(d.ts) }),
      h("td", { class: "muted", text: d.reason || "" })));
    return h("li", { "data-command": cmd.command_id, "data-installed": counts.installed, "data-failed": counts.failed,
                     "data-pending": counts.pending, "data-total": total },
      h("div", { class: "deploy-head" },
        h("span", { class: "what", text: cmd.what || "deployment" }), status,
        h("span", { class: "muted", text: `command ${cmd.command_id.slice(0, 12)}` }),
        h("span", { class: "muted", text: `started ${clock(cmd.started, true)} · last report ${ago(cmd.updated)}` })),
      bar,
      h("div", { class: "deploy-counts" },
        h("span", { text: `${counts.installed}/${total} installed` }),
        counts.failed ? h("span", { text: `${counts.failed} failed` }) : null,
        counts.rolled_back ? h("span", { text: `${counts.rolled_back} rolled back` }) : null,
        counts.pending ? h("span", { text: `${counts.pending} pending` }) : null),
      h("details", {}, h("summary", { text: `${total} device${total === 1 ? "" : "s"}` }),
        h("div", { class: "table-wrap" }, h("table", {}, h("tbody", {}, rows)))));
  }));
  return commands;
}
