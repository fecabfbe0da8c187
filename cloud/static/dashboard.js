// Fogline dashboard: reads the control plane's API with the tab's token, draws tables,
// uPlot charts and small SVG histograms, and refreshes every few seconds.
// State for tests and curious operators: window.fogline.{data, charts}.
"use strict";

// The token comes in the URL fragment (never sent to the server), is kept for this tab
// only, and goes out as a bearer header.
const fragment = new URLSearchParams(location.hash.slice(1));
if (fragment.get("token")) {
  sessionStorage.setItem("fogline.token", fragment.get("token"));
  history.replaceState(null, "", location.pathname + "#fleet");
}
const token = sessionStorage.getItem("fogline.token");
const fogline = (window.fogline = { data: {}, charts: {}, refreshes: 0 });
const REFRESH_MS = 3000;

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (token) headers.Authorization = `Bearer ${token}`;
  const resp = await fetch(path, { ...options, headers });
  document.getElementById("auth").hidden = resp.status !== 401 && resp.status !== 403;
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error || `HTTP ${resp.status}`);
  return body;
}

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}

function row(cells) {
  const tr = document.createElement("tr");
  for (const c of cells) {
    const td = document.createElement("td");
    if (c instanceof Node) td.appendChild(c);
    else td.textContent = c ?? "";
    tr.appendChild(td);
  }
  return tr;
}

function fill(id, rows) {
  document.querySelector(`#${id} tbody`).replaceChildren(...rows.map(row));
}

const pct = (x) => (x == null ? "" : (100 * x).toFixed(1) + "%");
const ms = (x) => (x == null ? "" : x.toFixed(2) + " ms");
const counts = (obj) => Object.entries(obj || {}).map(([k, v]) => `${k}: ${v}`).join(", ");

// -- fleet --------------------------------------------------------------------------

function deviceVisible(d) {
  if (document.getElementById("only-offline").checked && d.state === "online" && !d.stale) return false;
  if (document.getElementById("only-failed").checked && !d.failed_rollouts.length) return false;
  const label = document.getElementById("label-filter").value.trim();
  if (label) {
    const [k, v] = label.split("=");
    if (!(k in d.labels) || (v !== undefined && d.labels[k] !== v)) return false;
  }
  return true;
}

function drawFleet() {
  const fleet = fogline.data.fleet;
  if (!fleet) return;
  fill("devices", fleet.devices.filter(deviceVisible).map((d) => {
    const state = el("span", d.state, d.stale ? "stale" : d.state);
    if (d.stale) state.appendChild(el("span", "stale", "badge"));
    const models = d.models.map((m) => {
      const want = d.desired[m.name];
      return want && want !== String(m.version) ? `${m.name} ${m.version} → ${want}` : `${m.name} ${m.version}`;
    }).join(", ");
    return [d.device_id, state, d.heartbeat_age_s == null ? "" : `${d.heartbeat_age_s} s ago`,
      counts(d.labels), models, ms(d.p95_ms), d.requests, pct(d.escalation_rate),
      counts(d.escalation_reasons), el("span", d.circuit, d.circuit), d.degraded];
  }));
  fill("versions", fleet.versions_by_label.map((v) => [v.label, v.model, counts(v.desired), counts(v.running)]));
}

async function refreshFleet() {
  fogline.data.fleet = await api("/api/dashboard/fleet");
  drawFleet();
  const models = (await api("/api/models")).models;
  fill("models", models.map((m) => {
    const ev = m.evaluation || {};
    const acc = ev.accuracy ?? ev.test_accuracy;
    const quality = acc != null ? (100 * acc).toFixed(2) + "%" : ev.mean_cosine != null ? `cos ${ev.mean_cosine.toFixed(4)}` : "";
    return [m.name, m.variant, m.version, m.release, m.precision, m.artifact.size, quality];
  }));
}

// -- rollouts -----------------------------------------------------------------------

async function refreshRollouts() {
  const [plain, staged] = await Promise.all([api("/api/rollouts"), api("/api/staged-rollouts")]);
  fogline.data.rollouts = plain.rollouts;
  fogline.data.staged = staged.rollouts;
  const link = (kind, id) => {
    const a = el("a", id);
    a.href = `#${kind}/${encodeURIComponent(id)}`;
    return a;
  };
  const rows = staged.rollouts.map((r) => [link("staged", r.id), "staged", r.model, r.version,
    el("span", r.state, r.state), `${r.stage + 1}/${r.spec.stages.length} (${r.phase})`,
    Math.round((r.finished_at ?? Date.now() / 1000) - r.created_at),
    `${r.counts.active ?? 0}/${r.devices.length}`]);
  for (const r of plain.rollouts) {
    const devices = Object.values(r.devices);
    const ok = devices.filter((d) => d.stage === "activated").length;
    rows.push([link("rollout", r.id), "all at once", r.model, r.version, el("span", r.state, r.state),
      "", r.seconds, `${ok}/${devices.length}`]);
  }
  fill("rollouts", rows);
}

function fmt(x) {
  return x == null ? "–" : typeof x === "number" ? String(Math.round(x * 1000) / 1000) : String(x);
}

function checkLine(c) {
  // One gate: the new version's value against the previous version's, and the limit.
  const line = el("div", null, c.breached ? "gate breached" : "gate");
  const verdict = !c.judged ? "not judged" : c.breached ? "BREACHED" : "ok";
  line.append(el("span", c.metric), el("span", `${fmt(c.value)} vs ${fmt(c.baseline)} (max +${fmt(c.threshold)}) ${verdict}`));
  return line;
}

function showActions(kinds) {
  for (const b of document.querySelectorAll("[data-action]")) b.hidden = !kinds.includes(b.dataset.action);
}

async function refreshStaged(id) {
  const r = await api(`/api/staged-rollouts/${encodeURIComponent(id)}`);
  fogline.data.rollout = r;
  showActions(["pause", "resume", "abort", "rollback"]);
  document.getElementById("rollout-title").textContent =
    `Staged rollout ${r.id}: ${r.model} ${r.version} (${r.state}, ${r.phase})`;
  const halt = document.getElementById("rollout-halt");
  const h = r.halt_reason;
  halt.hidden = !h;
  halt.textContent = h ? `Halted at stage ${h.stage + 1}: ${h.metric} ${fmt(h.value)} against ${fmt(h.baseline)}, limit +${fmt(h.threshold)}` : "";
  const now = Date.now() / 1000;
  const cards = r.spec.stages.map((percent, i) => {
    const report = r.reports.find((x) => x.stage === i);
    const breached = h && h.stage === i;
    const card = el("div", null, breached ? "card breached" : "card");
    card.dataset.stage = String(i);
    const state = i < r.stage || (r.finished && i === r.stage) ? "done" : i === r.stage ? r.phase : "waiting";
    card.append(el("h3", `Stage ${i + 1}: ${percent}%`));
    const devices = r.devices.filter((d) => d.stage === i).length;
    card.append(el("div", `${breached ? "halted" : state} · ${devices} devices`, "muted"));
    if (i === r.stage && r.phase === "soaking" && r.soak_until) {
      card.append(el("div", `soak: ${Math.max(0, Math.round(r.soak_until - now))} s left`));
    }
    card.append(...(report ? report.checks.map(checkLine) : [el("div", "gates not judged yet", "muted")]));
    return card;
  });
  document.getElementById("stages").replaceChildren(...cards);
  fill("rollout-devices", r.devices.map((d) => [d.device_id, d.stage + 1, d.state, d.package ?? "", d.reason ?? ""]));
}

async function refreshRollout(id) {
  const r = await api(`/api/rollouts/${encodeURIComponent(id)}`);
  fogline.data.rollout = r;
  showActions(["abort"]);
  document.getElementById("rollout-title").textContent = `Rollout ${r.id}: ${r.model} ${r.version} (${r.state})`;
  document.getElementById("rollout-halt").hidden = true;
  document.getElementById("stages").replaceChildren(el("p", "one stage: every target at once", "muted"));
  fill("rollout-devices", Object.entries(r.devices).map(([d, s]) => [d, 1, s.stage, s.package ?? "onnx", s.error ?? ""]));
}

async function act(action) {
  const [kind, id] = location.hash.slice(1).split("/");
  const base = kind === "staged" ? "/api/staged-rollouts" : "/api/rollouts";
  const out = document.getElementById("action-result");
  try {
    await api(`${base}/${id}/${action}`, {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ reason: "from the dashboard" }),
    });
    out.textContent = `${action}: done`;
  } catch (err) {
    out.textContent = `${action}: ${err.message}`;
  }
  refresh();
}

// -- serving ------------------------------------------------------------------------

function chart(key, id, opts, data) {
  const old = fogline.charts[key];
  if (old && old.series.length === opts.series.length) { old.setData(data); return; }
  if (old) old.destroy();
  fogline.charts[key] = new uPlot({ width: 720, height: 220, ...opts }, data, document.getElementById(id));
}

function histogram(title, bounds, values) {
  // A small server-free SVG bar chart: one bar per bucket, labelled with its upper bound.
  const card = el("div", null, "card");
  card.append(el("h3", title));
  const w = 24, h = 90, max = Math.max(1, ...values);
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "hist");
  svg.setAttribute("width", values.length * w);
  svg.setAttribute("height", h + 14);
  svg.dataset.values = JSON.stringify(values);
  values.forEach((v, i) => {
    const bar = document.createElementNS(svg.namespaceURI, "rect");
    const bh = (v / max) * h;
    bar.setAttribute("x", i * w + 2); bar.setAttribute("y", h - bh);
    bar.setAttribute("width", w - 4); bar.setAttribute("height", bh);
    bar.appendChild(document.createElementNS(svg.namespaceURI, "title")).textContent = `≤ ${bounds[i] ?? "∞"}: ${v}`;
    const label = document.createElementNS(svg.namespaceURI, "text");
    label.setAttribute("x", i * w + 2); label.setAttribute("y", h + 12);
    label.textContent = bounds[i] ?? "∞";
    svg.append(bar, label);
  });
  card.appendChild(svg);
  return card;
}

async function refreshServing() {
  const s = (fogline.data.serving = await api("/api/dashboard/serving"));
  chart("requests", "chart-requests", {
    title: "requests per interval",
    series: [{}, { label: "edge", stroke: "#2e90fa" }, { label: "cloud", stroke: "#f79009" }, { label: "degraded", stroke: "#d92d20" }],
  }, [s.series.t, s.series.edge, s.series.cloud, s.series.degraded]);
  fill("reasons", Object.entries(s.escalation_reasons).map(([r, n]) => [r, n]));
  document.getElementById("latency").replaceChildren(...s.latency.map((l) =>
    histogram(`${l.where === "edge" ? "edge" : "escalated (agent → cloud)"} · ${l.model} (ms)`, s.latency_buckets_ms, l.counts)));
  const rows = [], history = [], batches = [];
  for (const f of s.fallbacks) {
    if (!f.ok) rows.push([f.url, el("span", `unreachable: ${f.error ?? "not scraped yet"}`, "failed"), "", "", "", "", ""]);
    else if (!Object.keys(f.models).length) rows.push([f.url, el("span", "no nv_inference_* metrics", "muted"), "", "", "", "", ""]);
    for (const [model, m] of Object.entries(f.models)) {
      rows.push([f.url, model, m.success ?? "", m.failure ?? "", m.mean_batch == null ? "" : m.mean_batch.toFixed(2),
        m.queue_us_per_request == null ? "" : m.queue_us_per_request.toFixed(0),
        m.compute_us_per_request == null ? "" : m.compute_us_per_request.toFixed(0)]);
      if (m.batch_size) {
        // Prometheus buckets are cumulative ("≤ le"): draw how many fell in each one.
        const le = Object.keys(m.batch_size).sort((a, b) => Number(a) - Number(b));
        const counts = le.map((k, i) => m.batch_size[k] - (i ? m.batch_size[le[i - 1]] : 0));
        const bounds = le.map((k) => (k === "+Inf" ? "∞" : String(Number(k))));
        batches.push(histogram(`batch sizes · ${model}`, bounds, counts));
      }
    }
    history.push(...f.history.filter((h) => h.queue_us != null));
  }
  fill("fallbacks", rows);
  document.getElementById("batch-sizes").replaceChildren(...batches);
  chart("fallback", "chart-fallback", {
    title: "fallback µs per request: queue vs compute",
    series: [{}, { label: "queue", stroke: "#7a5af8" }, { label: "compute", stroke: "#12b76a" }],
  }, [history.map((h) => h.t), history.map((h) => h.queue_us), history.map((h) => h.compute_us)]);
}

// -- navigation ---------------------------------------------------------------------

function route() {
  const [view, id] = (location.hash.slice(1) || "fleet").split("/");
  const shown = ["rollout", "staged"].includes(view) ? "rollout" : ["fleet", "rollouts", "serving"].includes(view) ? view : "fleet";
  for (const name of ["fleet", "rollouts", "rollout", "serving"]) {
    document.getElementById(`view-${name}`).hidden = name !== shown;
  }
  for (const name of ["fleet", "rollouts", "serving"]) {
    document.getElementById(`nav-${name}`).classList.toggle("active", name === shown || (name === "rollouts" && shown === "rollout"));
  }
  return { view: shown, id: id && decodeURIComponent(id) };
}

async function refresh() {
  const { view, id } = route();
  try {
    if (view === "fleet") await refreshFleet();
    else if (view === "rollouts") await refreshRollouts();
    else if (view === "rollout" && location.hash.startsWith("#staged/")) await refreshStaged(id);
    else if (view === "rollout") await refreshRollout(id);
    else await refreshServing();
    fogline.refreshes += 1;
    document.getElementById("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    document.getElementById("updated").textContent = `error: ${err.message}`;
  }
}

for (const input of ["only-offline", "only-failed", "label-filter"]) {
  document.getElementById(input).addEventListener("input", drawFleet);
}
for (const button of document.querySelectorAll("[data-action]")) {
  button.addEventListener("click", () => act(button.dataset.action));
}
window.addEventListener("hashchange", refresh);
refresh();
setInterval(refresh, REFRESH_MS);
