// The edgefleet dashboard: polls the cloud API with the viewer token kept in
// sessionStorage and renders tables and SVG charts. Untrusted text goes into
// the page through textContent only.
"use strict";

const TOKEN_KEY = "edgefleet.token";
const params = new URLSearchParams(window.location.search);
const POLL_MS = Math.max(500, Number(params.get("interval") || 2000));
const $ = (id) => document.getElementById(id);
let timer = null;
let colors = new Map();

function colorOf(key) {
  if (!colors.has(key)) {
    const palette = window.edgefleetCharts.PALETTE;
    colors.set(key, palette[colors.size % palette.length]);
  }
  return colors.get(key);
}

class AuthError extends Error {}

// The server's reason for refusing a token (e.g. when it expired), shown as text only.
async function refusal(r) {
  let detail = "";
  try {
    const body = await r.json();
    if (typeof body.detail === "string") detail = body.detail.slice(0, 200);
  } catch (e) { /* no JSON: no reason to show */ }
  return detail ? `The token was refused (${detail}); paste a valid viewer token.`
    : "The token was refused; paste a valid viewer token.";
}

async function api(path) {
  const token = sessionStorage.getItem(TOKEN_KEY);
  const r = await fetch(path, {headers: {Authorization: `Bearer ${token}`}, cache: "no-store"});
  if (r.status === 401 || r.status === 403) throw new AuthError(await refusal(r));
  if (!r.ok) throw new Error(`${path}: HTTP ${r.status}`);
  return r.json();
}

function cell(row, text, cls) {
  const td = document.createElement("td");
  td.textContent = text === null || text === undefined ? "–" : String(text);
  if (cls) td.className = cls;
  row.appendChild(td);
  return td;
}

function ago(ts) {
  if (!ts) return "–";
  const s = Math.max(0, Date.now() / 1000 - ts);
  return s < 60 ? `${s.toFixed(0)} s ago` : `${(s / 60).toFixed(0)} min ago`;
}

function renderFleet(devices) {
  const body = $("fleet").querySelector("tbody");
  body.replaceChildren();
  for (const d of devices) {
    const tr = document.createElement("tr");
    tr.dataset.device = d.device_id;
    cell(tr, d.device_id, "mono");
    cell(tr, d.online ? "online" : "offline", d.online ? "ok" : "bad");
    cell(tr, d.group);
    cell(tr, d.model);
    cell(tr, d.release);
    cell(tr, d.state, d.state === "rolled_back" || d.state === "failed" ? "bad" : "");
    cell(tr, d.slot);
    cell(tr, d.inferences_total, "num");
    cell(tr, d.errors_total, "num");
    cell(tr, d.latency_p99_ms === null ? null : d.latency_p99_ms.toFixed(2), "num");
    cell(tr, ago(d.last_seen));
    body.appendChild(tr);
  }
  $("fleet-empty").hidden = devices.length > 0;
  const online = devices.filter((d) => d.online).length;
  $("t-online").textContent = `${online} / ${devices.length}`;
}

function renderReleases(releases, devices, retrain) {
  const onRelease = new Map();
  for (const d of devices) {
    if (d.model) {
      const k = `${d.model}/${d.release}`;
      onRelease.set(k, (onRelease.get(k) || 0) + 1);
    }
  }
  const body = $("releases").querySelector("tbody");
  body.replaceChildren();
  for (const m of releases.slice().reverse()) {
    const tr = document.createElement("tr");
    cell(tr, m.model);
    cell(tr, m.release, "num");
    cell(tr, m.quantization);
    const acc = m.metrics && m.metrics.accuracy;
    cell(tr, acc === undefined ? null : acc.toFixed(3), "num");
    const n = onRelease.get(`${m.model}/${m.release}`) || 0;
    const td = cell(tr, "");
    const bar = document.createElement("div");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = `${devices.length ? (100 * n) / devices.length : 0}%`;
    bar.appendChild(fill);
    const label = document.createElement("small");
    label.textContent = `${n} / ${devices.length}`;
    td.append(bar, label);
    body.appendChild(tr);
  }
  $("t-releases").textContent = String(releases.length);
  const list = $("retrain");
  list.replaceChildren();
  if (!retrain.runs.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = retrain.job ? `retraining job “${retrain.job}” is idle`
      : "no retraining job configured; rollouts are started by operators";
    list.appendChild(li);
  }
  for (const r of retrain.runs.slice(0, 8)) {
    const li = document.createElement("li");
    li.className = r.state === "failed" ? "bad" : r.state === "done" ? "ok" : "";
    li.textContent = `#${r.id} ${r.model} ${r.from_release} → ${r.new_release || "…"} ` +
      `(${r.group}): ${r.state} — ${r.detail}`;
    list.appendChild(li);
  }
}

function progressBar(fraction, text) {
  const wrap = document.createElement("span");
  const bar = document.createElement("div");
  bar.className = "bar";
  const fill = document.createElement("span");
  fill.style.width = `${Math.round(100 * Math.max(0, Math.min(1, fraction)))}%`;
  bar.appendChild(fill);
  const label = document.createElement("small");
  label.textContent = text;
  wrap.append(bar, label);
  return wrap;
}

async function renderRollouts(rollouts) {
  const body = $("rollouts").querySelector("tbody");
  // Wave detail for live rollouts (a few at most); the list has the rest.
  const live = rollouts.filter((r) => r.state === "running" || r.state === "paused").slice(0, 5);
  const detail = new Map(await Promise.all(
    live.map(async (r) => [r.id, await api(`/api/v1/rollouts/${encodeURIComponent(r.id)}`)])));
  body.replaceChildren();
  for (const r of rollouts.slice(0, 10)) {
    const tr = document.createElement("tr");
    tr.dataset.rollout = r.id;
    cell(tr, r.id, "mono");
    cell(tr, `${r.model} ${r.release}`);
    cell(tr, r.state, r.state === "aborted" ? "bad" : r.state === "completed" ? "ok" : "");
    const waves = cell(tr, "");
    const d = detail.get(r.id);
    if (d) {
      for (const w of d.wave_detail) {
        const done = (w.counts.updated || 0) / Math.max(1, w.devices);
        waves.appendChild(progressBar(done, `${w.wave}: ${w.counts.updated || 0}/${w.devices}`));
      }
    } else {
      waves.textContent = `${r.wave} / ${r.waves}`;
    }
    const updated = r.counts.updated || 0;
    cell(tr, "").appendChild(progressBar(r.progress, `${updated} / ${r.devices}`));
    const failed = (r.counts.failed || 0) + (r.counts.missed || 0);
    cell(tr, failed ? `${r.devices} (${failed} failed or missed)` : r.devices, failed ? "bad" : "");
    cell(tr, r.reason);
    body.appendChild(tr);
  }
  $("rollouts-empty").hidden = rollouts.length > 0;
}

function renderLatency(series) {
  const byRelease = new Map();
  for (const p of series) {
    const k = `${p.model} r${p.release}`;
    if (!byRelease.has(k)) byRelease.set(k, []);
    byRelease.get(k).push(p);
  }
  const lines = [];
  for (const [k, pts] of byRelease) {
    const color = colorOf(k);
    lines.push({name: k, color, points: pts.filter((p) => p.p50_ms !== null)
      .map((p) => [p.t, p.p50_ms])});
    lines.push({name: `${k} p99`, color, dashed: true, points: pts.filter((p) => p.p99_ms !== null)
      .map((p) => [p.t, p.p99_ms])});
  }
  window.edgefleetCharts.lineChart($("latency-chart"), lines, {unit: "ms"});
}

function renderDrift(series, rule) {
  const byKey = new Map();
  for (const e of series) {
    if (e.psi_mean === null) continue;
    const k = `${e.model} r${e.release} ${e.group}`;
    if (!byKey.has(k)) byKey.set(k, []);
    byKey.get(k).push([e.bucket_end, e.psi_mean]);
  }
  const lines = [...byKey].map(([k, points]) => ({name: k, color: colorOf(k), points}));
  window.edgefleetCharts.lineChart($("drift-chart"), lines, {
    unit: "PSI", threshold: rule.threshold,
    thresholdLabel: `alert: ${rule.k} of ${rule.m} windows > ${rule.threshold}`});
}

function renderAlerts(alerts) {
  const list = $("alerts");
  list.replaceChildren();
  const open = alerts.filter((a) => a.state === "open");
  $("t-alerts").textContent = String(open.length);
  $("t-alerts").className = open.length ? "value bad" : "value";
  if (!alerts.length) {
    const li = document.createElement("li");
    li.className = "muted";
    li.textContent = "no drift alerts";
    list.appendChild(li);
  }
  for (const a of alerts.slice(0, 10)) {
    const li = document.createElement("li");
    li.className = a.state === "open" ? "bad" : "muted";
    li.textContent = `${new Date(a.opened_at * 1000).toTimeString().slice(0, 8)} ` +
      `[${a.state}] ${a.message}`;
    list.appendChild(li);
  }
}

function renderTiles(summary, ingest) {
  let rate = 0, inf = 0, err = 0;
  for (const r of summary) {
    rate += r.inference_rate; inf += r.inferences; err += r.errors;
  }
  $("t-rate").textContent = rate.toFixed(0);
  $("t-errors").textContent = inf + err ? `${((100 * err) / (inf + err)).toFixed(2)} %` : "–";
  const stored = ingest.workers.reduce((n, w) => n + w.stored, 0);
  const dropped = ingest.workers.reduce(
    (n, w) => n + Object.values(w.dropped).reduce((a, b) => a + b, 0), 0);
  $("t-ingest").textContent = ingest.workers.length ? `${stored} (${dropped} dropped)` : "apart";
}

async function refresh() {
  try {
    const [devices, releases, summary, series, drift, driftSeries, alerts, retrain, ingest,
      rollouts] = await Promise.all([
        api("/api/v1/devices"), api("/api/v1/releases"),
        api("/api/v1/telemetry/summary?minutes=5"), api("/api/v1/telemetry/series?minutes=15"),
        api("/api/v1/drift"), api("/api/v1/drift/series?minutes=60"), api("/api/v1/alerts"),
        api("/api/v1/retrain"), api("/api/v1/telemetry/ingest"), api("/api/v1/rollouts?limit=20")]);
    renderFleet(devices);
    await renderRollouts(rollouts);
    renderReleases(releases, devices, retrain);
    renderTiles(summary, ingest);
    renderLatency(series);
    renderDrift(driftSeries, drift.rule);
    renderAlerts(alerts);
    $("status").textContent = `live · updated ${new Date().toTimeString().slice(0, 8)}`;
    $("status").className = "status ok";
  } catch (e) {
    if (e instanceof AuthError) {
      signOut(e.message);
      return;
    }
    $("status").textContent = `update failed: ${e.message}`;
    $("status").className = "status bad";
  }
}

function signOut(message) {
  if (timer) clearInterval(timer);
  timer = null;
  sessionStorage.removeItem(TOKEN_KEY);
  $("main").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("status").textContent = "not signed in";
  $("status").className = "status";
  $("login-error").hidden = !message;
  $("login-error").textContent = message || "";
}

function signIn() {
  $("login").hidden = true;
  $("main").hidden = false;
  $("logout").hidden = false;
  refresh();
  timer = setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const token = $("token").value.trim();
    $("token").value = "";
    if (!token) return;
    // One request checks the token before the dashboard starts polling with it.
    const r = await fetch("/api/v1/alerts?limit=1",
                          {headers: {Authorization: `Bearer ${token}`}, cache: "no-store"});
    if (!r.ok) {
      signOut(r.status === 401 || r.status === 403
        ? await refusal(r) : `Sign-in failed: HTTP ${r.status}`);
      return;
    }
    sessionStorage.setItem(TOKEN_KEY, token);
    signIn();
  });
  $("logout").addEventListener("click", () => signOut(""));
  if (sessionStorage.getItem(TOKEN_KEY)) signIn(); else signOut("");
});
