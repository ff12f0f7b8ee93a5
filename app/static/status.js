/* ctr-farm status page (GET /status): polls /stats and /models and draws rolling SVG line
   charts. No library and nothing loaded from elsewhere (the page's CSP forbids it).
   Every figure drawn is also left in the DOM: legends carry data-series/data-value (the
   latest value, as /stats gave it), the canary and drift panels data-* attributes;
   tests/integration/test_status_page.py reads them back and compares them with /stats. */
"use strict";

const POINTS = 120; // history per series: 3 minutes at 1.5 s
const COLORS = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777"];
const SVG_NS = "http://www.w3.org/2000/svg";
const W = 380, H = 130, LEFT = 54, RIGHT = 6, TOP = 6, BOTTOM = 16;
const body = document.body;
const POLL_MS = Number(body.dataset.pollMs) || 1500;
const PSI_WARN = Number(body.dataset.psiWarn);
const PSI_ALERT = Number(body.dataset.psiAlert);
const charts = new Map(); // chart id -> Map(series name -> {points: [[t, v]], dashed, color})
let previous = null; // {stats, t}: the last /stats answer, for the "since the last poll" figures

const finite = (v) => typeof v === "number" && Number.isFinite(v);

function el(tag, attrs = {}, text) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function svg(tag, attrs = {}, text) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, String(v));
  if (text !== undefined) node.textContent = text;
  return node;
}

function format(value, unit) {
  if (!finite(value)) return "–";
  if (unit === "ratio") return (value * 100).toFixed(1) + "%";
  if (unit === "psi") return value.toFixed(3);
  const text = value.toFixed(value < 10 ? 2 : 1);
  return unit === "ms" ? text + " ms" : text + "/s";
}

function niceMax(v) {
  if (!(v > 0)) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  return [1, 2, 2.5, 5, 10].map((m) => m * p).find((m) => m >= v);
}

/* Append this poll's values; a series missing from this poll gets a gap. */
function record(id, t, values) {
  if (!charts.has(id)) charts.set(id, new Map());
  const lines = charts.get(id);
  const seen = new Set();
  for (const { name, value, dashed } of values) {
    if (!lines.has(name)) {
      lines.set(name, { points: [], dashed: !!dashed, color: COLORS[lines.size % COLORS.length] });
    }
    lines.get(name).points.push([t, finite(value) ? value : null]);
    seen.add(name);
  }
  for (const [name, line] of lines) {
    if (!seen.has(name)) line.points.push([t, null]);
    if (line.points.length > POINTS) line.points.splice(0, line.points.length - POINTS);
    if (!line.points.some(([, v]) => v !== null)) lines.delete(name); // e.g. a retired version
  }
}

function colorOf(id, name) {
  const line = charts.has(id) && charts.get(id).get(name);
  return line ? line.color : COLORS[COLORS.length - 1];
}

function draw(id, thresholds = []) {
  const fig = document.getElementById(id);
  if (!fig) return;
  const unit = fig.dataset.unit;
  const lines = [...(charts.get(id) || new Map()).entries()];
  fig.replaceChildren(el("figcaption", {}, fig.dataset.title));
  const values = lines.flatMap(([, l]) => l.points.map(([, v]) => v)).filter(finite);
  if (!values.length) {
    fig.append(el("p", { class: "empty" }, "no data yet"));
    return;
  }
  const tMax = Math.max(...lines.map(([, l]) => l.points[l.points.length - 1][0]));
  const tMin = tMax - (POINTS - 1) * POLL_MS;
  const vMax = unit === "ratio" ? 1 : niceMax(Math.max(...values, ...thresholds) * 1.1);
  const x = (t) => LEFT + ((t - tMin) / (tMax - tMin)) * (W - LEFT - RIGHT);
  const y = (v) => TOP + (1 - Math.min(v, vMax) / vMax) * (H - TOP - BOTTOM);
  const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, role: "img" });
  for (const v of [0, vMax / 2, vMax]) {
    plot.append(svg("line", { class: "grid", x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v) }));
    plot.append(svg("text", { class: "axis", x: LEFT - 4, y: y(v) + 3, "text-anchor": "end" },
      format(v, unit)));
  }
  plot.append(svg("text", { class: "axis", x: LEFT, y: H - 3 }, `-${Math.round((tMax - tMin) / 1000)} s`));
  plot.append(svg("text", { class: "axis", x: W - RIGHT, y: H - 3, "text-anchor": "end" }, "now"));
  for (const v of thresholds.filter(finite)) {
    plot.append(svg("line", { class: "threshold", stroke: v >= PSI_ALERT && unit === "psi" ?
      "#b91c1c" : "#b45309", x1: LEFT, x2: W - RIGHT, y1: y(v), y2: y(v) }));
  }
  const legend = el("ul", { class: "legend" });
  for (const [name, line] of lines) {
    let d = "", pen = "M";
    for (const [t, v] of line.points) {
      if (v === null) { pen = "M"; continue; }
      d += `${pen}${x(t).toFixed(1)},${y(v).toFixed(1)}`;
      pen = "L";
    }
    plot.append(svg("path", { d, stroke: line.color, class: line.dashed ? "dashed" : "" }));
    const last = line.points[line.points.length - 1][1];
    const item = el("li", { "data-series": name, "data-value": last === null ? "" : last });
    const swatch = el("span", { class: "swatch" });
    swatch.style.background = line.color;
    item.append(swatch, el("span", {}, name), el("span", { class: "value" }, format(last, unit)));
    legend.append(item);
  }
  fig.append(plot, legend);
}

function summary(stats) {
  const sum = (obj) => Object.values(obj || {}).reduce((a, b) => a + b, 0);
  const notClosed = Object.entries(stats.breakers || {}).filter(([, s]) => s !== "closed");
  const items = [
    ["workers", stats.workers, String(stats.workers)],
    ["uptime", stats.uptime_s, finite(stats.uptime_s) ? `${Math.round(stats.uptime_s)} s` : "–"],
    ["in flight", stats.in_flight, String(stats.in_flight)],
    ["queued", stats.queue_waiting, String(stats.queue_waiting)],
    ["shed", sum(stats.shed), String(sum(stats.shed))],
    ["degraded", sum(stats.degraded), String(sum(stats.degraded))],
    ["breakers", notClosed.length, notClosed.length ? notClosed.map((e) => e.join(" ")).join(", ") : "closed"],
  ];
  const dl = document.getElementById("summary");
  dl.replaceChildren(...items.map(([name, value, text]) => {
    const row = el("div", { "data-name": name, "data-value": value ?? "" });
    row.append(el("dt", {}, name), el("dd", {}, text));
    return row;
  }));
}

function endpoints(stats, t) {
  const qps = [], goodput = [], sla = [];
  const dt = previous ? (t - previous.t) / 1000 : 0;
  for (const [path, e] of Object.entries(stats.endpoints || {})) {
    const w = e.window || {};
    const before = previous && (previous.stats.endpoints || {})[path];
    const fresh = before && dt > 0 ? e.requests - before.requests : null;
    qps.push({ name: path, value: w.throughput_rps });
    qps.push({ name: `${path} now`, value: fresh === null ? null : fresh / dt, dashed: true });
    goodput.push({ name: path, value: w.goodput_rps });
    sla.push({ name: path, value: w.sla_compliance });
    const lat = e.latency || {};
    const was = (before && before.latency) || {};
    const n = (lat.count || 0) - (was.count || 0);
    const meanNow = n > 0 ? (lat.mean_ms * lat.count - (was.mean_ms || 0) * (was.count || 0)) / n : null;
    const id = `chart-latency-${path.replace(/^\//, "")}`;
    record(id, t, [
      { name: "p50", value: lat.p50_ms, dashed: true },
      { name: "p99", value: lat.p99_ms },
      { name: "mean now", value: meanNow },
    ]);
    draw(id, [e.sla_ms]);
  }
  record("chart-qps", t, qps);
  record("chart-goodput", t, goodput);
  record("chart-sla", t, sla);
  draw("chart-qps");
  draw("chart-goodput");
  draw("chart-sla");
  const windowS = Object.values(stats.endpoints || {}).map((e) => (e.window || {}).seconds)[0];
  if (finite(windowS)) document.getElementById("window-s").textContent = Math.round(windowS);
}

function stages(stats, t) {
  const values = [];
  for (const [stage, models] of Object.entries(stats.stages || {})) {
    for (const [model, lat] of Object.entries(models)) {
      values.push({ name: `${stage} ${model} p50`, value: lat.p50_ms, dashed: true });
      values.push({ name: `${stage} ${model} p99`, value: lat.p99_ms });
    }
  }
  record("chart-stages", t, values);
  draw("chart-stages");
}

const level = (psi) => !finite(psi) ? "none" : psi >= PSI_ALERT ? "alert" : psi >= PSI_WARN ? "warn" : "ok";

function drift(stats, t) {
  const models = Object.entries(stats.drift || {});
  record("chart-drift", t, models.map(([model, d]) => ({
    name: model, value: d.worst && d.features[d.worst] ? d.features[d.worst].psi : null,
  })));
  draw("chart-drift", [PSI_WARN, PSI_ALERT]);
  const panel = document.getElementById("drift");
  if (!models.length) {
    panel.replaceChildren(el("p", { class: "empty" }, "no drift data yet"));
    return;
  }
  const table = el("table");
  const head = el("tr");
  for (const h of ["model", "state", "rows", "CTR mean (card)", "PSI per feature"]) head.append(el("th", {}, h));
  table.append(head);
  for (const [model, d] of models) {
    const row = el("tr", { "data-model": model, "data-state": d.state, "data-rows": d.rows,
      class: d.state === "insufficient_data" ? "muted" : "" }); // PSI of too few rows: noise
    const ctr = `${finite(d.ctr_mean) ? d.ctr_mean.toFixed(4) : "–"} (${finite(d.card_ctr_mean) ? d.card_ctr_mean.toFixed(4) : "–"})`;
    const chips = el("td");
    const features = Object.entries(d.features || {}).sort(([, a], [, b]) => (b.psi ?? -1) - (a.psi ?? -1));
    for (const [name, f] of features) {
      chips.append(el("span", { class: `psi level-${level(f.psi)}`, "data-feature": name,
        "data-psi": finite(f.psi) ? f.psi : "" }, `${name} ${format(f.psi, "psi")}`));
    }
    row.append(el("td", {}, model), el("td"), el("td", {}, String(d.rows)), el("td", {}, ctr), chips);
    row.children[1].append(el("span", { class: `state state-${d.state}` }, d.state));
    table.append(row);
  }
  panel.replaceChildren(table);
}

function traffic(status, t) {
  const panel = document.getElementById("canary");
  if (!status) {
    record("chart-split", t, []);
    draw("chart-split");
    panel.replaceChildren(el("p", { class: "empty" }, "variants unknown: /models did not answer"));
    return;
  }
  const weights = Object.entries(status.weights || {});
  record("chart-split", t, weights.map(([name, w]) => ({ name, value: w })));
  draw("chart-split");
  const parts = [];
  const c = status.canary;
  if (c) {
    const box = el("div", { id: "canary-state", "data-status": c.status, "data-step": c.step,
      "data-weight": c.weight, "data-reason": c.reason ?? "" });
    box.append(el("span", { class: `state state-${c.status}` }, c.status),
      el("span", {}, ` step ${c.step}, canary weight ${format(c.weight, "ratio")}`),
      el("p", {}, c.reason ? `reason: ${c.reason}` : "no rollback reason"));
    parts.push(box);
  } else {
    parts.push(el("p", { class: "empty", id: "canary-state" }, "no canary rollout"));
  }
  const bar = el("div", { class: "bar" });
  const table = el("table");
  const head = el("tr");
  for (const h of ["variant", "weight", "lineup"]) head.append(el("th", {}, h));
  table.append(head);
  for (const [name, w] of weights) {
    const span = el("span", { title: `${name} ${format(w, "ratio")}` });
    span.style.width = `${w * 100}%`;
    span.style.background = colorOf("chart-split", name);
    bar.append(span);
    const lineup = ((status.lineups || {})[name] || []).join(" → ");
    const row = el("tr", { "data-variant": name, "data-weight": w });
    row.append(el("td", {}, name), el("td", {}, format(w, "ratio")), el("td", {}, lineup || "–"));
    table.append(row);
  }
  const shadow = status.shadow && status.shadow.length ? `shadow: ${status.shadow.join(" → ")}` : "no shadow";
  parts.push(bar, table, el("p", { id: "shadow" }, shadow));
  panel.replaceChildren(...parts);
}

async function getJson(path) {
  const resp = await fetch(path, { cache: "no-store", headers: { Accept: "application/json" } });
  if (!resp.ok) throw new Error(`${path}: HTTP ${resp.status}`);
  return resp.json();
}

async function poll() {
  const t = Date.now();
  const [stats, models] = await Promise.allSettled([getJson("stats"), getJson("models")]);
  const problems = [stats, models].filter((r) => r.status === "rejected").map((r) => r.reason.message);
  try {
    if (stats.status === "fulfilled") {
      summary(stats.value);
      endpoints(stats.value, t);
      stages(stats.value, t);
      drift(stats.value, t);
      previous = { stats: stats.value, t };
    }
    traffic(models.status === "fulfilled" ? models.value.traffic || {} : null, t);
  } catch (err) {
    problems.push(`cannot draw: ${err.message}`);
  }
  const banner = document.getElementById("problem");
  banner.textContent = problems.join("; ");
  banner.hidden = !problems.length;
  body.dataset.polls = Number(body.dataset.polls) + 1;
}

async function loop() {
  try {
    await poll();
  } finally {
    setTimeout(loop, POLL_MS); // after the answer: a slow farm is never polled twice at once
  }
}

loop();
