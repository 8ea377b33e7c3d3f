// Model quality in the field (docs/quality.md): the drift badge of a device, the overview's
// table of model versions (drift, field accuracy beside the converter's) and a device's own
// figures per model version. Shared by the overview and the device page.

import { deviceHref, fill, h, num } from "./common.js";

const pct = (v, digits = 1) => (v === null || v === undefined ? "–" : `${(100 * v).toFixed(digits)}%`);

/** The drift cell: the score, and a "drift" badge when it is over the server's threshold. */
export function driftBadge(drift, threshold) {
  if (!drift || drift.score === null || drift.score === undefined) return h("span", { class: "muted", text: "–" });
  const over = threshold !== null && threshold !== undefined && drift.score > threshold;
  const title = `PSI ${num(drift.score, 3)}` + (drift.inputs !== null && drift.inputs !== undefined
    ? ` (inputs ${num(drift.inputs, 3)}, outputs ${num(drift.outputs, 3)})` : "") +
    (drift.window ? ` over the last ${drift.window} inferences` : "") +
    (over ? `; over the threshold ${threshold}` : "");
  return h("span", { class: over ? "drift over" : "drift", title, "data-drifting": over ? "1" : "0" },
    num(drift.score, 2), over ? " " : null, over ? h("span", { class: "tag bad", text: "drift" }) : null);
}

/** The overview's table: one row per model version with reports. */
export function renderQuality(tbody, note, doc) {
  const models = doc.models || [];
  const drifting = models.reduce((n, m) => n + (m.drift.drifting || []).length, 0);
  fill(note, models.length ? `drift threshold ${doc.drift_threshold}${drifting ? ` · ${drifting} drifting` : ""}` : "");
  if (!models.length) {
    fill(tbody, h("tr", {}, h("td", { colspan: 8, class: "empty",
      text: "No device has reported drift or feedback labels yet." })));
    return;
  }
  fill(tbody, models.map((m) => {
    const d = m.drift, f = m.field;
    const delta = m.accuracy_delta_points;
    return h("tr", { "data-model": `${m.name} v${m.version}` },
      h("th", { scope: "row", text: `${m.name} v${m.version}` }),
      h("td", { class: "num", text: String(d.devices) }),
      h("td", { class: "drifting" }, d.drifting.length
        ? [h("span", { class: "tag bad", text: `${d.drifting.length} drifting` }), " ",
           ...d.drifting.slice(0, 5).flatMap((id, i) => [i ? ", " : "", h("a", { href: deviceHref(id), text: id })])]
        : h("span", { class: "muted", text: "none" })),
      h("td", { class: "num", text: num(d.median, 3) }),
      h("td", { class: "num", text: String(f.labels) }),
      h("td", { class: "num field-accuracy", text: pct(f.accuracy) }),
      h("td", { class: "num", text: pct(m.converter_accuracy) }),
      h("td", { class: "num" }, delta === null || delta === undefined ? "–"
        : h("span", { class: delta < -1 ? "hot" : "", text: `${delta > 0 ? "+" : ""}${delta.toFixed(1)} pt` })));
  }));
}

/** The device page's panel: this device's drift and field accuracy per model version. */
export function renderDeviceQuality(tbody, quality) {
  const rows = (quality && quality.models) || [];
  if (!rows.length) {
    fill(tbody, h("tr", {}, h("td", { colspan: 5, class: "empty",
      text: "No drift or feedback reported (the agent reports drift once the model's bundle has a data profile " +
            "and 100 inferences were made)." })));
    return;
  }
  fill(tbody, rows.map((r) => h("tr", { "data-model": `${r.name} v${r.version}` },
    h("th", { scope: "row" }, `${r.name} v${r.version}`, r.current ? h("span", { class: "muted", text: " (active)" }) : null),
    h("td", { class: "num" }, driftBadge(r.drift, quality.drift_threshold)),
    h("td", { class: "num", text: r.labels === null || r.labels === undefined ? "–" : String(r.labels) }),
    h("td", { class: "num", text: pct(r.accuracy) }),
    h("td", { class: "num", text: r.unmatched ? String(r.unmatched) : "–" }))));
}
