// EdgeFleet console: one page, hash routes, data from the REST API with the session cookie.
"use strict";

const ROLE = document.body.dataset.role;
const CSRF = document.querySelector('meta[name="csrf-token"]').content;
const view = document.getElementById("view");
const PLOT_CONFIG = { displayModeBar: false, responsive: true };
let renderId = 0; // a newer navigation makes older, slower answers drop their output

function esc(value) {
  return String(value ?? "").replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
function fmt(value, digits = 1, unit = "") {
  if (value === null || value === undefined) return '<span class="muted">–</span>';
  const n = Number(value);
  return esc((Number.isInteger(n) ? n : n.toFixed(digits)) + unit);
}
function pct(value) { return value === null || value === undefined ? fmt(null) : fmt(value * 100, 1, "%"); }
function bytes(n) {
  if (n === null || n === undefined) return fmt(null);
  const units = ["B", "kB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i += 1; }
  return esc(`${n.toFixed(i ? 2 : 0)} ${units[i]}`);
}
function when(iso) { return iso ? esc(new Date(iso).toLocaleString()) : fmt(null); }
function state(s) { return `<span class="state ${esc(s)}">${esc(s)}</span>`; }
function table(headers, rows) {
  const head = headers.map((h) => `<th${h.endsWith("#") ? ' class="num"' : ""}>${esc(h.replace(/#$/, ""))}</th>`);
  const body = rows.length ? rows.map((r) => `<tr>${r.map((c, i) =>
    `<td${headers[i].endsWith("#") ? ' class="num"' : ""}>${c}</td>`).join("")}</tr>`).join("")
    : `<tr><td colspan="${headers.length}" class="muted">nothing yet</td></tr>`;
  return `<table><thead><tr>${head.join("")}</tr></thead><tbody>${body}</tbody></table>`;
}
function card(label, value) {
  return `<div class="card"><div class="num">${value}</div><div class="label">${esc(label)}</div></div>`;
}

async function api(path, options = {}) {
  const resp = await fetch(path, { credentials: "same-origin", headers: { Accept: "application/json",
    ...(options.headers || {}) }, ...options, });
  if (resp.status === 401) { window.location.assign("/ui/login"); throw new Error("logged out"); }
  const body = await resp.json().catch(() => ({}));
  if (!resp.ok) throw new Error(body.error || `${resp.status} ${resp.statusText}`);
  return body;
}
function post(path) {
  return api(path, { method: "POST", headers: { "X-CSRF-Token": CSRF } });
}

// --- charts -------------------------------------------------------------------------
function plot(id, traces, layout = {}) {
  const node = document.getElementById(id);
  if (!node) return;
  if (!window.Plotly) { node.innerHTML = '<p class="notice error">plotly.js did not load</p>'; return; }
  const base = { margin: { t: 36, r: 12, b: 40, l: 56 }, height: 300, legend: { orientation: "h" },
    font: { family: "system-ui, sans-serif", size: 12 } };
  window.Plotly.newPlot(node, traces, { ...base, ...layout }, PLOT_CONFIG);
}
function seriesName(s) {
  return `${s.profile} · ${s.model ? `${s.model}@${s.release}` : "no model"}`;
}
function lines(series, key) {
  return series.map((s) => ({ type: "scatter", mode: "lines+markers", name: seriesName(s),
    x: s.points.map((p) => p.t), y: s.points.map((p) => p[key]) }))
    .filter((t) => t.y.some((v) => v !== null));
}
function seriesCharts(prefix, data) {
  const specs = [["power_mw", "Power (mW)"], ["mj_per_inference", "Energy per inference (mJ)"],
    ["invoke_p95_ms", "Invoke latency p95 (ms)"], ["fps", "Inferences per second"]];
  for (const [key, title] of specs) {
    plot(`${prefix}-${key}`, lines(data.series, key), { title: { text: title },
      xaxis: { type: "date", range: [data.since, data.until] } });
  }
}
function seriesSlots(prefix) {
  return ["power_mw", "mj_per_inference", "invoke_p95_ms", "fps"]
    .map((k) => `<div id="${prefix}-${k}" class="chart"></div>`).join("");
}

// --- pages --------------------------------------------------------------------------
const pages = {};

pages.overview = async () => {
  const [fleet, rollouts] = await Promise.all([api("/api/v1/fleet"), api("/api/v1/rollouts?limit=20")]);
  const d = fleet.devices, h = fleet.health;
  const active = rollouts.filter((r) => ["running", "paused"].includes(r.state));
  const labels = d.groups.map((g) => `${g.profile} / ${g.region || "no region"}`);
  return {
    html: `<h2>Fleet</h2><div class="cards">${card("devices", fmt(d.total))}
      ${card("online", fmt(d.online))}${card("offline", fmt(d.total - d.online))}
      ${card(`inferences, last ${h.minutes} min`, fmt(h.inferences))}
      ${card("inference errors", `<span class="${h.errors ? "bad" : "ok"}">${fmt(h.errors)}</span>`)}
      ${card("throttled windows", fmt(h.throttled_windows))}${card("active rollouts", fmt(active.length))}</div>
      <div class="grid"><div id="chart-online" class="chart"></div><div id="chart-releases" class="chart"></div></div>
      <h3>Devices by profile and region</h3>
      ${table(["profile", "region", "online#", "offline#"], d.groups.map((g) =>
        [esc(g.profile), esc(g.region || "–"), fmt(g.online), fmt(g.offline)]))}
      <h3>Releases in use</h3>
      ${table(["release", "variant", "devices#"], fleet.releases.map((r) =>
        [esc(`${r.model}@${r.release}`), esc(r.variant), fmt(r.devices)]))}
      <p class="muted">${fmt(fleet.no_model)} devices run no model yet. Device states:
      ${Object.entries(fleet.states).map(([k, v]) => `${esc(k)} ${fmt(v)}`).join(", ")}.</p>`,
    charts: () => {
      plot("chart-online", [
        { type: "bar", name: "online", x: labels, y: d.groups.map((g) => g.online), marker: { color: "#1a7f37" } },
        { type: "bar", name: "offline", x: labels, y: d.groups.map((g) => g.offline), marker: { color: "#c62828" } },
      ], { barmode: "stack", title: { text: "Online and offline by profile / region" } });
      plot("chart-releases", [{ type: "pie", hole: 0.5,
        labels: fleet.releases.map((r) => `${r.model}@${r.release} (${r.variant})`),
        values: fleet.releases.map((r) => r.devices) }], { title: { text: "Releases in use" } });
    },
  };
};

pages.power = async (params) => {
  const hours = Number(params.get("hours") || 1);
  const data = await api(`/api/v1/telemetry/series?hours=${hours}`);
  const span = (hr) => (hr < 1 ? `${hr * 60} min` : hr < 24 ? `${hr} h` : `${hr / 24} d`);
  const options = [0.25, 1, 6, 24, 168].map((hr) =>
    `<option value="${hr}"${hr === hours ? " selected" : ""}>last ${span(hr)}</option>`);
  return {
    html: `<h2>Power and latency</h2><p>By profile and release, one point per ${fmt(data.step_s)} s.
      <select id="hours">${options.join("")}</select>${data.truncated ? ' <span class="warn">(truncated)</span>' : ""}</p>
      <div class="grid">${seriesSlots("fleet")}</div>`,
    charts: () => {
      seriesCharts("fleet", data);
      document.getElementById("hours").addEventListener("change", (e) => {
        window.location.hash = `#/power?hours=${e.target.value}`;
      });
    },
  };
};

pages.accuracy = async () => {
  const acc = await api("/api/v1/accuracy");
  const rows = acc.releases.map((r) => [esc(`${r.model}@${r.release}`), esc(r.profile), fmt(r.devices),
    fmt(r.inferences), pct(r.mean_confidence), r.drift ? `${fmt(r.drift.psi, 3)} <span class="${
      r.drift.status === "drift" ? "bad" : "ok"}">${esc(r.drift.status)}</span>` : `<span class="muted">${esc(r.drift_reason)}</span>`,
    pct(r.golden_set_accuracy), fmt(r.drifting_devices.length)]);
  const shadow = acc.shadow.map((s) => [`<a href="#/rollouts/${esc(s.rollout)}">${esc(s.rollout)}</a>`,
    esc(`${s.model}@${s.release}`), esc(s.profile), pct(s.agreement), pct(s.class_min), fmt(s.shadowed),
    fmt(s.candidate_p95_ms, 2)]);
  const label = (r) => `${r.model}@${r.release} ${r.profile}`;
  return {
    html: `<h2>Accuracy</h2><p class="muted">Since ${when(acc.since)}; drift is PSI of predictions against the release's validation reference.</p>
      <div class="grid"><div id="chart-golden" class="chart"></div><div id="chart-shadow" class="chart"></div></div>
      <h3>Releases in the field</h3>${table(["release", "profile", "devices#", "inferences#",
        "mean confidence#", "drift (PSI)", "golden set#", "drifting devices#"], rows)}
      <h3>Shadow evaluation (candidate against the serving model)</h3>${table(["rollout", "candidate",
        "profile", "agreement#", "weakest class#", "frames#", "candidate p95 ms#"], shadow)}`,
    charts: () => {
      plot("chart-golden", [
        { type: "bar", name: "golden set", x: acc.releases.map(label), y: acc.releases.map((r) => r.golden_set_accuracy) },
        { type: "bar", name: "mean confidence", x: acc.releases.map(label), y: acc.releases.map((r) => r.mean_confidence) },
      ], { title: { text: "Golden-set accuracy and confidence" }, yaxis: { range: [0, 1], tickformat: ".0%" } });
      plot("chart-shadow", [
        { type: "bar", name: "agreement", x: acc.shadow.map((s) => `${s.rollout} ${s.profile}`), y: acc.shadow.map((s) => s.agreement) },
        { type: "bar", name: "weakest class", x: acc.shadow.map((s) => `${s.rollout} ${s.profile}`), y: acc.shadow.map((s) => s.class_min) },
      ], { title: { text: "Shadow agreement" }, yaxis: { range: [0, 1], tickformat: ".0%" } });
    },
  };
};

pages.rollouts = async (params, id) => {
  if (id) return rolloutPage(id);
  const list = await api("/api/v1/rollouts?limit=200");
  return { html: `<h2>Rollouts</h2>${table(["rollout", "release", "state", "stage#", "devices#", "reason", "updated"],
    list.map((r) => [`<a href="#/rollouts/${esc(r.id)}">${esc(r.id)}</a>`, esc(r.release), state(r.state),
      `${fmt(r.stage)} / ${fmt(r.stages)}`, fmt(r.devices), esc(r.reason), when(r.updated_at)]))}` };
};

const ACTIONS = { running: ["pause", "revert"], paused: ["resume", "revert"], completed: ["revert"] };

async function rolloutPage(id) {
  const path = `/api/v1/rollouts/${encodeURIComponent(id)}`;
  const [r, shadow] = await Promise.all([api(path), api(`${path}/shadow`)]);
  const stages = r.stage_list.map((s) => {
    const share = s.devices ? Math.round((100 * (s.succeeded || 0)) / s.devices) : 0;
    return [fmt(s.stage), esc(s.size), state(s.state), fmt(s.devices), fmt(s.started), fmt(s.succeeded),
      fmt(s.failed), fmt(s.silent), `<div class="bar" title="${share}% succeeded"><span style="width:${share}%"></span></div>`];
  });
  const gates = r.gates.map((g) => [esc(g.name), esc([g.profile, g.subject].filter(Boolean).join(" ") || "stage"),
    fmt(g.value, 2, g.unit === "%" ? " %" : ""), `${esc(g.bound)} ${fmt(g.limit, 2, g.unit === "%" ? " %" : "")}`,
    `${fmt(g.sample)} / ${fmt(g.needed)}`, g.tripped ? '<span class="bad">tripped</span>' : '<span class="ok">ok</span>', esc(g.text)]);
  const buttons = ROLE === "operator" ? (ACTIONS[r.state] || []).map((a) =>
    `<button type="button" data-action="${a}" class="${a === "revert" ? "secondary" : ""}">${a}</button>`).join("") : "";
  const profiles = Object.entries(shadow.profiles || {});
  return {
    html: `<h2>Rollout ${esc(r.id)}: ${esc(r.release)} ${state(r.state)}</h2>
      <p>Stage ${fmt(r.stage)} of ${fmt(r.stages)}, ${fmt(r.devices)} devices.
      ${r.paused_reason ? `<span class="warn">Paused: ${esc(r.paused_reason)}</span>` : esc(r.reason)}</p>
      <div class="actions" id="actions">${buttons}</div><p id="action-result" role="status"></p>
      <h3>Stages</h3>${table(["stage#", "size", "state", "devices#", "started#", "succeeded#", "failed#", "silent#", "progress"], stages)}
      <div class="grid"><div id="chart-stages" class="chart"></div><div id="chart-shadow-classes" class="chart"></div></div>
      <h3>Gates (value against limit)</h3>${table(["gate", "subject", "value#", "limit#", "sample#", "verdict", "reason"], gates)}`,
    charts: () => {
      const x = r.stage_list.map((s) => `stage ${s.stage}`);
      plot("chart-stages", ["succeeded", "in_flight", "failed", "silent", "not_started"].map((k) => ({
        type: "bar", name: k.replace("_", " "), x, y: r.stage_list.map((s) => s[k] || 0) })),
      { barmode: "stack", title: { text: "Devices per stage" } });
      plot("chart-shadow-classes", profiles.map(([p, rep]) => ({ type: "bar", name: p,
        x: rep.classes.map((c) => `class ${c.class}`), y: rep.classes.map((c) => c.agreement) })),
      { title: { text: "Shadow agreement per class" }, yaxis: { range: [0, 1], tickformat: ".0%" } });
      for (const button of document.querySelectorAll("#actions button")) {
        button.addEventListener("click", () => act(id, button.dataset.action));
      }
    },
  };
}

async function act(id, action) {
  const out = document.getElementById("action-result");
  for (const b of document.querySelectorAll("#actions button")) b.disabled = true;
  try {
    const result = await post(`/api/v1/rollouts/${encodeURIComponent(id)}/${action}`);
    out.className = "ok";
    out.textContent = `${action}: now ${result.rollout.state}`;
    setTimeout(render, 600);
  } catch (err) {
    out.className = "notice error";
    out.textContent = `${action} refused: ${err.message}`;
    for (const b of document.querySelectorAll("#actions button")) b.disabled = false;
  }
}

function deltaJob(j) {
  const detail = j.state === "done" ? `${bytes(j.delta_bytes)} (${pct(j.ratio)} of the file, ${esc(j.method)})`
    : j.state === "building" ? `${pct(j.progress)} built`
    : ["skipped", "failed"].includes(j.state) ? esc(j.reason) : "";
  return [esc(`${j.name}@${j.release} ${j.variant}`), esc(j.base_release), state(j.state), detail,
    fmt(j.full_before_delta), when(j.finished_at || j.started_at || j.created_at)];
}

pages.bandwidth = async () => {
  const [bw, deltas] = await Promise.all([api("/api/v1/bandwidth"), api("/api/v1/models/delta-jobs?limit=50")]);
  const f = bw.fleet;
  const name = (r) => `${r.name}@${r.release} ${r.variant}`;
  return {
    html: `<h2>Bandwidth</h2><div class="cards">${card("sent", bytes(f.bytes_sent))}
      ${card("full INT8 would be", bytes(f.full_int8_bytes))}${card("FP32 would be", bytes(f.fp32_bytes))}
      ${card("saved vs INT8", pct(f.saving_vs_int8))}${card(`cost at ${bw.price_per_gb}/GB`, fmt(f.cost_sent, 4))}
      ${card("cost saved", fmt(f.cost_saved, 4))}${card("full before delta", fmt(f.full_before_delta))}</div>
      <div class="grid"><div id="chart-bytes" class="chart"></div><div id="chart-cost" class="chart"></div></div>
      <h3>Per release</h3>${table(["release", "updates#", "deltas#", "full-file fallbacks#", "sent#", "full INT8#", "FP32#", "saved vs INT8#", "cost#"],
        bw.releases.map((r) => [esc(name(r)), fmt(r.updates), fmt(r.deltas), fmt(r.fallbacks), bytes(r.bytes_sent),
          bytes(r.full_int8_bytes), bytes(r.fp32_bytes), pct(r.saving_vs_int8), fmt(r.cost_sent, 4)]))}
      <h3>Delta builds</h3><p class="muted">Built after publish, one per base release; ${fmt(deltas.pending)} queued or building.
        Until a delta is built, devices on its base download the full file (counted as full before delta).</p>
      ${table(["release", "from release", "state", "delta", "full before delta#", "when"], deltas.jobs.map(deltaJob))}`,
    charts: () => {
      const x = bw.releases.map(name);
      plot("chart-bytes", [["bytes_sent", "sent"], ["full_int8_bytes", "full INT8"], ["fp32_bytes", "FP32"]].map(
        ([k, label]) => ({ type: "bar", name: label, x, y: bw.releases.map((r) => r[k]) })),
      { barmode: "group", title: { text: "Bytes per release" }, yaxis: { title: { text: "bytes" } } });
      plot("chart-cost", [{ type: "bar", name: "sent", x, y: bw.releases.map((r) => r.cost_sent) },
        { type: "bar", name: "saved", x, y: bw.releases.map((r) => r.cost_saved) }],
      { barmode: "stack", title: { text: `Cost at ${bw.price_per_gb} per GB` } });
    },
  };
};

pages.devices = async (params, id) => {
  if (id) return devicePage(id);
  const list = await api("/api/v1/devices?limit=500");
  return { html: `<h2>Devices</h2>${table(["device", "profile", "region", "state", "release", "last seen"],
    list.map((d) => [`<a href="#/devices/${esc(d.id)}">${esc(d.id)}</a>`, esc(d.profile), esc(d.tags.region || "–"),
      esc(d.state), d.installed ? esc(`${d.installed.name}@${d.installed.release}`) : fmt(null), when(d.last_seen)]))}` };
};

async function devicePage(id) {
  const base = `/api/v1/devices/${encodeURIComponent(id)}`;
  const [d, hist, data] = await Promise.all([api(base), api(`${base}/history?limit=200`),
    api(`/api/v1/telemetry/series?hours=6&device=${encodeURIComponent(id)}`)]);
  const updates = hist.events.filter((e) => ["update", "download", "golden_set"].includes(e.type));
  const t = (d.telemetry.telemetry || {}).payload || {};
  const tags = Object.entries(d.tags).map(([k, v]) => `${esc(k)}=${esc(v)}`).join(", ");
  return {
    html: `<h2>Device ${esc(d.id)}</h2><div class="cards">${card("profile", esc(d.profile))}
      ${card("state", esc(d.state))}${card("release", d.installed ? esc(`${d.installed.name}@${d.installed.release}`) : fmt(null))}
      ${card("desired", d.desired ? esc(`${d.desired.name}@${d.desired.release}`) : fmt(null))}
      ${card("last seen", when(d.last_seen))}${card("agent", esc(d.agent_version))}</div>
      <p class="muted">Tags: ${tags || "none"}. Latest window: ${fmt(t.inferences)} inferences.</p>
      <h3>Telemetry, last 6 hours</h3><div class="grid">${seriesSlots("device")}</div>
      <h3>Update history</h3>${table(["time", "type", "state", "source", "detail"], updates.map(eventRow))}
      <h3>All events</h3>${table(["time", "type", "state", "source", "detail"], hist.events.map(eventRow))}`,
    charts: () => seriesCharts("device", data),
  };
}
function eventRow(e) {
  const detail = Object.entries(e.detail || {}).filter(([, v]) => v !== null)
    .map(([k, v]) => `${k}=${typeof v === "object" ? JSON.stringify(v) : v}`).join(" ");
  return [when(e.time), esc(e.type), esc(e.state), esc(e.source), `<code>${esc(detail.slice(0, 300))}</code>`];
}

// --- routing ------------------------------------------------------------------------
async function render() {
  const mine = ++renderId;
  const [path, query] = (window.location.hash.replace(/^#\/?/, "") || "overview").split("?");
  const [page, id] = path.split("/").map(decodeURIComponent);
  const show = pages[page] ? page : "overview";
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.dataset.page === show);
  try {
    const out = await pages[show](new URLSearchParams(query || ""), id);
    if (mine !== renderId) return;
    view.innerHTML = out.html;
    if (out.charts) out.charts();
    document.body.dataset.rendered = `${show}${id ? `/${id}` : ""}`;
  } catch (err) {
    if (mine !== renderId) return;
    view.innerHTML = `<p class="notice error">${esc(err.message)}</p>`;
    document.body.dataset.rendered = `error:${show}`;
  }
}

document.getElementById("logout").addEventListener("click", async () => {
  await fetch("/ui/logout", { method: "POST", credentials: "same-origin", headers: { "X-CSRF-Token": CSRF } });
  window.location.assign("/ui/login");
});
window.addEventListener("hashchange", render);
render();
