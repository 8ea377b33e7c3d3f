// Small inline-SVG charts for the dashboard: time-series lines and horizontal bars.
//
// Why our own: the dashboard must work on a machine with no internet and no build step, and
// it needs only two kinds of chart. Each chart is redrawn from data on every poll (cheap at
// these sizes) and again when its container changes width, so text stays crisp on a phone.

const SVG = "http://www.w3.org/2000/svg";
const PALETTE = 8;
const colours = new Map();

/** A stable colour (CSS variable) per series label, the same in every chart of the page. */
export function colourFor(label) {
  if (!colours.has(label)) colours.set(label, `var(--c${colours.size % PALETTE})`);
  return colours.get(label);
}

function s(tag, attrs = {}, text) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) if (v !== null && v !== undefined) el.setAttribute(k, String(v));
  if (text !== undefined) el.textContent = text;
  return el;
}

/** About ``count`` round tick values covering [lo, hi]. */
export function niceTicks(lo, hi, count = 4) {
  if (!(hi > lo)) hi = lo + 1;
  const raw = (hi - lo) / count;
  const mag = 10 ** Math.floor(Math.log10(raw));
  const step = [1, 2, 2.5, 5, 10].map((m) => m * mag).find((st) => st >= raw) || 10 * mag;
  const ticks = [];
  // From the last round value at or below lo to the first at or above hi: the data never pokes out.
  const first = Math.floor(lo / step + 1e-9) * step, last = Math.ceil(hi / step - 1e-9) * step;
  for (let v = first; v <= last + step * 1e-9; v += step) ticks.push(Number(v.toFixed(10)));
  return ticks;
}

const TIME_STEPS = [10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400];

function timeTicks(t0, t1, width) {
  const want = Math.max(2, Math.floor(width / 90));
  const step = TIME_STEPS.find((st) => (t1 - t0) / st <= want) || 86400;
  const offset = new Date().getTimezoneOffset() * 60;   // ticks on round local times
  const ticks = [];
  for (let t = Math.ceil((t0 - offset) / step) * step + offset; t <= t1; t += step) ticks.push(t);
  return { ticks, step };
}

function timeLabel(t, step) {
  const d = new Date(t * 1000);
  const hm = d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", hour12: false });
  if (step >= 86400) return d.toLocaleDateString([], { month: "short", day: "numeric" });
  if (step < 60) return d.toLocaleTimeString([], { hour: "2-digit", minute: "2-digit", second: "2-digit", hour12: false });
  return hm;
}

function fmt(v, unit) {
  if (v === null || v === undefined || !Number.isFinite(v)) return "–";
  const a = Math.abs(v);
  const text = a >= 100 ? v.toFixed(0) : a >= 10 ? v.toFixed(1) : v.toFixed(2);
  return unit ? `${text} ${unit}` : text;
}

// Redraw charts whose container width changed (phone rotation, window resize).
const observer = typeof ResizeObserver === "function" ? new ResizeObserver((entries) => {
  for (const entry of entries) {
    const el = entry.target;
    if (el._chart && Math.abs((el._chartWidth || 0) - el.clientWidth) > 4) el._chart();
  }
}) : null;

function mount(el, draw) {
  el._chart = draw;
  if (observer && !el._observed) { observer.observe(el); el._observed = true; }
  draw();
}

/**
 * A time-series chart into ``el`` (a container element).
 *   series:  [{label, points: [[t, v], ...]}]   t in epoch seconds, sorted
 *   since, until: the x range (epoch seconds)
 *   unit: "ms", "/s", "%", "°C";  title: what it shows (for screen readers)
 *   markers: [{t, label}] vertical lines (model version changes)
 *   zero: start the y axis at 0 (default true; false for temperatures)
 */
export function lineChart(el, opts) {
  mount(el, () => drawLines(el, opts));
}

function drawLines(el, { series = [], since, until, unit = "", title = "", markers = [], zero = true, height = 210 }) {
  since = Math.min(since, until - 30);
  const width = Math.max(260, el.clientWidth || 600);
  el._chartWidth = el.clientWidth;
  const pad = { l: 46, r: 14, t: 22, b: 24 };
  const w = width - pad.l - pad.r, hgt = height - pad.t - pad.b;
  const all = series.flatMap((sr) => sr.points.map((p) => p[1])).filter((v) => Number.isFinite(v));
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img",
                         "data-series": series.length, "data-points": all.length });
  // A young fleet has minutes of data in an hour's window: start the axis at the first point
  // (the tick labels say the times) instead of squeezing everything against the right edge.
  const times = series.flatMap((sr) => sr.points.filter((p) => Number.isFinite(p[1])).map((p) => p[0]));
  const first = times.length ? Math.min(...times) : since;
  const t1 = Math.max(until, since + 1);
  const t0 = Math.min(Math.max(since, first - (t1 - first) * 0.03), t1 - 30);
  const x = (t) => pad.l + ((t - t0) / (t1 - t0)) * w;

  let lo = all.length ? Math.min(...all) : 0, hi = all.length ? Math.max(...all) : 1;
  if (zero) lo = Math.min(0, lo);
  else { const m = Math.max((hi - lo) * 0.15, 1); lo -= m; hi += m; }
  if (hi - lo < 1e-9) hi = lo + 1;
  const yt = niceTicks(lo, hi, 4);
  const y0 = yt[0], y1 = yt[yt.length - 1];
  const y = (v) => pad.t + hgt - ((v - y0) / (y1 - y0)) * hgt;

  const axis = s("g", { class: "axis" });
  for (const v of yt) {
    axis.append(s("line", { class: "gridline", x1: pad.l, x2: pad.l + w, y1: y(v), y2: y(v) }));
    axis.append(s("text", { x: pad.l - 6, y: y(v) + 4, "text-anchor": "end" }, fmt(v, "")));
  }
  const { ticks, step } = timeTicks(t0, t1, w);
  for (const t of ticks.filter((tt) => x(tt) - pad.l > 20)) {     // none under the y axis labels
    axis.append(s("line", { class: "gridline", x1: x(t), x2: x(t), y1: pad.t, y2: pad.t + hgt, "stroke-dasharray": "2 4" }));
    axis.append(s("text", { x: x(t), y: height - 6, "text-anchor": "middle" }, timeLabel(t, step)));
  }
  if (unit) axis.append(s("text", { x: pad.l - 6, y: 10, "text-anchor": "end" }, unit));
  svg.append(axis);

  const mk = s("g", { class: "markers" });
  for (const m of markers) {
    if (m.t < t0 || m.t > t1) continue;
    const g = s("g", { class: "marker" });
    g.append(s("line", { x1: x(m.t), x2: x(m.t), y1: pad.t - 4, y2: pad.t + hgt }));
    const anchor = x(m.t) > pad.l + w * 0.75 ? "end" : "start";
    g.append(s("text", { x: x(m.t) + (anchor === "end" ? -3 : 3), y: pad.t - 8, "text-anchor": anchor }, m.label));
    g.append(s("title", {}, `${m.label} at ${new Date(m.t * 1000).toLocaleString()}`));
    mk.append(g);
  }
  svg.append(mk);

  const summary = [];
  for (const sr of series) {
    const pts = sr.points.filter((p) => Number.isFinite(p[1]) && p[0] >= t0 - 1 && p[0] <= t1 + 1);
    if (!pts.length) continue;
    const colour = sr.colour || colourFor(sr.label);
    // Break the line where data is missing (device offline), rather than drawing across the hole.
    const gaps = pts.slice(1).map((p, i) => p[0] - pts[i][0]).sort((a, b) => a - b);
    const typical = gaps.length ? gaps[Math.floor(gaps.length / 2)] : 0;
    let d = "";
    pts.forEach((p, i) => {
      const jump = i === 0 || (typical > 0 && p[0] - pts[i - 1][0] > typical * 4);
      d += `${jump ? "M" : "L"}${x(p[0]).toFixed(1)},${y(p[1]).toFixed(1)}`;
    });
    const g = s("g", { class: "series", "data-label": sr.label });
    g.append(s("path", { class: "line", d, stroke: colour, "data-points": pts.length }));
    // Dots on every point while they stand apart (few points); else only on the latest one.
    const spaced = (x(pts[pts.length - 1][0]) - x(pts[0][0])) / Math.max(1, pts.length - 1) >= 12;
    const dots = spaced ? pts : [pts[pts.length - 1]];
    for (const p of dots) {
      const c = s("circle", { cx: x(p[0]).toFixed(1), cy: y(p[1]).toFixed(1), r: spaced ? 2.5 : 3, fill: colour });
      c.append(s("title", {}, `${sr.label}: ${fmt(p[1], unit)} at ${new Date(p[0] * 1000).toLocaleTimeString()}`));
      g.append(c);
    }
    svg.append(g);
    summary.push(`${sr.label} latest ${fmt(pts[pts.length - 1][1], unit)}`);
  }
  if (!summary.length) {
    svg.append(s("text", { x: pad.l + w / 2, y: pad.t + hgt / 2, "text-anchor": "middle", class: "tick" },
                 "no data in this time window"));
  }
  svg.setAttribute("aria-label", `${title}: ${summary.join("; ") || "no data"}`);

  const legend = document.createElement("ul");
  legend.className = "legend";
  for (const sr of series) {
    const pts = sr.points.filter((p) => Number.isFinite(p[1]));
    if (!pts.length) continue;
    const li = document.createElement("li");
    const sw = document.createElement("span");
    sw.className = "swatch";
    sw.style.background = sr.colour || colourFor(sr.label);
    const last = document.createElement("span");
    last.className = "last";
    last.textContent = fmt(pts[pts.length - 1][1], unit);
    li.append(sw, document.createTextNode(sr.label), last);
    legend.append(li);
  }
  el.replaceChildren(svg, legend);
}

/** Horizontal bars into ``el``: items [{label, value, colour?, title?}], longest first is the caller's choice. */
export function barChart(el, items, { unit = "", title = "" } = {}) {
  mount(el, () => drawBars(el, items, { unit, title }));
}

function drawBars(el, items, { unit, title }) {
  const width = Math.max(260, el.clientWidth || 400);
  el._chartWidth = el.clientWidth;
  const row = 28;
  const height = Math.max(row, items.length * row) + 4;
  const labelW = Math.min(170, Math.round(width * 0.38));
  const valueW = 44;
  const barW = width - labelW - valueW - 8;
  const max = Math.max(1, ...items.map((i) => i.value));
  const svg = s("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", "data-bars": items.length,
                         "aria-label": `${title}: ${items.map((i) => `${i.label} ${i.value}${unit}`).join(", ") || "none"}` });
  items.forEach((item, i) => {
    const top = i * row + 2;
    const g = s("g", { class: "bar", "data-label": item.label, "data-value": item.value });
    let label = item.label;
    if (label.length > labelW / 7) label = label.slice(0, Math.floor(labelW / 7) - 1) + "…";
    g.append(s("text", { class: "bar-label", x: labelW - 8, y: top + row / 2 + 2, "text-anchor": "end" }, label));
    const bw = Math.max(2, (item.value / max) * barW);
    g.append(s("rect", { x: labelW, y: top + 5, width: bw.toFixed(1), height: row - 12, rx: 3,
                         fill: item.colour || colourFor(item.label) }));
    g.append(s("text", { class: "bar-value", x: labelW + bw + 6, y: top + row / 2 + 2 }, `${item.value}${unit}`));
    g.append(s("title", {}, item.title || `${item.label}: ${item.value}${unit}`));
    svg.append(g);
  });
  if (!items.length) svg.append(s("text", { x: 4, y: 18, class: "tick" }, "no devices yet"));
  el.replaceChildren(svg);
}
