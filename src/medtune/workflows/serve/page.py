"""The page of ``medtune serve``: one HTML document, its style sheet and its script.

Kept as Python strings so they ship inside the package with no data-file configuration, and
served by the server itself (no CDN, no remote font: the page works offline). The script builds
the page with ``textContent`` only, never ``innerHTML``, so file names and values from the
server cannot inject markup. A screening is shown as a clinic reads it: the patient-level answer
first, then each eye (with the grader's review), then each photograph; an ungradable photograph
shows its reason, and the model's guess only on demand. The worklist lists past screenings with
filters and a CSV export; admins also see the users and the audit log. Every state-changing
request carries the session's CSRF token (``X-CSRF-Token``).
"""

from __future__ import annotations

HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>medtune screening</title>
<link rel="stylesheet" href="/page.css">
<script src="/page.js" defer></script>
</head>
<body>
<header class="top">
  <h1>medtune screening</h1>
  <p class="disclaimer" id="disclaimer">Research use only. Not a medical device.</p>
  <nav id="nav" hidden>
    <button type="button" class="tab" id="tab-screen" data-view="screen-view">Screen</button>
    <button type="button" class="tab" id="tab-worklist" data-view="worklist-view">Worklist</button>
    <button type="button" class="tab" id="tab-admin" data-view="admin-view" hidden>Admin</button>
    <span id="who"></span>
    <button type="button" id="logout" class="quiet">Log out</button>
  </nav>
</header>
<main>
<section class="panel" id="login" hidden>
  <h2>Log in</h2>
  <form id="login-form">
    <label>User <input id="username" name="username" autocomplete="username" required></label>
    <label>Password <input id="password" name="password" type="password"
      autocomplete="current-password" required></label>
    <button id="login-button" type="submit">Log in</button>
  </form>
  <p id="login-error" class="error" role="alert" hidden></p>
</section>
<div id="app" hidden>
<section class="view" id="screen-view">
<section class="panel" id="upload-panel">
  <h2>Patient and photographs</h2>
  <label class="field">Patient pseudonym (never a name)
    <input id="patient" name="patient" maxlength="128" autocomplete="off" placeholder="e.g. P-0173">
  </label>
  <label id="drop" for="files" tabindex="0">
    <strong>Drop fundus photographs here</strong> or click to choose
    <span class="hint" id="limits-hint">JPEG, PNG, TIFF or DICOM</span>
  </label>
  <input id="files" name="files" type="file" multiple
    accept=".jpg,.jpeg,.png,.tif,.tiff,.dcm,.dicom,image/jpeg,image/png,image/tiff,application/dicom">
  <div id="chosen-list"></div>
  <div class="row">
    <span id="chosen">No file chosen</span>
    <button id="screen" type="button" disabled>Screen</button>
  </div>
  <p id="status" role="status" aria-live="polite"></p>
  <p id="error" class="error" role="alert" hidden></p>
</section>
<section class="panel" id="patient-result" hidden aria-label="patient result"></section>
<section id="eyes" aria-label="results per eye"></section>
<h2 id="photos-title" hidden>Photographs</h2>
<section id="results" aria-label="results per photograph"></section>
<section class="panel" id="batch" hidden>
  <div class="row">
    <h2>Batch</h2>
    <a id="download" class="button" download="medtune-predictions.csv">Download CSV</a>
  </div>
  <div class="scroll"><table id="table"></table></div>
</section>
<section class="panel" id="card">
  <h2>Model card</h2>
  <div id="card-body">Loading&hellip;</div>
</section>
</section>
<section class="view panel" id="worklist-view" hidden>
  <h2>Worklist</h2>
  <div class="filters">
    <label>Referral <select id="f-referral"><option value="">any</option>
      <option value="refer">refer</option><option value="no_refer">no referral</option>
      <option value="insufficient_quality">insufficient quality</option></select></label>
    <label>Quality <select id="f-quality"><option value="">any</option>
      <option value="gradable">gradable</option><option value="partial">partly gradable</option>
      <option value="ungradable">ungradable</option></select></label>
    <label>Patient <input id="f-patient" maxlength="128"></label>
    <label>From <input id="f-since" type="date"></label>
    <label>To <input id="f-until" type="date"></label>
    <button type="button" id="f-apply">Show</button>
    <a id="export-csv" class="button" href="/api/screenings.csv">Export CSV</a>
  </div>
  <div class="warn" id="worklist-batch" data-role="worklist-batch-shift" hidden></div>
  <div class="scroll"><table id="worklist-table"></table></div>
</section>
<section class="view panel" id="admin-view" hidden>
  <h2>Users</h2>
  <table id="users-table"></table>
  <form id="user-form" class="filters">
    <label>User <input id="new-user" required maxlength="64"></label>
    <label>Password <input id="new-password" type="password" required minlength="10"
      autocomplete="new-password"></label>
    <label>Role <select id="new-role"><option>grader</option><option>admin</option></select></label>
    <button type="submit">Add user</button>
  </form>
  <p id="admin-error" class="error" role="alert" hidden></p>
  <h2>Audit log</h2>
  <div class="scroll"><table id="audit-table"></table></div>
</section>
</div>
</main>
</body>
</html>
"""

CSS = """
:root { --ink: #1d2430; --muted: #5b6575; --line: #d9dee7; --bg: #f5f7fa; --ok: #17663a;
  --okbg: #e3f4ea; --bad: #9b1c1c; --badbg: #fbe6e6; --warn: #7a4b00; --warnbg: #fff1d6;
  --accent: #1f5fae; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  color: var(--ink); background: var(--bg); }
header.top { background: #fff; border-bottom: 1px solid var(--line); padding: 12px 24px;
  display: flex; align-items: baseline; gap: 24px; flex-wrap: wrap; }
h1 { font-size: 20px; margin: 0; }
h2 { font-size: 16px; margin: 0 0 10px; }
h3 { font-size: 15px; margin: 0; word-break: break-all; }
main { max-width: 1200px; margin: 0 auto; padding: 16px 24px 40px; }
.disclaimer { margin: 0; color: var(--bad); font-weight: 600; }
.panel { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 16px;
  margin-bottom: 16px; }
#drop { display: block; border: 2px dashed #9fb0c8; border-radius: 8px; padding: 22px;
  text-align: center; cursor: pointer; background: #fafbfd; }
#drop.over { border-color: var(--accent); background: #eef4fc; }
#files { position: absolute; left: -9999px; }
.hint { display: block; color: var(--muted); font-size: 13px; margin-top: 4px; }
.row { display: flex; align-items: center; justify-content: space-between; gap: 12px;
  margin-top: 10px; }
.row h2 { margin: 0; }
button, .button { background: var(--accent); color: #fff; border: 0; border-radius: 6px;
  padding: 8px 18px; font: inherit; cursor: pointer; text-decoration: none; }
button:disabled { background: #9aa7b8; cursor: default; }
.error { background: var(--badbg); color: var(--bad); padding: 8px 12px; border-radius: 6px; }
#status { color: var(--muted); margin: 8px 0 0; min-height: 1em; }
#results { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr));
  gap: 16px; margin-bottom: 16px; }
.photo header, .eye-summary header { all: unset; display: flex; justify-content: space-between; gap: 8px;
  align-items: center; margin-bottom: 8px; }
.badge { display: inline-block; border-radius: 999px; padding: 2px 10px; font-size: 13px;
  font-weight: 600; white-space: nowrap; }
.badge.ok { background: var(--okbg); color: var(--ok); }
.badge.bad { background: var(--badbg); color: var(--bad); }
.reason { color: var(--bad); font-size: 14px; margin: 4px 0 8px; }
.grade { font-size: 20px; font-weight: 650; margin: 6px 0; }
.grade small { display: block; font-size: 13px; color: var(--bad); font-weight: 400; }
.decision { border-radius: 6px; padding: 8px 10px; margin: 8px 0; }
.decision.refer { background: var(--badbg); color: var(--bad); }
.decision.norefer { background: var(--okbg); color: var(--ok); }
.decision b { font-size: 16px; }
.decision .op { display: block; font-size: 12px; opacity: .9; }
.warn { background: var(--warnbg); color: var(--warn); border-radius: 6px; padding: 6px 10px;
  margin: 8px 0; font-size: 14px; }
.bars { display: grid; grid-template-columns: max-content 1fr 64px; gap: 3px 8px;
  align-items: center; font-size: 13px; margin: 6px 0; }
.bar { height: 10px; background: #e8ecf2; border-radius: 5px; overflow: hidden; }
.bar span { display: block; height: 100%; background: var(--accent); }
.bar.top span { background: #0d3b73; }
.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
.pref { font-size: 14px; margin: 4px 0; }
figure { margin: 10px 0 0; }
figure img { width: 100%; border-radius: 6px; border: 1px solid var(--line); }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; width: 100%; font-size: 13px; }
th, td { border-bottom: 1px solid var(--line); padding: 4px 8px; text-align: left;
  white-space: nowrap; }
th { background: #f0f3f7; }
td.n { text-align: right; font-variant-numeric: tabular-nums; }
dl { display: grid; grid-template-columns: max-content 1fr; gap: 4px 16px; margin: 0 0 10px; }
dt { color: var(--muted); }
dd { margin: 0; }
nav { display: flex; gap: 8px; align-items: center; margin-left: auto; }
.tab { background: #e8eef7; color: var(--ink); }
.tab.active { background: var(--accent); color: #fff; }
.quiet { background: #fff; color: var(--accent); border: 1px solid var(--line); }
#who { color: var(--muted); font-size: 14px; }
#login form, .filters { display: flex; gap: 12px; align-items: end; flex-wrap: wrap; }
label.field, .filters label, #login label { display: flex; flex-direction: column; gap: 4px;
  font-size: 13px; color: var(--muted); }
input, select { font: inherit; padding: 6px 8px; border: 1px solid #b8c3d3; border-radius: 6px; }
label.field { margin-bottom: 10px; max-width: 360px; }
.pick { display: flex; gap: 8px; align-items: center; font-size: 14px; margin: 4px 0; }
.verdict { font-size: 26px; font-weight: 700; border-radius: 8px; padding: 12px 16px; margin: 6px 0; }
.verdict.refer { background: var(--badbg); color: var(--bad); }
.verdict.no_refer { background: var(--okbg); color: var(--ok); }
.verdict.insufficient_quality { background: var(--warnbg); color: var(--warn); }
.verdict small { display: block; font-size: 14px; font-weight: 400; }
#eyes { display: grid; grid-template-columns: repeat(auto-fill, minmax(360px, 1fr)); gap: 16px;
  margin-bottom: 16px; }
.eye-summary { background: #fff; border: 2px solid var(--line); border-radius: 8px; padding: 14px; }
.eye-summary h3 { font-size: 17px; }
.review { border-top: 1px solid var(--line); margin-top: 10px; padding-top: 8px; font-size: 14px; }
.review .row { justify-content: flex-start; margin-top: 6px; }
.photo { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px; }
.photo .side { color: var(--muted); font-size: 13px; }
details { margin: 6px 0; font-size: 14px; }
summary { cursor: pointer; color: var(--accent); }
tr.open { cursor: pointer; }
tr.open:hover { background: #eef4fc; }
.card-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr));
  gap: 8px 32px; }
"""

JS = r"""
"use strict";
const $ = (sel) => document.querySelector(sel);
let card = {};
let chosen = [];
let session = {};
let shown = null;  // the screening on screen (stored form)

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined && text !== null) node.textContent = String(text);
  return node;
}
function pct(x) { return (100 * Number(x)).toFixed(1) + " %"; }
function fmt(v, column) {
  const prob = column && column.startsWith("p_");
  if (typeof v === "number" && (prob || !Number.isInteger(v))) return v.toFixed(4);
  return v === null || v === undefined ? "" : String(v);
}
const METRIC_NAMES = { n: "test images", balanced_accuracy: "balanced accuracy",
  macro_f1: "macro F1", qwk: "quadratic kappa", macro_auc: "macro AUC", ece: "ECE",
  referable_auc: "referable AUC", referable_sensitivity: "referable sensitivity",
  referable_specificity: "referable specificity" };
const REFERRAL = { refer: "Refer to an ophthalmologist", no_refer: "No referral",
  insufficient_quality: "Insufficient quality: re-image or examine in person" };
const REFERRAL_SHORT = { refer: "refer", no_refer: "no referral",
  insufficient_quality: "insufficient quality" };
const EYE_REFER = { yes: "Referable", no: "Not referable",
  ungradable: "Ungradable: re-image or examine" };
const SIDE = { right: "Right eye", left: "Left eye", unknown: "Eye not given" };

async function api(path, options) {
  const opts = Object.assign({ headers: {} }, options || {});
  if (opts.method && opts.method !== "GET" && session.csrf) {
    opts.headers["X-CSRF-Token"] = session.csrf;
  }
  const res = await fetch(path, opts);
  let data;
  try { data = await res.json(); } catch (e) { data = { error: "the server answered " + res.status }; }
  if (res.status === 401 && path !== "/api/login") { showLogin(); }
  return { ok: res.ok, status: res.status, data: data };
}

// ------------------------------------------------------------------ login
async function loadSession() {
  const r = await api("/api/session");
  session = r.data || {};
  if (session.login_required) { showLogin(); } else { showApp(); }
}
function showLogin() {
  session = {};
  $("#app").hidden = true; $("#nav").hidden = true; $("#login").hidden = false;
}
function showApp() {
  $("#login").hidden = true; $("#app").hidden = false; $("#nav").hidden = false;
  $("#who").textContent = session.user + " (" + session.role + ")";
  $("#tab-admin").hidden = session.role !== "admin";
  $("#logout").hidden = session.user === "local";
  showView("screen-view");
  loadCard();
}
async function login(e) {
  e.preventDefault();
  const body = JSON.stringify({ username: $("#username").value, password: $("#password").value });
  const r = await api("/api/login", { method: "POST", body: body,
    headers: { "Content-Type": "application/json" } });
  $("#password").value = "";
  const box = $("#login-error");
  if (!r.ok) { box.textContent = r.data.error || "login refused"; box.hidden = false; return; }
  box.hidden = true;
  session = r.data;
  showApp();
}
async function logout() {
  await api("/api/logout", { method: "POST" });
  shown = null;
  $("#patient-result").hidden = true;
  for (const id of ["#eyes", "#results"]) $(id).textContent = "";
  showLogin();
}
function showView(id) {
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== id;
  for (const t of document.querySelectorAll(".tab")) t.classList.toggle("active", t.dataset.view === id);
  if (id === "worklist-view") loadWorklist();
  if (id === "admin-view") loadAdmin();
}

// ------------------------------------------------------------------ model card
async function loadCard() {
  const r = await api("/api/model");
  card = r.ok ? r.data : {};
  renderCard();
}

function renderCard() {
  const body = $("#card-body");
  body.textContent = "";
  if (card.disclaimer) $("#disclaimer").textContent = card.disclaimer;
  if (card.limits) {
    $("#limits-hint").textContent = card.limits.types.join(", ") + " \u00b7 up to " +
      card.limits.max_files + " files, " + card.limits.max_file_mb + " MiB each";
  }
  const grid = el("div", "card-grid");
  const left = el("div"), right = el("div");
  const dl = el("dl");
  const add = (k, v) => {
    if (v === undefined || v === null || v === "") return;
    dl.append(el("dt", null, k), el("dd", null, v));
  };
  const m = card.model || {}, t = card.training || {};
  add("Model", m.backbone);
  add("Grades", (m.grades || []).join(", "));
  add("Input", m.image_size ? m.image_size + " px" : null);
  add("Backend", card.backend);
  add("Training data", (t.data || "not recorded") + (t.synthetic ? " (synthetic demo set)" : ""));
  add("Strategy", t.strategy);
  const ref = card.referral;
  if (ref) {
    add("Referral", ref.name + ": refer when " + (ref.score || "P(referable)") +
      (ref.threshold !== null && ref.threshold !== undefined ? " \u2265 " + fmt(ref.threshold) +
      " (" + ref.operating_point + "; " + opText(ref) + ")" : " (no validated threshold)"));
    if (ref.rule) add("Threshold rule", ref.rule);
  }
  add("Image quality", card.quality);
  add("Intended use", card.intended_use);
  left.append(dl);
  const metrics = card.metrics;
  if (metrics && metrics.values) {
    right.append(el("h3", null, "Metrics (" + (metrics.source || "") + ")"));
    const table = el("table");
    const head = el("tr");
    head.append(el("th", null, "metric"), el("th", null, "value"), el("th", null, "95% CI"));
    table.append(head);
    for (const [name, item] of Object.entries(metrics.values)) {
      const tr = el("tr");
      const ci = Array.isArray(item.ci95) ? fmt(item.ci95[0]) + " \u2013 " + fmt(item.ci95[1]) : "";
      const label = METRIC_NAMES[name] || name.replace(/_/g, " ");
      tr.append(el("td", null, label), el("td", "n", fmt(item.value)), el("td", "n", ci));
      table.append(tr);
    }
    right.append(table);
  } else {
    right.append(el("p", null, "No metrics stored with this model."));
  }
  grid.append(left, right);
  body.append(grid, el("p", "disclaimer", card.disclaimer || "Research use only."));
}

function opText(op) {
  // the referral rule of predict's meta: sensitivity/specificity measured on validation
  const ci = (c) => (Array.isArray(c) ? " [" + pct(c[0]) + ", " + pct(c[1]) + "]" : "");
  const parts = [];
  const sens = op.validation_sensitivity, spec = op.validation_specificity;
  if (sens !== undefined && sens !== null) {
    parts.push("sensitivity " + pct(sens) + ci(op.validation_sensitivity_ci));
  }
  if (spec !== undefined && spec !== null) {
    parts.push("specificity " + pct(spec) + ci(op.validation_specificity_ci));
  }
  if (!parts.length) return "";
  const n = op.validation_images;
  return parts.join(", ") + " on validation" + (n ? " (" + n + " images)" : "");
}

// ------------------------------------------------------------------ upload
function sideFromName(name) {
  const stem = name.replace(/\.[A-Za-z0-9]{1,5}$/, "");
  const m = stem.match(/(?:^|[_\-\s.])(right|left|od|os|re|le|r|l)(?:[_\-\s.]?\d{1,3})?$/i);
  if (!m) return "";
  return ["right", "od", "re", "r"].includes(m[1].toLowerCase()) ? "right" : "left";
}
function setFiles(list) {
  chosen = Array.from(list || []);
  $("#chosen").textContent = chosen.length ? chosen.length + " file(s)" : "No file chosen";
  const box = $("#chosen-list");
  box.textContent = "";
  chosen.forEach((f, i) => {
    const line = el("div", "pick");
    const select = el("select");
    select.dataset.file = String(i);
    select.setAttribute("aria-label", "eye of " + f.name);
    for (const [value, text] of [["", "eye from file name"], ["right", "right eye (OD)"],
      ["left", "left eye (OS)"]]) {
      const o = el("option", null, text); o.value = value; select.append(o);
    }
    select.value = sideFromName(f.name);
    line.append(select, el("span", null, f.name));
    box.append(line);
  });
  $("#screen").disabled = chosen.length === 0;
}
function showError(message) {
  const box = $("#error");
  box.textContent = message || "";
  box.hidden = !message;
}
async function screen() {
  if (!chosen.length) return;
  showError("");
  $("#screen").disabled = true;
  $("#status").textContent = "Screening " + chosen.length + " photograph(s)\u2026";
  const form = new FormData();
  form.append("patient", $("#patient").value);
  chosen.forEach((f, i) => {
    form.append("files", f, f.name);
    form.append("eye", document.querySelector('select[data-file="' + i + '"]').value);
  });
  form.append("explain", card.explain ? "true" : "false");
  const started = performance.now();
  try {
    const r = await api("/api/predict", { method: "POST", body: form });
    if (!r.ok) { showError(r.data.error || ("the server answered " + r.status)); $("#status").textContent = ""; return; }
    const stored = await api("/api/screenings/" + encodeURIComponent(r.data.screening.id));
    renderScreening(stored.data, r.data);
    const ungradable = r.data.rows.filter((x) => x.quality === "ungradable").length;
    $("#status").textContent = "Done: " + r.data.rows.length + " screened (" + ungradable +
      " ungradable), " + r.data.skipped.length + " unreadable, in " +
      ((performance.now() - started) / 1000).toFixed(1) + " s. Saved in the worklist.";
  } catch (e) {
    showError("The server cannot be reached; is medtune serve still running?");
    $("#status").textContent = "";
  } finally {
    $("#screen").disabled = chosen.length === 0;
  }
}

// ------------------------------------------------------------------ results
function gradeText(index, name) {
  if (index === null || index === undefined) return String(name || "");
  return String(index) === String(name) ? "Grade " + index : "Grade " + index + " \u2013 " + name;
}
function renderScreening(s, fresh) {
  shown = s;
  renderPatient(s);
  const eyes = $("#eyes");
  eyes.textContent = "";
  for (const eye of s.eyes) eyes.append(eyeSummary(s, eye));
  const photos = $("#results");
  photos.textContent = "";
  (s.images || []).forEach((img, i) => photos.append(photoCard(img, i, fresh)));
  for (const sk of (fresh && fresh.skipped) || []) photos.append(unreadableCard(sk));
  $("#photos-title").hidden = false;
  renderBatch(fresh);
  showView("screen-view");
}
function renderPatient(s) {
  const box = $("#patient-result");
  box.textContent = "";
  box.hidden = false;
  box.append(el("h2", null, "Patient " + (s.patient || "(no pseudonym)")));
  const v = el("div", "verdict " + s.referral);
  v.dataset.role = "patient-referral";
  v.dataset.referral = s.referral;
  v.append(document.createTextNode(REFERRAL[s.referral] || "No validated referral rule"));
  const eyesText = s.eyes.map((e) => SIDE[e.side] + ": " + (EYE_REFER[e.refer] || e.quality)).join(" \u00b7 ");
  v.append(el("small", null, eyesText));
  box.append(v);
  const ref = card.referral;
  const rule = "Refer when either eye is referable; insufficient quality when no eye can be graded " +
    "and none is referable. " + (ref && ref.threshold !== null && ref.threshold !== undefined ?
    "An eye is referable when P(referable) \u2265 " + fmt(ref.threshold) + " (" + ref.operating_point +
    "; " + opText(ref) + ")." : "");
  box.append(el("p", "hint", rule));
  box.append(el("p", "hint", "Screened " + s.time + " by " + s.user + " with model " + s.model.id +
    " (" + s.model.version + ")" + (s.site_shift ? "; site-shift warning on a photograph" : "")));
  const batch = batchNote(s.batch_shift);
  if (batch) box.append(batch);
}
// The running batch (the last photographs screened with this model) against the validation
// images: a banner when it differs from every validation site, a quiet line otherwise.
function batchNote(b) {
  const v = b && b.validation;
  if (!v) return null;
  const shifted = v.validated === "no";
  const text = shifted
    ? capital(v.status) + ". The referrals below still follow the threshold, but its " +
      "validated sensitivity may not hold for these photographs (the running batch: the last " +
      b.n_images + " photographs screened with this model)."
    : "Running batch of the last " + b.n_images + " photographs: " + v.status + ".";
  const box = el(shifted ? "div" : "p", shifted ? "warn" : "hint", text);
  box.dataset.role = "batch-shift";
  box.dataset.validated = v.validated;
  return box;
}
function capital(text) { return text ? text.charAt(0).toUpperCase() + text.slice(1) : ""; }
function notValidatedMark(status) {
  const m = el("div", "warn", "Operating point not validated here");
  m.dataset.role = "op-not-validated";
  m.title = status || "";
  return m;
}
function eyeSummary(s, eye) {
  const box = el("article", "eye-summary");
  box.dataset.side = eye.side;
  const head = el("header");
  head.append(el("h3", null, SIDE[eye.side] || eye.side));
  const gradable = eye.quality !== "ungradable";
  const badge = el("span", "badge " + (gradable ? "ok" : "bad"), gradable ? "Gradable" : "Ungradable");
  badge.dataset.verdict = eye.quality;
  head.append(badge);
  box.append(head);
  if (gradable) {
    const g = el("div", "grade", gradeText(eye.grade, eye.grade_name));
    g.dataset.role = "eye-grade";
    box.append(g);
    if (eye.p_referable !== null && eye.p_referable !== undefined) {
      box.append(el("p", "pref", "P(referable DR) = " + pct(eye.p_referable) + " (highest of its photographs)"));
    }
  } else {
    box.append(el("p", "reason", "No gradable photograph of this eye."));
  }
  if (eye.refer) {
    const d = el("div", "decision " + (eye.refer === "no" ? "norefer" : "refer"), EYE_REFER[eye.refer] || eye.refer);
    d.dataset.role = "eye-refer";
    d.dataset.refer = eye.refer;
    box.append(d);
    const v = s.batch_shift && s.batch_shift.validation;
    if (v && v.validated === "no" && (eye.refer === "yes" || eye.refer === "no")) box.append(notValidatedMark(v.status));
  }
  box.append(reviewBox(s, eye));
  return box;
}
function reviewBox(s, eye) {
  const box = el("div", "review");
  const said = el("p", null, eye.review ? "Reviewed: " + gradeText(eye.review.grade, eye.review.grade_name) +
    " by " + eye.review.by + ", " + eye.review.at : "Not reviewed yet.");
  said.dataset.role = "review";
  if (eye.review) said.dataset.grade = String(eye.review.grade);
  box.append(said);
  const row = el("div", "row");
  const select = el("select");
  select.dataset.role = "review-grade";
  select.setAttribute("aria-label", "grader's grade, " + eye.side + " eye");
  s.grades.forEach((name, i) => {
    const o = el("option", null, gradeText(i, name)); o.value = String(i); select.append(o);
  });
  const current = eye.review ? eye.review.grade : eye.grade;
  if (current !== null && current !== undefined) select.value = String(current);
  const save = el("button", null, "Save grade");
  save.type = "button";
  save.dataset.role = "review-save";
  save.addEventListener("click", async () => {
    const r = await api("/api/screenings/" + encodeURIComponent(s.id) + "/review", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ eye: eye.side, grade: Number(select.value) }) });
    if (!r.ok) { showError(r.data.error); return; }
    renderScreening(r.data, null);
  });
  row.append(select, save);
  box.append(row);
  return box;
}
function bars(probabilities) {
  const names = Object.keys(probabilities || {});
  const box = el("div", "bars");
  if (!names.length) return box;
  const best = names.reduce((a, b) => (Number(probabilities[b]) > Number(probabilities[a]) ? b : a));
  for (const k of names) {
    const bar = el("div", "bar" + (k === best ? " top" : ""));
    const fill = el("span");
    fill.style.width = Math.max(0, Math.min(100, 100 * Number(probabilities[k]))) + "%";
    bar.append(fill);
    box.append(el("span", null, k), bar, el("span", "num", pct(probabilities[k])));
  }
  return box;
}
function photoCard(img, index, fresh) {
  const box = el("article", "photo");
  box.dataset.image = img.name;
  box.dataset.side = img.side;
  const head = el("header");
  head.append(el("h3", null, img.name));
  const gradable = img.quality !== "ungradable";
  if (img.quality) {
    const badge = el("span", "badge " + (gradable ? "ok" : "bad"), gradable ? "Gradable" : "Ungradable");
    badge.dataset.verdict = gradable ? "gradable" : "ungradable";
    head.append(badge);
  }
  box.append(head, el("p", "side", SIDE[img.side] || img.side));
  const guess = el("div");
  const g = el("div", gradable ? "grade" : "pref", gradeText(img.grade, img.grade_name));
  g.dataset.role = "grade";
  guess.append(g, el("div", "hint", "Calibrated probabilities"), bars(img.probabilities));
  if (img.p_referable !== null && img.p_referable !== undefined) {
    guess.append(el("p", "pref", "P(referable DR) = " + pct(img.p_referable)));
  }
  if (gradable) {
    box.append(guess);
  } else {
    box.append(el("p", "reason", img.quality_reason || "ungradable photograph"));
    const more = el("details");
    more.append(el("summary", null, "Show the model's guess (not to be relied on)"), guess);
    box.append(more);
  }
  if (img.refer) {
    const d = el("div", "decision " + (img.refer === "no" ? "norefer" : "refer"), EYE_REFER[img.refer] || img.refer);
    d.dataset.role = "decision";
    d.dataset.refer = img.refer;
    box.append(d);
    if (img.operating_point_validated === "no") box.append(notValidatedMark(img.operating_point_status));
  }
  if (img.outside_training) {
    const w = el("div", "warn", "Site-shift warning: this photograph lies outside the training " +
      "distribution (score " + fmt(img.site_shift) + "); the validated operating point may not hold for it.");
    w.dataset.role = "site-shift";
    box.append(w);
  }
  const cam = fresh && fresh.gradcam && fresh.gradcam[String(index)];
  if (cam) {
    const fig = el("figure");
    const im = el("img");
    im.src = cam;
    im.alt = "Grad-CAM for " + img.name;
    fig.append(im);
    box.append(fig);
  }
  return box;
}
function unreadableCard(sk) {
  const box = el("article", "photo");
  box.dataset.image = sk.image;
  const head = el("header");
  const badge = el("span", "badge bad", "Unreadable");
  badge.dataset.verdict = "unreadable";
  head.append(el("h3", null, sk.image), badge);
  box.append(head, el("p", "reason", sk.reason));
  return box;
}
function renderBatch(data) {
  if (!data) { $("#batch").hidden = true; return; }
  const table = $("#table");
  table.textContent = "";
  const head = el("tr");
  for (const c of data.columns) head.append(el("th", null, c));
  table.append(head);
  for (const row of data.rows) {
    const tr = el("tr");
    for (const c of data.columns) tr.append(el("td", typeof row[c] === "number" ? "n" : null, fmt(row[c], c)));
    table.append(tr);
  }
  const link = $("#download");
  if (link.href && link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([data.csv], { type: "text/csv" }));
  $("#batch").hidden = data.rows.length === 0;
}

// ------------------------------------------------------------------ worklist
function filterQuery() {
  const q = new URLSearchParams();
  for (const [key, id] of [["referral", "#f-referral"], ["quality", "#f-quality"],
    ["patient", "#f-patient"], ["since", "#f-since"], ["until", "#f-until"]]) {
    if ($(id).value) q.set(key, $(id).value);
  }
  return q.toString();
}
async function loadWorklist() {
  const q = filterQuery();
  $("#export-csv").href = "/api/screenings.csv" + (q ? "?" + q : "");
  const r = await api("/api/screenings" + (q ? "?" + q : ""));
  const table = $("#worklist-table");
  table.textContent = "";
  if (!r.ok) return;
  const head = el("tr");
  for (const c of ["time (UTC)", "patient", "referral", "quality", "eyes", "reviewed", "user", "operating point", ""]) head.append(el("th", null, c));
  table.append(head);
  const newest = r.data.screenings[0];
  const banner = $("#worklist-batch");
  const nv = newest && newest.batch_shift && newest.batch_shift.validation;
  banner.hidden = !(nv && nv.validated === "no");
  banner.textContent = banner.hidden ? "" : "The latest running batch differs from every " +
    "validation site: referrals are marked \u201coperating point not validated here\u201d " +
    "until the model is calibrated at this site (medtune adapt --labels). " + capital(nv.status) + ".";
  for (const s of r.data.screenings) {
    const tr = el("tr", "open");
    tr.dataset.id = s.id;
    const eyes = s.eyes.map((e) => e.side + ": " + (e.grade_name || e.quality) +
      (e.refer === "yes" ? " (referable)" : "")).join("; ");
    const reviewed = s.eyes.filter((e) => e.review).map((e) => e.side + ": " + e.review.grade_name).join("; ");
    const open = el("button", null, "Open");
    open.type = "button";
    open.addEventListener("click", async () => {
      const got = await api("/api/screenings/" + encodeURIComponent(s.id));
      if (got.ok) renderScreening(got.data, null);
    });
    const cell = el("td"); cell.append(open);
    tr.append(el("td", null, s.time), el("td", null, s.patient),
      el("td", null, REFERRAL_SHORT[s.referral] || s.referral),
      el("td", null, s.quality), el("td", null, eyes), el("td", null, reviewed), el("td", null, s.user),
      opCell(s), cell);
    table.append(tr);
  }
}

function opCell(s) {
  const v = s.batch_shift && s.batch_shift.validation;
  const cell = el("td", v && v.validated === "no" ? "warn" : null,
    !v ? "" : v.validated === "no" ? "not validated here" : v.validated === "yes" ? "validated" : "not tested");
  cell.dataset.role = "worklist-op";
  if (v) cell.title = v.status;
  return cell;
}

// ------------------------------------------------------------------ admin
async function loadAdmin() {
  const users = await api("/api/admin/users");
  const table = $("#users-table");
  table.textContent = "";
  if (users.ok) {
    const head = el("tr");
    for (const c of ["user", "role", "created", ""]) head.append(el("th", null, c));
    table.append(head);
    for (const u of users.data.users) {
      const tr = el("tr");
      const del = el("button", "quiet", "Delete");
      del.type = "button";
      del.addEventListener("click", async () => {
        await api("/api/admin/users/" + encodeURIComponent(u.username), { method: "DELETE" });
        loadAdmin();
      });
      const cell = el("td"); if (u.username !== session.user) cell.append(del);
      tr.append(el("td", null, u.username), el("td", null, u.role), el("td", null, u.created), cell);
      table.append(tr);
    }
  }
  const audit = await api("/api/admin/audit");
  const at = $("#audit-table");
  at.textContent = "";
  if (audit.ok) {
    const head = el("tr");
    for (const c of ["time (UTC)", "user", "action", "target", "detail"]) head.append(el("th", null, c));
    at.append(head);
    for (const a of audit.data.audit) {
      const tr = el("tr");
      for (const c of ["at", "user", "action", "target", "detail"]) tr.append(el("td", null, a[c]));
      at.append(tr);
    }
  }
}
async function addUser(e) {
  e.preventDefault();
  const body = JSON.stringify({ username: $("#new-user").value, password: $("#new-password").value,
    role: $("#new-role").value });
  const r = await api("/api/admin/users", { method: "POST", body: body,
    headers: { "Content-Type": "application/json" } });
  $("#new-password").value = "";
  const box = $("#admin-error");
  box.textContent = r.ok ? "" : (r.data.error || "refused");
  box.hidden = r.ok;
  loadAdmin();
}

document.addEventListener("DOMContentLoaded", () => {
  const drop = $("#drop"), input = $("#files");
  input.addEventListener("change", () => setFiles(input.files));
  for (const ev of ["dragenter", "dragover"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const ev of ["dragleave", "drop"]) {
    drop.addEventListener(ev, (e) => { e.preventDefault(); drop.classList.remove("over"); });
  }
  drop.addEventListener("drop", (e) => setFiles(e.dataTransfer.files));
  drop.addEventListener("keydown", (e) => {
    if (e.key === "Enter" || e.key === " ") input.click();
  });
  $("#screen").addEventListener("click", screen);
  $("#login-form").addEventListener("submit", login);
  $("#logout").addEventListener("click", logout);
  $("#user-form").addEventListener("submit", addUser);
  $("#f-apply").addEventListener("click", loadWorklist);
  for (const t of document.querySelectorAll(".tab")) t.addEventListener("click", () => showView(t.dataset.view));
  loadSession();
});
"""
