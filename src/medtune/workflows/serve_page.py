"""The page of ``medtune serve``: one HTML document, its style sheet and its script.

Kept as Python strings so they ship inside the package with no data-file configuration, and
served by the server itself (no CDN, no remote font: the page works offline). The script builds
the page with ``textContent`` only, never ``innerHTML``, so file names and values from the
server cannot inject markup. It renders whatever columns the prediction rows carry: the known
ones (quality verdict, grade name, class probabilities, ``p_referable``, the referral flag, a
site-shift flag) as a card per eye, and every column in the batch table.
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
<header>
  <h1>medtune screening</h1>
  <p class="disclaimer" id="disclaimer">Research use only. Not a medical device.</p>
</header>
<main>
<section class="panel" id="upload-panel">
  <h2>Photographs</h2>
  <label id="drop" for="files" tabindex="0">
    <strong>Drop fundus photographs here</strong> or click to choose
    <span class="hint" id="limits-hint">JPEG, PNG, TIFF or DICOM</span>
  </label>
  <input id="files" name="files" type="file" multiple
    accept=".jpg,.jpeg,.png,.tif,.tiff,.dcm,.dicom,image/jpeg,image/png,image/tiff,application/dicom">
  <div class="row">
    <span id="chosen">No file chosen</span>
    <button id="screen" type="button" disabled>Screen</button>
  </div>
  <p id="status" role="status" aria-live="polite"></p>
  <p id="error" class="error" role="alert" hidden></p>
</section>
<section id="results" aria-label="results per eye"></section>
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
header { background: #fff; border-bottom: 1px solid var(--line); padding: 12px 24px;
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
.eye { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px; }
.eye header { all: unset; display: flex; justify-content: space-between; gap: 8px;
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
.card-grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(300px, 1fr));
  gap: 8px 32px; }
"""

JS = r"""
"use strict";
const $ = (sel) => document.querySelector(sel);
let card = {};
let chosen = [];

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
function pick(row, names) {
  for (const n of names) if (row[n] !== undefined && row[n] !== null && row[n] !== "") return n;
  return null;
}

async function loadCard() {
  try {
    const res = await fetch("/api/model");
    card = await res.json();
  } catch (e) { card = {}; }
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

function setFiles(list) {
  chosen = Array.from(list || []);
  $("#chosen").textContent = chosen.length ? chosen.length + " file(s): " +
    chosen.map((f) => f.name).join(", ") : "No file chosen";
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
  for (const f of chosen) form.append("files", f, f.name);
  form.append("explain", card.explain ? "true" : "false");
  const started = performance.now();
  try {
    const res = await fetch("/api/predict", { method: "POST", body: form });
    let data;
    try {
      data = await res.json();
    } catch (e) {
      data = { error: "the server answered " + res.status };
    }
    if (!res.ok) {
      showError(data.error || ("the server answered " + res.status));
      $("#status").textContent = "";
      return;
    }
    render(data);
    const ungradable = data.rows.filter((r) => r.quality === "ungradable").length;
    $("#status").textContent = "Done: " + data.rows.length + " screened (" + ungradable +
      " ungradable), " + data.skipped.length + " unreadable, in " +
      ((performance.now() - started) / 1000).toFixed(1) + " s.";
  } catch (e) {
    showError("The server cannot be reached; is medtune serve still running?");
    $("#status").textContent = "";
  } finally {
    $("#screen").disabled = chosen.length === 0;
  }
}

function classColumns(row) {
  return Object.keys(row).filter((k) => k.startsWith("p_") && k !== "p_referable");
}

function eyeCard(row, index, data) {
  const box = el("article", "eye");
  box.dataset.image = row.image;
  const head = el("header");
  head.append(el("h3", null, row.image));
  const verdict = String(row.quality === undefined || row.quality === null ? "" : row.quality);
  const gradable = verdict.toLowerCase() !== "ungradable";
  if (verdict) {  // empty: no quality gate assessed this image
    const badge = el("span", "badge " + (gradable ? "ok" : "bad"),
      gradable ? "Gradable" : "Ungradable");
    badge.dataset.verdict = gradable ? "gradable" : "ungradable";
    head.append(badge);
  }
  box.append(head);
  if (!gradable && row.quality_reason) box.append(el("p", "reason", row.quality_reason));
  const nameKey = pick(row, ["grade_name", "pred"]);
  const gradeKey = pick(row, ["grade", "pred_index"]);
  if (nameKey) {
    const g = el("div", "grade");
    g.dataset.role = "grade";
    const index = gradeKey !== null ? String(row[gradeKey]) : null;
    const name = String(row[nameKey]);
    const text = index === null ? name : index === name ? "Grade " + index :
      "Grade " + index + " \u2013 " + name;
    g.append(document.createTextNode(text + " "));
    if (!gradable) g.append(el("small", null, "not to be relied on: ungradable photograph"));
    box.append(g);
  }
  const probs = classColumns(row);
  if (probs.length) {
    const bars = el("div", "bars");
    const best = probs.reduce((a, b) => (Number(row[b]) > Number(row[a]) ? b : a));
    for (const k of probs) {
      const bar = el("div", "bar" + (k === best ? " top" : ""));
      const fill = el("span");
      fill.style.width = Math.max(0, Math.min(100, 100 * Number(row[k]))) + "%";
      bar.append(fill);
      bars.append(el("span", null, k.slice(2)), bar, el("span", "num", pct(row[k])));
    }
    box.append(el("div", "hint", "Calibrated probabilities"), bars);
  }
  if (row.p_referable !== undefined && row.p_referable !== null && row.p_referable !== "") {
    box.append(el("p", "pref", "P(referable DR) = " + pct(row.p_referable)));
  }
  const referral = String(row.refer === undefined || row.refer === null ? "" : row.refer);
  if (referral) {  // empty: the model carries no validated threshold
    const kind = referral.toLowerCase();
    const d = el("div", "decision " + (kind === "no" ? "norefer" : "refer"));
    d.dataset.role = "decision";
    d.dataset.refer = kind;
    const words = { yes: "Refer to an ophthalmologist", no: "No referral",
      ungradable: "Ungradable: re-image or examine" };
    d.append(el("b", null, words[kind] || referral));
    const ref = (data.meta && data.meta.referral) || card.referral;
    if (ref && ref.threshold !== null && ref.threshold !== undefined && kind !== "ungradable") {
      d.append(el("span", "op", "Refers when P(referable) \u2265 " + fmt(ref.threshold) +
        " (" + ref.operating_point + " operating point; " + opText(ref) + ")"));
    }
    box.append(d);
  }
  const shift = siteShift(row);
  if (shift) box.append(shift);
  const cam = data.gradcam && data.gradcam[String(index)];
  if (cam) {
    const fig = el("figure");
    const img = el("img");
    img.src = cam;
    img.alt = "Grad-CAM for " + row.image;
    fig.append(img);
    box.append(fig);
  }
  return box;
}

function siteShift(row) {
  // predict's columns: site_shift (score) and outside_training ("yes"/"no")
  if (row.outside_training !== "yes") return null;
  const w = el("div", "warn", "Site-shift warning: this photograph lies outside the training " +
    "distribution (score " + fmt(row.site_shift) + "); the validated operating point may not " +
    "hold for it.");
  w.dataset.role = "site-shift";
  return w;
}

function render(data) {
  const results = $("#results");
  results.textContent = "";
  data.rows.forEach((row, i) => results.append(eyeCard(row, i, data)));
  for (const s of data.skipped) {
    const box = el("article", "eye");
    box.dataset.image = s.image;
    const head = el("header");
    const badge = el("span", "badge bad", "Unreadable");
    badge.dataset.verdict = "unreadable";
    head.append(el("h3", null, s.image), badge);
    box.append(head, el("p", "reason", s.reason));
    results.append(box);
  }
  const table = $("#table");
  table.textContent = "";
  const head = el("tr");
  for (const c of data.columns) head.append(el("th", null, c));
  table.append(head);
  for (const row of data.rows) {
    const tr = el("tr");
    for (const c of data.columns) {
      tr.append(el("td", typeof row[c] === "number" ? "n" : null, fmt(row[c], c)));
    }
    table.append(tr);
  }
  const link = $("#download");
  if (link.href && link.href.startsWith("blob:")) URL.revokeObjectURL(link.href);
  link.href = URL.createObjectURL(new Blob([data.csv], { type: "text/csv" }));
  $("#batch").hidden = data.rows.length === 0;
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
  loadCard();
});
"""
