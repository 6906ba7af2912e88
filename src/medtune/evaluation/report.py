"""The evaluation report: a self-contained ``report.html``, ``summary.md`` and ``MODEL_CARD.md``.

``report.html`` embeds every figure as a ``data:image/png;base64`` URI and its CSS inline; it has
no scripts and no external references, so it opens from disk without a server. Figures sit in
elements with stable ids (``FIGURE_IDS``); a figure that cannot be drawn (e.g. no training log)
keeps its id and says why.
"""

from __future__ import annotations

import base64
import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from medtune import io
from medtune.evaluation import plots
from medtune.evaluation.calibration import reliability_curve
from medtune.evaluation.labels import LabelSpace
from medtune.evaluation.metrics import HEADLINE_METRICS, SMALL_N
from medtune.evaluation.referral import decoding_rule

__all__ = ["FIGURE_IDS", "SECTION_IDS", "write_report"]

FIGURE_IDS = (
    "fig-class-balance",
    "fig-curves",
    "fig-roc",
    "fig-confusion",
    "fig-reliability",
    "fig-gradcam",
)

#: Sections of ``report.html`` in reading order (``sec-sites`` only with per-site metrics).
SECTION_IDS = (
    "sec-header",
    "sec-metrics",
    "sec-patients",
    "sec-sites",
    "sec-quality",
    "sec-shift",
    "sec-data",
    "sec-per-class",
    "sec-roc",
    "sec-confusion",
    "sec-calibration",
    "sec-curves",
    "sec-gradcam",
    "sec-config",
)

_OP_HEADER = (
    "point",
    "threshold",
    "sensitivity [95% CI]",
    "specificity [95% CI]",
    "PPV",
    "NPV",
    "validation sens / spec",
)

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;
max-width:1100px;padding:0 1rem;color:#1d232a;line-height:1.45}
h1{margin-bottom:.2rem}h2{border-bottom:2px solid #dde3ea;padding-bottom:.2rem;margin-top:2rem}
table{border-collapse:collapse;margin:.6rem 0;font-size:.92rem}
th,td{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left}th{background:#f3f6f9}
td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
figure{margin:1rem 0}figure img{max-width:100%;height:auto;border:1px solid #e4e8ec}
figcaption{font-size:.85rem;color:#57606a}
pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.82rem}
.warn{background:#fff4e5;border-left:4px solid #e8a317;padding:.6rem .9rem;margin:1rem 0}
.missing{color:#57606a;font-style:italic}.muted{color:#57606a;font-size:.88rem}
table.facts th{width:11rem}details{margin:1rem 0}summary{cursor:pointer;font-weight:600}
"""


# ---------------------------------------------------------------- helpers


def _splits(metrics: Mapping[str, Any], split: str) -> tuple[dict[str, dict[str, Any]], str]:
    """Accept one compute_metrics dict or ``{split: dict}``; return all splits and the main one."""
    if "accuracy" in metrics:
        return {split: dict(metrics)}, split
    found = {k: dict(v) for k, v in metrics.items() if isinstance(v, Mapping) and "accuracy" in v}
    if not found:
        raise ValueError("metrics must be a compute_metrics() dict or {split: compute_metrics()}")
    return found, split if split in found else list(found)[-1]


def _num(v: Any, digits: int = 3) -> str:
    return "n/a" if v is None else f"{float(v):.{digits}f}"


def _ci(ci: Sequence[float] | None, digits: int = 3) -> str:
    return "" if not ci else f"[{ci[0]:.{digits}f}, {ci[1]:.{digits}f}]"


def _small_n(n: Any) -> str:
    """`` (n=N)`` for a figure resting on fewer than ``SMALL_N`` cases, else ``""``."""
    return f" (n={n})" if n is not None and n < SMALL_N else ""


def _value_ci(m: Mapping[str, Any], key: str) -> str:
    v, ci = m.get(key), m.get(f"{key}_ci")
    return (
        _num(v)
        + (f" {_ci(ci)}" if ci else "")
        + (_small_n(m.get(f"{key}_n")) if v is not None else "")
    )


def _small_n_note(splits: Mapping[str, Mapping[str, Any]]) -> str:
    """The caveat printed under a table when any figure carries ``(n=N)``."""
    if not any("(n=" in str(c) for r in _headline_rows(splits) for c in r[1:]):
        return ""
    return (
        f" (n=N) marks a figure resting on fewer than {SMALL_N} cases (e.g. few negatives for "
        "specificity): it is unstable; read it with its interval."
    )


def _plain(obj: Any) -> Any:
    """JSON/YAML-safe copy (paths, numpy values and other objects become plain values)."""
    return json.loads(
        json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o))
    )


def _data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _figure(fig_id: str, png: bytes | None, caption: str, missing: str) -> str:
    if png is None:
        return f'<figure id="{fig_id}"><p class="missing">{html.escape(missing)}</p></figure>'
    alt = html.escape(caption, quote=True)
    return (
        f'<figure id="{fig_id}"><img alt="{alt}" src="{_data_uri(png)}">'
        f"<figcaption>{html.escape(caption)}</figcaption></figure>"
    )


def _table(tid: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f"<td{' class=num' if i else ''}>{html.escape(str(c))}</td>" for i, c in enumerate(r)
        )
        + "</tr>"
        for r in rows
    )
    return f'<table id="{tid}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _class_counts(
    class_counts: Mapping[str, Any] | None, y: np.ndarray, class_names: Sequence[str], split: str
) -> dict[str, Any]:
    """Class counts as ``{split: {class: n}}`` (a flat ``{class: n}`` becomes ``{"all": ...}``)."""
    if class_counts:
        plain = _plain(class_counts)
        return plain if all(isinstance(v, Mapping) for v in plain.values()) else {"all": plain}
    counts = np.bincount(y, minlength=len(class_names))
    return {split: {name: int(counts[k]) for k, name in enumerate(class_names)}}


def _named_counts(
    counts: Mapping[str, Any], class_names: Sequence[str], shown: Sequence[str]
) -> dict[str, Any]:
    """The counts keyed by grade name (for the bar chart)."""
    rename = dict(zip(class_names, shown, strict=True))
    return {
        s: {rename.get(c, c): n for c, n in d.items()} if isinstance(d, Mapping) else d
        for s, d in counts.items()
    }


def _headline_rows(splits: Mapping[str, Mapping[str, Any]]) -> list[list[str]]:
    return [
        [label, *(_value_ci(m, key) for m in splits.values())]
        for key, label in ((m.key, m.label) for m in HEADLINE_METRICS)
        if any(m.get(key) is not None for m in splits.values())
    ]


def _op_rows(m: Mapping[str, Any]) -> list[list[str]]:
    rows = []
    for name, d in (m.get("operating_points") or {}).items():
        label = plots.OPERATING_POINT_LABELS.get(name, name)
        rows.append(
            [
                label + (" (headline)" if name == m.get("headline_operating_point") else ""),
                _num(d["threshold"], 4),
                f"{_num(d['sensitivity'])} {_ci(d.get('sensitivity_ci'))}"
                + _small_n(d["tp"] + d["fn"]),
                f"{_num(d['specificity'])} {_ci(d.get('specificity_ci'))}"
                + _small_n(d["tn"] + d["fp"]),
                _num(d.get("ppv")),
                _num(d.get("npv")),
                f"{_num(d.get('val_sensitivity'))} / {_num(d.get('val_specificity'))}",
            ]
        )
    return rows


def _referred_header(m: Mapping[str, Any]) -> list[str]:
    """``grade`` and the points that carry ``referred_by_class`` (none for two classes)."""
    ops = m.get("operating_points") or {}
    return ["grade", *(n for n, d in ops.items() if d.get("referred_by_class"))]


def _referred_rows(m: Mapping[str, Any]) -> list[list[str]]:
    """Per grade, the share of its images each operating point refers: ``share [CI] (k/n)``."""
    ops = [d["referred_by_class"] for d in (m.get("operating_points") or {}).values()
           if d.get("referred_by_class")]  # fmt: skip
    if not ops:
        return []
    shown = dict(zip(m["class_names"], _names(m), strict=True))
    return [
        [shown.get(c, c)]
        + [
            f"{_num(o[c]['share'])} {_ci(o[c]['share_ci'])} ({o[c]['referred']}/{o[c]['n']})"
            for o in ops
        ]  # fmt: skip
        for c in map(str, m["class_names"])
    ]


def _names(m: Mapping[str, Any]) -> list[str]:
    """Grade names of the metrics' classes (one table: ``LabelSpace.grade_names``)."""
    return LabelSpace(tuple(m["class_names"]), bool(m.get("ordinal"))).grade_names


def _per_class_rows(m: Mapping[str, Any]) -> list[list[str]]:
    shown = dict(zip(m["class_names"], _names(m), strict=True))
    return [
        [
            shown.get(name, name),
            _num(d["precision"]),
            _num(d["recall"]),
            _num(d["f1"]),
            d["support"],
            _num(d["auc"]),
        ]
        for name, d in m["per_class"].items()
    ]


def _binary_view(
    m: Mapping[str, Any], y: np.ndarray, probs: np.ndarray
) -> tuple[str, np.ndarray, np.ndarray] | None:
    task = m.get("binary_task")
    if not task:
        return None
    pos = list(task["positive_class_indices"])
    return task["name"], np.isin(y, pos).astype(np.int64), probs[:, pos].sum(axis=1)


def _optimistic_note(splits: Mapping[str, Mapping[str, Any]]) -> str:
    same = [s for s, m in splits.items() if m.get("thresholds_from") == "same data (optimistic)"]
    if not same:
        return ""
    return (
        f" Operating points for {', '.join(same)} were chosen on that same data, so its "
        "sensitivity/specificity are optimistic."
    )


def _synthetic_banner(synthetic: bool) -> str:
    if not synthetic:
        return ""
    return (
        '<div class="warn" id="synthetic-warning"><strong>Synthetic data.</strong> These figures '
        "come from generated images, not patients. They test the pipeline only and say nothing "
        "about clinical performance.</div>"
    )


# ---------------------------------------------------------------- figures


def _figures(
    m: Mapping[str, Any],
    y: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    counts: Mapping[str, Any],
    curves_csv: str | os.PathLike[str] | None,
    gradcam_examples: Sequence[plots.GradcamExample] | None,
    curves_note: str | None,
) -> dict[str, str]:
    binary = _binary_view(m, y, probs)
    curve = reliability_curve(probs, y)
    curves_png = None
    if curves_csv is not None and Path(curves_csv).is_file():
        curves_png = plots.training_curves_png(curves_csv)
    cm = m.get("confusion_matrix")
    return {
        "fig-class-balance": _figure(
            "fig-class-balance",
            plots.class_balance_png(counts, class_names),
            "Images per grade.",
            "",
        ),
        "fig-curves": _figure(
            "fig-curves",
            curves_png,
            "Training curves (per-epoch means from the training log).",
            curves_note or "No training log was given.",
        ),
        "fig-roc": _figure(
            "fig-roc",
            plots.roc_png(
                y, probs, class_names, binary=binary, operating_points=m.get("operating_points")
            ),
            "ROC curves: one grade against the rest"
            + (f"; {binary[0]} with the validation-chosen operating points" if binary else "."),
            "",
        ),
        "fig-confusion": _figure(
            "fig-confusion",
            plots.confusion_png(cm, class_names),
            "Confusion matrix (rows = true grade): counts and row-normalised.",
            "",
        ),
        "fig-reliability": _figure(
            "fig-reliability",
            plots.reliability_png(curve),
            "Reliability diagram (probability of the predicted grade against how often it was "
            "right) with images per bin.",
            "",
        ),
        "fig-gradcam": _figure(
            "fig-gradcam",
            plots.gradcam_png(gradcam_examples) if gradcam_examples else None,
            "Grad-CAM: where the network looked, for the most confident right and wrong "
            "prediction of each true grade.",
            "No Grad-CAM examples were given.",
        ),
    }


# ---------------------------------------------------------------- sections


def _facts(tid: str, rows: Sequence[Sequence[str]]) -> str:
    """A two-column table of labelled facts (row headers, no column header)."""
    body = "".join(
        f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows
    )
    return f'<table id="{tid}" class="facts"><tbody>{body}</tbody></table>'


def _score_in_words(m: Mapping[str, Any]) -> str:
    """``P(referable DR) = P(Moderate NPDR) + ...`` from the binary task's classes."""
    names = _names(m)
    task = m["binary_task"]
    terms = " + ".join(f"P({names[k]})" for k in task["positive_class_indices"])
    return f"P({task['name']}) = {terms}"


def _header(header: Mapping[str, Any] | None, m: Mapping[str, Any], main: str) -> list[list[str]]:
    """Facts first: date, medtune version, model, data."""
    import datetime

    from medtune.version import __version__

    facts: dict[str, Any] = {
        "Date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "medtune version": __version__,
    }
    facts.update({k: v for k, v in (header or {}).items() if v not in (None, "")})
    facts.setdefault("Evaluated data", f"{main} split")
    facts["Images evaluated"] = f"{m['n']} ({m['n_classes']} grades)"
    return [[k, str(v)] for k, v in facts.items()]


def _sites_section(sites: Mapping[str, Mapping[str, Any]] | None) -> str:
    if not sites:
        return ""
    rows = [["images", *(str(d.get("n", "")) for d in sites.values())], *_headline_rows(sites)]
    return (
        '<section id="sec-sites"><h2>By site</h2>'
        + _table("tbl-sites", ["metric", *(f"{s} [95% CI]" for s in sites)], rows)
        + '<p class="muted">The same model and validation thresholds at every site; differences '
        "show how performance moves with the camera, population and grading.</p></section>"
    )


def _patient_rows(m: Mapping[str, Any], pm: Mapping[str, Any]) -> list[list[str]]:
    """Image-level and patient-level sensitivity / specificity side by side, per point."""
    rows = []
    images = m.get("operating_points") or {}
    for name, d in (pm.get("operating_points") or {}).items():
        img = images.get(name) or {}
        rows.append(
            [
                plots.OPERATING_POINT_LABELS.get(name, name),
                _num(d["threshold"], 4),
                f"{_num(img.get('sensitivity'))} {_ci(img.get('sensitivity_ci'))}",
                f"{_num(d['sensitivity'])} {_ci(d.get('sensitivity_ci'))}"
                + _small_n(d["tp"] + d["fn"]),
                f"{_num(img.get('specificity'))} {_ci(img.get('specificity_ci'))}",
                f"{_num(d['specificity'])} {_ci(d.get('specificity_ci'))}"
                + _small_n(d["tn"] + d["fp"]),
                f"{d['n_insufficient']} ({_num(d['insufficient_share'])})",
            ]
        )
    return rows


def _patients_section(m: Mapping[str, Any]) -> str:
    """Patient-level figures (``metrics["patients"]``, :mod:`medtune.evaluation.patients`)."""
    head = '<section id="sec-patients"><h2>Patients and eyes</h2>'
    pm = m.get("patients")
    if not pm:
        return (
            head + '<p class="missing">The evaluated data do not name each image\'s patient '
            "(a patient_id column, DICOM PatientID, or names such as 17_left.jpeg), so only "
            "image-level figures are given.</p></section>"
        )
    esc = html.escape
    sources = ", ".join(f"{k} {v}" for k, v in (pm.get("patient_from") or {}).items())
    eyes = ", ".join(f"{k} {v}" for k, v in (pm.get("eye_from") or {}).items())
    text = (
        f"<p><strong>{pm['n_patients']} patients</strong> ({pm['n_positive']} referable), "
        f"{pm['n_eyes']} eyes ({pm['n_ungradable_eyes']} without a gradable photograph), "
        f"{pm['n_images']} images"
        + (f"; {pm['n_images_without_patient']} images without a patient are left out" if
           pm.get("n_images_without_patient") else "")
        + f". Patient from: {esc(sources)}; eye from: {esc(eyes)}.</p>"
        f"<p>Per eye: the highest grade of its gradable photographs, ungradable when it has "
        f"none. Per patient ({esc(pm['rule'])} rule): {esc(pm['rule_text'])}. A patient is "
        "referable when any of their images is labelled referable. Sensitivity and "
        "specificity are on the patients with an answer, as in the IDx-DR and EyeArt pivotal "
        "trials; <strong>imageability</strong> (patients with an answer): "
        f"{_num(pm.get('imageability'))} {_ci(pm.get('imageability_ci'))} at "
        f"{esc(str(pm.get('headline_operating_point')))}. {esc(pm['intervals'])}.</p>"
    )  # fmt: skip
    header = [
        "point", "threshold", "image sensitivity", "patient sensitivity", "image specificity",
        "patient specificity", "insufficient quality (share)",
    ]  # fmt: skip
    return head + text + _table("tbl-patients", header, _patient_rows(m, pm)) + "</section>"


def _quality_section(quality: Mapping[str, Any] | None, m: Mapping[str, Any]) -> str:
    head = '<section id="sec-quality"><h2>Image quality</h2>'
    if not quality:
        return (
            head + '<p class="missing">Image quality was not assessed in this evaluation; every '
            "image was graded as given.</p></section>"
        )
    n, bad = int(quality.get("n", m["n"])), int(quality.get("n_ungradable", 0))
    parts = [
        head,
        f"<p><strong>{bad} of {n}</strong> images ({(bad / n if n else 0):.1%}) were judged "
        "ungradable. A screening programme re-images them or refers the patient for an "
        "examination in person. The headline metrics above include them; the table compares "
        "all images with the gradable ones."
        + (
            f" Judged on {html.escape(str(quality['judged_on']))}."
            if quality.get("judged_on")
            else ""
        )
        + "</p>",
    ]
    reasons = quality.get("reasons") or {}
    if reasons:
        parts.append(
            _table("tbl-quality-reasons", ["reason", "images"], list(map(list, reasons.items())))
        )
    gradable = quality.get("gradable_metrics")
    if gradable:
        parts.append(
            _table(
                "tbl-quality-metrics",
                ["metric", "all images [95% CI]", "gradable images [95% CI]"],
                _headline_rows({"all": m, "gradable": gradable}),
            )
        )
    return "".join(parts) + "</section>"


def _shift_section(shift: Mapping[str, Any] | None) -> str:
    head = '<section id="sec-shift"><h2>Site shift</h2>'
    if not shift:
        return (
            head + '<p class="missing">No site-shift score was computed for this data.</p>'
            "</section>"
        )
    message = html.escape(str(shift.get("message", "")))
    cls = "warn" if shift.get("warning") else "muted"
    rows = [
        [k.replace("_", " "), _num(v) if isinstance(v, float) else str(v)]
        for k, v in shift.items()
        if k not in ("message", "warning", "batch")
    ]
    batch = shift.get("batch")  # the whole set tested against validation (BatchShiftTest)
    if batch:
        batch_cls = "warn" if batch["shifted"] else "muted"
        message += f'</p><p class="{batch_cls}">{html.escape(batch["message"])}'
    return (
        head
        + f'<p class="{cls}">{message}</p>'
        + (_table("tbl-shift", ["measure", "value"], rows) if rows else "")
        + "</section>"
    )


# ---------------------------------------------------------------- documents


def _html(
    title: str,
    splits: Mapping[str, Mapping[str, Any]],
    main: str,
    config: Mapping[str, Any],
    counts: Mapping[str, Any],
    figs: Mapping[str, str],
    synthetic: bool,
    extra: Mapping[str, Any],
) -> str:
    m = splits[main]
    esc = html.escape
    names = _names(m)
    pred = m.get("prediction") or {"method": "argmax"}
    grades = ", ".join(f"{k} = {n}" for k, n in enumerate(names))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>",
        '<section id="sec-header">',
        _facts("tbl-header", _header(extra.get("header"), m, main)),
        f'<p class="muted">Grades: {esc(grades)}. Grade = '
        f"{esc(decoding_rule(pred, names))}.</p></section>",
        _synthetic_banner(synthetic),
        *_metrics_section(splits, main),
        _patients_section(m),
        _sites_section(extra.get("sites")),
        _quality_section(extra.get("quality"), m),
        _shift_section(extra.get("site_shift")),
        *_data_sections(m, counts, figs),
        '<section id="sec-config"><h2>Configuration</h2>',
        "<details><summary>Training settings (config.yaml)</summary>",
        f"<pre>{esc(_config_yaml(config))}</pre></details></section>",
        '<p class="muted">Research and decision-support use only; not a standalone diagnostic. '
        "See MODEL_CARD.md.</p>",
        "</body></html>",
    ]
    return "\n".join(p for p in parts if p) + "\n"


def _config_yaml(config: Mapping[str, Any]) -> str:
    """The training settings as YAML (``{}`` when there are none)."""
    return yaml.safe_dump(_plain(config), sort_keys=False, allow_unicode=True) if config else "{}"


def _metrics_section(splits: Mapping[str, Mapping[str, Any]], main: str) -> list[str]:
    """The headline metrics of every split, how their intervals were made, the operating points
    and the notes (lines of ``report.html``; empty strings are dropped)."""
    m = splits[main]
    esc = html.escape
    notes = "".join(
        f"<li>{esc(n)}</li>" for n in [*(m.get("warnings") or []), *(m.get("notes") or [])]
    )
    return [
        '<section id="sec-metrics"><h2>Headline metrics</h2>',
        _table(
            "tbl-metrics", ["metric", *(f"{s} [95% CI]" for s in splits)], _headline_rows(splits)
        ),
        f'<p class="muted">Sensitivity, specificity and AUC are for the {esc(m["positive"])}.</p>'
        if m.get("positive")
        else "",
        f'<p class="muted">{esc(_bootstrap_words(m))}{esc(_optimistic_note(splits))}</p>',
        f'<p class="warn" id="small-n-note">{esc(_small_n_note(splits))}</p>'
        if _small_n_note(splits)
        else "",
        _operating_points_html(m, main),
        f"<ul>{notes}</ul>" if notes else "",
        "</section>",
    ]


def _bootstrap_words(m: Mapping[str, Any]) -> str:
    """How the intervals of ``m`` were made and what the bootstrap held fixed, in one sentence."""
    boot = m.get("bootstrap") or {}
    if not boot:
        return "No intervals (n_boot = 0)."
    return (
        f"95% intervals: {_interval_words(m)}; bootstrap: {boot.get('n_boot')} resamples of "
        f"{boot.get('n_units')} {boot.get('unit')}s (seed {boot.get('seed')}); "
        "operating-point thresholds and decoding held fixed."
    )


def _operating_points_html(m: Mapping[str, Any], main: str) -> str:
    """The operating-point table with where its thresholds come from ('' without points)."""
    if not m.get("operating_points"):
        return ""
    esc = html.escape
    return (
        f"<h3>Operating points: {esc(m['binary_task']['name'])}</h3>"
        f"<p>Thresholds on {esc(_score_in_words(m))} were chosen on "
        f"<strong>{esc(str(m.get('thresholds_from')))}</strong> and applied unchanged to the "
        f"{esc(main)} data; a case is positive when its score is at or above the threshold. "
        "The headline sensitivity/specificity use the Youden point; <code>medtune predict"
        "</code> refers at the 90% sensitivity point unless told otherwise.</p>"
        + _table("tbl-operating-points", _OP_HEADER, _op_rows(m))
        + _referred_html(m)
    )


def _referred_html(m: Mapping[str, Any]) -> str:
    """Which grades each point refers ('' for a two-class task)."""
    rows = _referred_rows(m)
    if not rows:
        return ""
    return (
        "<h3>Referred at each operating point, by grade</h3><p>The share of each true grade's "
        "images at or above the threshold, with its 95% interval: in the positive grades the "
        "sensitivity per grade (a missed severe eye costs more than a missed moderate one), in "
        "the negative grades the false-referral rate.</p>"
        + _table("tbl-referred-by-grade", _referred_header(m), rows)
    )


#: The figure sections after the data tables: (section id, title, figure id).
_FIGURE_SECTIONS = (
    ("sec-roc", "ROC", "fig-roc"),
    ("sec-confusion", "Confusion matrix", "fig-confusion"),
    ("sec-calibration", "Calibration", "fig-reliability"),
    ("sec-curves", "Training curves", "fig-curves"),
    ("sec-gradcam", "Grad-CAM examples", "fig-gradcam"),
)


def _data_sections(
    m: Mapping[str, Any], counts: Mapping[str, Any], figs: Mapping[str, str]
) -> list[str]:
    """The data summary, the per-grade table and the figures (lines of ``report.html``)."""
    names = _names(m)
    parts = [
        '<section id="sec-data"><h2>Data summary and grade balance</h2>',
        _table(
            "tbl-class-counts",
            ["split", *names, "total"],
            [
                [s, *(d.get(c, 0) for c in m["class_names"]), sum(d.values())]
                for s, d in counts.items()
                if isinstance(d, Mapping)
            ],
        ),
        figs["fig-class-balance"],
        "</section>",
        '<section id="sec-per-class"><h2>Per grade</h2>',
        _table(
            "tbl-per-class",
            ["grade", "precision", "recall (sensitivity)", "F1", "images", "AUC (vs rest)"],
            _per_class_rows(m),
        ),
        "</section>",
    ]
    for sec_id, heading, fig_id in _FIGURE_SECTIONS:
        parts += [f'<section id="{sec_id}"><h2>{heading}</h2>', figs[fig_id], "</section>"]
    return parts


def _interval_words(m: Mapping[str, Any]) -> str:
    """How the intervals of ``m`` were made, in words (from its ``intervals`` key)."""
    info = m.get("intervals")
    if not info:
        grouped = (m.get("bootstrap") or {}).get("unit") == "group"
        return "bootstrap percentile" + (" (resampling patients/groups)" if grouped else "")
    return f"{info['proportions']} for proportions, {info['other']} for the rest"


def _md_table(header: Sequence[Any], rows: Sequence[Sequence[Any]]) -> str:
    """A markdown table (no trailing newline): header, separator, one line per row."""
    lines = ["| " + " | ".join(map(str, header)) + " |", "|---" * len(header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(map(str, r)) + " |" for r in rows])


def _md_metrics(splits: Mapping[str, Mapping[str, Any]]) -> str:
    header = ["metric", *(f"{s} [95% CI]" for s in splits)]
    note = _small_n_note(splits).strip()
    return _md_table(header, _headline_rows(splits)) + (f"\n\n{note}" if note else "")


def _md_ops(m: Mapping[str, Any], main: str) -> str:
    rows = _op_rows(m)
    if not rows:
        return ""
    return (
        f"\nOperating points for {m['binary_task']['name']}: thresholds chosen on "
        f"{m.get('thresholds_from')}, applied unchanged to {main}.\n\n"
        + _md_table(_OP_HEADER, rows)
        + "\n"
        + _md_referred(m)
    )


def _md_referred(m: Mapping[str, Any]) -> str:
    rows = _referred_rows(m)
    if not rows:
        return ""
    return (
        "\nReferred at each point, by true grade (share [95% CI] (referred/images)):\n\n"
        + _md_table(_referred_header(m), rows)
        + "\n"
    )


_SYNTHETIC_MD = (
    "> **Warning: synthetic data.** These results come from generated images, not patients. "
    "They test the pipeline and say nothing about clinical performance.\n"
)


def _summary_md(
    title: str, splits: Mapping[str, Mapping[str, Any]], main: str, synthetic: bool
) -> str:
    m = splits[main]
    notes = "".join(f"- {n}\n" for n in [*(m.get("warnings") or []), *(m.get("notes") or [])])
    return (
        f"# {title}\n\n"
        + (_SYNTHETIC_MD + "\n" if synthetic else "")
        + f"Evaluated split: **{main}** ({m['n']} images, {m['n_classes']} classes). "
        f"Intervals: 95% {_interval_words(m)}.\n\n"
        + _md_metrics(splits)
        + "\n"
        + _optimistic_note(splits).strip()
        + "\n"
        + _md_ops(m, main)
        + (f"\nNotes:\n\n{notes}" if notes else "")
        + "\nFull report with figures: `report.html`; model card: `MODEL_CARD.md`.\n"
    )


def _model_card(
    title: str,
    splits: Mapping[str, Mapping[str, Any]],
    main: str,
    config: Mapping[str, Any],
    counts: Mapping[str, Any],
    model_info: Mapping[str, Any] | None,
    synthetic: bool,
) -> str:
    m = splits[main]
    details = dict(_plain(model_info or {}))
    details.setdefault("classes", ", ".join(m["class_names"]))
    details.setdefault("prediction rule", json.dumps(m.get("prediction") or {"method": "argmax"}))
    for key in ("model", "backbone", "scenario", "image_size", "weights", "epochs", "seed"):
        if key in config and key not in details:
            details[key] = _plain(config[key])
    detail_md = "\n".join(f"- **{k}**: {v}" for k, v in details.items())
    count_md = "\n".join(
        f"- {s}: " + ", ".join(f"{c}: {n}" for c, n in d.items())
        for s, d in counts.items()
        if isinstance(d, Mapping)
    )
    dr = m.get("task") == "dr_grading"
    use_dr = " grading diabetic retinopathy" if dr else ""
    referable = (
        "Referable DR means grade >= 2 (moderate non-proliferative DR or worse; "
        "Gulshan et al., JAMA 2016)."
        if dr
        else ""
    )
    return f"""# Model card: {title}

{_SYNTHETIC_MD if synthetic else ""}
## Model details

Transfer-learned ImageNet-pretrained CNN built with medtune.

{detail_md}

## Intended use

- Research, and decision support for trained clinicians{use_dr}.
- **Not a standalone diagnostic.** Outputs must be reviewed by a qualified professional; the
  model must not decide referral or treatment on its own.
- Out of scope: populations, cameras, or image types unlike the training data; paediatric use;
  any use without local validation.

## Data

Images per class and split:

{count_md}

## Metrics

{_md_metrics(splits)}
{_md_ops(m, main)}
Intervals are 95% intervals: {_interval_words(m)};
operating-point thresholds were chosen on {m.get("thresholds_from") or "n/a"} and held fixed.
{referable}

## Limitations and risks

- **Dataset shift**: performance will differ on other clinics, cameras, imaging protocols,
  compression and image quality; validate locally before any use.
- **Camera and acquisition**: fundus cameras, fields of view, pupil dilation and illumination
  change the image statistics the model relies on.
- **Population**: prevalence, ethnicity (fundus pigmentation), age and comorbidities in the
  evaluation data may not match the target population; PPV/NPV depend on prevalence.
- **Labels**: grades from human graders are noisy; inter-grader disagreement bounds achievable
  agreement. Ungradable images are not modelled.
- **Calibration**: probabilities are calibrated (temperature scaling) on validation data only;
  re-check calibration after any shift.
- **Explanations**: Grad-CAM maps are coarse and can look plausible while the model is wrong.
"""


# ---------------------------------------------------------------- entry point


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    metrics: Mapping[str, Any],
    config: Mapping[str, Any],
    y_true: Sequence[int] | np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    class_counts: Mapping[str, Any] | None = None,
    curves_csv: str | os.PathLike[str] | None = None,
    gradcam_examples: Sequence[plots.GradcamExample] | None = None,
    title: str = "medtune evaluation report",
    synthetic: bool = False,
    split: str = "test",
    model_info: Mapping[str, Any] | None = None,
    header: Mapping[str, Any] | None = None,
    sites: Mapping[str, Mapping[str, Any]] | None = None,
    quality: Mapping[str, Any] | None = None,
    site_shift: Mapping[str, Any] | None = None,
    curves_note: str | None = None,
) -> Path:
    """Write ``report.html``, ``summary.md`` and ``MODEL_CARD.md`` into ``out_dir``.

    ``report.html`` reads top-down for a clinician: header facts, headline metrics and operating
    points, per-site figures, image quality, site shift, then the data, per-grade tables,
    figures, and the configuration folded away at the end (:data:`SECTION_IDS`). Grades are
    named throughout (:attr:`medtune.evaluation.labels.LabelSpace.grade_names`).

    Parameters
    ----------
    out_dir : path-like
        Output folder.
    metrics : mapping
        A :func:`compute_metrics` dict for the split ``y_true``/``probs`` come from, or
        ``{split_name: compute_metrics dict}`` (all splits are tabulated; figures use ``split``).
    config : mapping
        The training settings (shown folded at the end).
    y_true : array of int, shape (N,)
        True grades.
    probs : ndarray, shape (N, K)
        Calibrated probabilities.
    class_names : sequence of str
        Class names in logit order (shown as grade names).
    class_counts : mapping, optional
        ``{class: n}`` or ``{split: {class: n}}`` (default: counts of ``y_true``).
    curves_csv : path-like, optional
        A Lightning ``metrics.csv``.
    gradcam_examples : sequence of GradcamExample, optional
        Image, Grad-CAM map and caption of each example.
    title : str, default "medtune evaluation report"
    synthetic : bool, default False
        Adds a synthetic-data warning everywhere.
    split : str, default "test"
    model_info : mapping, optional
        Extra model-card facts (e.g. backbone, weights, temperature).
    header : mapping, optional
        Facts for the header table, e.g. ``{"Model": ..., "Training data": ...,
        "Evaluated data": ...}`` (date and medtune version are added).
    sites : mapping, optional
        ``{site: compute_metrics dict}``; a per-site table when given.
    quality : mapping, optional
        ``{"n", "n_ungradable", "reasons": {reason: n}, "gradable_metrics": compute_metrics
        dict}``: the share ungradable and the metrics on gradable images beside all images.
    site_shift : mapping, optional
        :func:`medtune.evaluation.shift.shift_summary`-style ``{"message", "warning", ...}``.
    curves_note : str, optional
        Why there are no training curves (e.g. a linear probe has no epochs).

    Returns
    -------
    pathlib.Path
        The path of ``report.html``.
    """
    out = Path(out_dir)
    y = np.asarray(y_true).astype(np.int64).ravel()
    probs = np.asarray(probs, dtype=np.float64)
    class_names = [str(c) for c in class_names]
    splits, main = _splits(metrics, split)
    counts = _class_counts(class_counts, y, class_names, main)
    shown = _names(splits[main])
    figs = _figures(
        splits[main],
        y,
        probs,
        shown,
        _named_counts(counts, class_names, shown),
        curves_csv,
        gradcam_examples,
        curves_note,
    )
    extra = {"header": header, "sites": sites, "quality": quality, "site_shift": site_shift}
    report = out / "report.html"
    io.write_text(report, _html(title, splits, main, config, counts, figs, synthetic, extra))
    io.write_text(out / "summary.md", _summary_md(title, splits, main, synthetic))
    io.write_text(
        out / "MODEL_CARD.md",
        _model_card(title, splits, main, config, counts, model_info, synthetic),
    )
    return report
