"""Clinical metrics with bootstrap confidence intervals and validation-chosen operating points.

Every key of the returned dictionary is documented in ``docs/metrics.md``. Summary:

* Predictions are the argmax of ``probs`` or, when ``decoding`` is given, :func:`ordinal.decode`.
* Ordinal labels (class names are consecutive integers, or ``ordinal=True``) get QWK.
* DR grading (5 ordinal classes): referable DR = grade >= 2 (Gulshan et al., JAMA 2016), scored
  by ``P(grade >= 2) = probs[:, 2:].sum(1)``. Binary tasks (2 classes) use ``probs[:, 1]``.
  Operating points (>=90% sensitivity, >=97.5% sensitivity, Youden's J) are chosen on the
  VALIDATION scores given as ``val`` and applied unchanged here; the headline sensitivity and
  specificity are at the Youden point.
* Intervals (95%): proportions (accuracy, sensitivity, specificity, PPV, NPV) get Wilson score
  intervals, which stay valid at 0 and 1 where a percentile bootstrap collapses; with ``groups``
  they use the effective sample size of the clustered data. Other figures (balanced accuracy,
  AUC, QWK) get percentile bootstrap intervals; with ``groups`` whole groups (patients) are
  resampled (cluster bootstrap). A bootstrap interval of zero width is not reported as one.
  Thresholds and decoding stay fixed. Every figure records how many cases it rests on
  (``<key>_n``) and ``warnings`` names the figures resting on fewer than ``SMALL_N`` cases.

Operating points live in :mod:`medtune.evaluation.operating_points`, the intervals in
:mod:`medtune.evaluation.intervals`; this module measures and assembles the figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

from medtune.errors import MedtuneError
from medtune.evaluation.calibration import expected_calibration_error
from medtune.evaluation.decoding import decode
from medtune.evaluation.intervals import (
    LEVEL,
    Stat,
    WeightedAUC,
    bootstrap_cis,
    operating_point_cis,
    proportion_ci,
    zero_width_fallbacks,
)
from medtune.evaluation.labels import BinaryTask, LabelSpace
from medtune.evaluation.operating_points import apply_operating_point, choose_operating_points
from medtune.evaluation.scores import (
    balanced_accuracy,
    balanced_accuracy_from_confusion,
    finite_or_none,
    qwk,
    qwk_from_confusion,
)

if TYPE_CHECKING:
    from medtune.data import Part

__all__ = [
    "HEADLINE",
    "HEADLINE_METRICS",
    "HeadlineMetric",
    "compute_metrics",
    "per_site_metrics",
    "quick_metrics",
    "referred_by_class",
]

HEADLINE_POINT = "youden"


@dataclass(frozen=True)
class HeadlineMetric:
    """One headline figure: its ``metrics.json`` key, its label in the report, its short label
    in the terminal table, and whether the terminal table shows it."""

    key: str
    label: str
    short: str
    terminal: bool = True


#: The headline figures, in the order every table shows them (one list for the report, the
#: terminal table and ``metrics.json``'s intervals).
HEADLINE_METRICS = (
    HeadlineMetric("accuracy", "Accuracy", "accuracy"),
    HeadlineMetric("balanced_accuracy", "Balanced accuracy", "balanced acc."),
    HeadlineMetric("macro_f1", "Macro F1", "macro F1", terminal=False),
    HeadlineMetric("qwk", "Quadratic weighted kappa", "quadratic kappa"),
    HeadlineMetric("macro_auc", "Macro one-vs-rest AUC", "macro AUC"),
    HeadlineMetric("auc", "AUC (positive class)", "AUC"),
    HeadlineMetric("sensitivity", "Sensitivity (Youden point)", "sensitivity"),
    HeadlineMetric("specificity", "Specificity (Youden point)", "specificity"),
    HeadlineMetric("referable_auc", "Referable DR AUC", "referable AUC"),
    HeadlineMetric(
        "referable_sensitivity", "Referable DR sensitivity (Youden point)", "referable sens."
    ),
    HeadlineMetric(
        "referable_specificity", "Referable DR specificity (Youden point)", "referable spec."
    ),
    HeadlineMetric("ece", "Expected calibration error (15 bins)", "ECE", terminal=False),
)
#: Keys of the headline figures that carry a 95% interval (``<key>_ci``).
HEADLINE = tuple(m.key for m in HEADLINE_METRICS if m.key not in ("macro_f1", "ece"))
SAME_DATA = "same data (optimistic)"
SMALL_N = 30  # a figure resting on fewer cases than this is flagged in ``warnings``


# ---------------------------------------------------------------- point metrics


def _class_aucs(y: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """One-vs-rest AUC per class; NaN where the class is absent (or is every sample)."""
    out = np.full(probs.shape[1], np.nan)
    for k in range(probs.shape[1]):
        yk = (y == k).astype(np.int64)
        if 0 < yk.sum() < len(yk):
            out[k] = roc_auc_score(yk, probs[:, k])
    return out


def _binary_auc(y_bin: np.ndarray, score: np.ndarray) -> float:
    if 0 < y_bin.sum() < len(y_bin):
        return float(roc_auc_score(y_bin, score))
    return float("nan")


def _nanmean(a: np.ndarray) -> float:
    return float(np.mean(a[np.isfinite(a)])) if np.isfinite(a).any() else float("nan")


def _point_estimates(
    y: np.ndarray, p: np.ndarray, pred: np.ndarray, K: int, ordinal: bool, task: BinaryTask | None
) -> dict[str, float]:
    """Point estimates with scikit-learn (the reference implementations)."""
    out = {
        "accuracy": float(accuracy_score(y, pred)),
        "balanced_accuracy": balanced_accuracy(y, pred, K),
        "macro_auc": _nanmean(_class_aucs(y, p)),
    }
    if ordinal:
        out["qwk"] = qwk(y, pred, K)
    if task is not None:
        out[f"{task.prefix}auc"] = _binary_auc(task.labels(y), task.score(p))
    return out


def _weighted_statistics(
    y: np.ndarray,
    p: np.ndarray,
    K: int,
    ordinal: bool,
    task: BinaryTask | None,
) -> dict[str, Stat]:
    """Weighted statistic functions for every figure that gets a bootstrap interval (the
    proportions get Wilson intervals instead, see :func:`proportion_ci`)."""
    class_aucs = [WeightedAUC(y == k, p[:, k]) for k in range(K)]
    stats: dict[str, Stat] = {
        "balanced_accuracy": lambda w, cm: balanced_accuracy_from_confusion(cm),
        "macro_auc": lambda w, cm: _nanmean(np.array([a(w) for a in class_aucs])),
    }
    if ordinal:
        stats["qwk"] = lambda w, cm: qwk_from_confusion(cm)
    if task is not None:
        y_bin, score = task.labels(y).astype(np.float64), task.score(p)
        binary_auc = WeightedAUC(y_bin, score)
        stats[f"{task.prefix}auc"] = lambda w, cm: binary_auc(w)
    return stats


# ---------------------------------------------------------------- entry point


def quick_metrics(y_true: Any, probs: Any, *, ordinal: bool = False) -> dict[str, float]:
    """Cheap per-epoch validation figures (argmax, no intervals): ``accuracy``,
    ``balanced_accuracy``, ``macro_auc`` and, when ``ordinal``, ``qwk``; NaN when undefined."""
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    return _point_estimates(y, p, p.argmax(axis=1), p.shape[1], bool(ordinal), None)


def _as_inputs(y_true: Any, probs: Any, K: int, what: str) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true).astype(np.int64).ravel()
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape != (len(y), K):
        raise ValueError(f"{what}: probs must have shape ({len(y)}, {K}), got {p.shape}")
    if len(y) and (y.min() < 0 or y.max() >= K):
        raise ValueError(f"{what}: labels must lie in [0, {K}), got {y.min()}..{y.max()}")
    if not np.all(np.isfinite(p)) or (len(y) and np.abs(p.sum(axis=1) - 1.0).max() > 1e-3):
        raise ValueError(f"{what}: probs must be finite probabilities summing to 1 (not logits)")
    return y, p


def compute_metrics(
    y_true: Any,
    probs: Any,
    labels: LabelSpace | Sequence[Any],
    *,
    groups: Sequence[Any] | None = None,
    val: tuple[Any, Any] | None = None,
    decoding: dict[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    val_sites: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """All evaluation metrics of ``probs`` (N, K) against ``y_true``; see ``docs/metrics.md``.

    ``labels`` is the model's :class:`~medtune.evaluation.labels.LabelSpace` (graded or not, the
    positive class of a two-class task), or bare class names, read with its defaults
    (:meth:`LabelSpace.of`).

    ``val=(y_val, probs_val)`` supplies the data on which operating-point thresholds are chosen
    (without it they are chosen on this data and flagged optimistic). ``groups`` (one id per image,
    e.g. patient) switches the bootstrap to resampling whole groups. ``val_sites`` (the site of
    each image thresholds are chosen on) makes the sensitivity points hold at the worst
    validation site (:func:`choose_operating_points`). JSON-serialisable output.
    """
    space = labels if isinstance(labels, LabelSpace) else LabelSpace.of(labels)
    class_names = list(space.class_names)
    K = len(class_names)
    y, p = _as_inputs(y_true, probs, K, "compute_metrics")
    if len(y) == 0:
        raise ValueError("compute_metrics: no samples")
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries for {len(y)} samples")
    pred = np.asarray(decode(p, decoding)).astype(np.int64)
    task = space.binary_task
    points, thresholds_from, notes = _chosen_points(task, y, p, val, val_sites)
    point = _point_estimates(y, p, pred, K, space.ordinal, task)
    aucs = _class_aucs(y, p)
    notes += _undefined_auc_notes(aucs, class_names)
    g = None if groups is None else np.asarray([str(x) for x in groups])
    cis: dict[str, list[float] | None] = {}
    boot_info = intervals = None
    warn: list[str] = []
    if n_boot > 0:
        stats = _weighted_statistics(y, p, K, space.ordinal, task)
        cis, boot_info = bootstrap_cis(stats, y * K + pred, K, groups, n_boot, seed)
        warn += zero_width_fallbacks(cis, point, y, pred, g)
        cis.update(_proportion_cis(y, p, pred, task, points, g))
        intervals = _interval_info(g)
    counts = _case_counts(y, K, space.ordinal, task, bool(points))
    out: dict[str, Any] = {
        **_description(y, space, decoding),
        **_headline_figures(y, pred, K, point, cis, counts),
        "ece": finite_or_none(expected_calibration_error(p, y)),
        "per_class": _per_class(y, pred, aucs, class_names),
        "confusion_matrix": confusion_matrix(y, pred, labels=np.arange(K)).tolist(),
    }
    out.update(_binary_block(task, y, p, point, cis, points, thresholds_from, counts))
    if task is not None and K > 2:
        score = task.score(p)
        for d in (out["operating_points"] or {}).values():
            d["referred_by_class"] = referred_by_class(y, score, d["threshold"], class_names, g)
    out["bootstrap"] = boot_info
    out["intervals"] = intervals
    out["notes"] = notes
    out["warnings"] = warn + _small_n_warnings(out, g)
    return out


def _chosen_points(
    task: BinaryTask | None,
    y: np.ndarray,
    p: np.ndarray,
    val: tuple[Any, Any] | None,
    val_sites: Sequence[Any] | None,
) -> tuple[dict[str, dict[str, Any]], str | None, list[str]]:
    """Operating points chosen on validation (or, flagged, on the evaluated data), applied
    unchanged: ``(points, thresholds_from, notes)``."""
    notes: list[str] = []
    if task is None:
        return {}, None, notes
    if val is not None:
        yv, pv = _as_inputs(val[0], val[1], p.shape[1], "compute_metrics(val=...)")
        thresholds_from = "validation"
    else:
        yv, pv = y, p
        thresholds_from = SAME_DATA
        notes.append("no validation data given: thresholds chosen on the evaluated data")
    points = choose_operating_points(task.labels(yv), task.score(pv), val_sites)
    if val is not None and any("worst_site" in d for d in points.values()):
        thresholds_from += ", sensitivity held at every validation site (worst-site rule)"
    if not points:
        notes.append(f"{task.name}: threshold data lack positives or negatives; no points")
    return points, thresholds_from, notes


def referred_by_class(
    y: np.ndarray,
    score: np.ndarray,
    threshold: float,
    class_names: Sequence[str],
    groups: np.ndarray | None = None,
) -> dict[str, dict[str, Any]]:
    """Share of each true class's images referred (``score >= threshold``) at one point.

    Sensitivity pools the positive grades; screening studies also report it per grade, since a
    missed proliferative eye costs more than a missed moderate one (e.g. Gulshan et al., JAMA
    2016, give sensitivity for referable and for severe-or-worse DR separately). Among the
    negative grades the share is the false-referral rate of that grade.

    Parameters
    ----------
    y : ndarray of int, shape (N,)
        True class index per image.
    score : ndarray of float, shape (N,)
        The binary task's score (e.g. P(referable)) per image.
    threshold : float
        The operating point's cut-off.
    class_names : sequence of str, length K
        Names of the classes, in index order.
    groups : ndarray, shape (N,), optional
        Patient (group) id per image: the intervals then use the cluster design effect.

    Returns
    -------
    dict
        ``{name: {"n", "referred", "share", "share_ci"}}`` per class; ``share`` and its Wilson
        interval (:func:`~medtune.evaluation.intervals.proportion_ci`) are None for a class
        without images.
    """
    hit = np.asarray(score) >= threshold
    out: dict[str, dict[str, Any]] = {}
    for k, name in enumerate(class_names):
        mask = y == k
        n, referred = int(mask.sum()), int(hit[mask].sum())
        out[str(name)] = {
            "n": n,
            "referred": referred,
            "share": referred / n if n else None,
            "share_ci": proportion_ci(hit[mask], None if groups is None else groups[mask]),
        }
    return out


def _undefined_auc_notes(aucs: np.ndarray, class_names: list[str]) -> list[str]:
    """A note naming the classes whose one-vs-rest AUC is undefined (none when all are)."""
    missing = [class_names[k] for k in range(len(class_names)) if not np.isfinite(aucs[k])]
    if not missing:
        return []
    return [
        f"one-vs-rest AUC undefined for classes {missing} (absent or the only class); "
        f"macro_auc averages the other {len(class_names) - len(missing)} classes"
    ]


def _description(
    y: np.ndarray, space: LabelSpace, decoding: dict[str, Any] | None
) -> dict[str, Any]:
    """The keys that say what was measured: counts, classes, task and prediction rule."""
    class_names = list(space.class_names)
    task = space.binary_task
    return {
        "n": int(len(y)),
        "n_classes": len(class_names),
        "class_names": class_names,
        # classes of the model with no image here: their recall/AUC are undefined, not zero
        "classes_absent": [c for k, c in enumerate(class_names) if not np.any(y == k)],
        "ordinal": space.ordinal,
        "task": "dr_grading" if task and task.prefix else ("binary" if task else "multiclass"),
        # what the headline sensitivity, specificity and AUC are computed for
        "positive": None if task is None else task.name,
        "prediction": dict(decoding) if decoding else {"method": "argmax"},
    }


def _headline_figures(
    y: np.ndarray,
    pred: np.ndarray,
    K: int,
    point: dict[str, float],
    cis: dict[str, list[float] | None],
    counts: dict[str, int | None],
) -> dict[str, Any]:
    """The multiclass headline figures, each with its interval and case count."""
    out: dict[str, Any] = {}
    for key in ("accuracy", "balanced_accuracy"):
        out.update(_figure(key, point[key], cis, counts))
    out["macro_f1"] = finite_or_none(
        f1_score(y, pred, labels=np.arange(K), average="macro", zero_division=0)
    )
    out.update(_figure("qwk", point.get("qwk"), cis, counts))
    out.update(_figure("macro_auc", point["macro_auc"], cis, counts))
    return out


def _figure(
    key: str,
    value: float | None,
    cis: dict[str, list[float] | None],
    counts: dict[str, int | None],
) -> dict[str, Any]:
    """``key``, ``key_ci`` and ``key_n`` of one figure."""
    return {key: finite_or_none(value), f"{key}_ci": cis.get(key), f"{key}_n": counts[key]}


def _per_class(
    y: np.ndarray, pred: np.ndarray, aucs: np.ndarray, class_names: list[str]
) -> dict[str, dict[str, Any]]:
    """Precision, recall, F1, support and one-vs-rest AUC of each class."""
    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=np.arange(len(class_names)), zero_division=0
    )
    return {
        name: {
            "precision": float(prec[k]),
            "recall": float(rec[k]),
            "f1": float(f1[k]),
            "support": int(support[k]),
            "auc": finite_or_none(aucs[k]),
        }
        for k, name in enumerate(class_names)
    }


def _interval_info(groups: np.ndarray | None) -> dict[str, Any]:
    """How the intervals were made (the ``intervals`` key of the output)."""
    proportions = (
        "Wilson score"
        if groups is None
        else "Wilson score on the effective sample size (cluster design effect)"
    )
    return {
        "level": LEVEL,
        "proportions": proportions,
        "proportion_keys": ["accuracy", "sensitivity", "specificity", "ppv", "npv"],
        "other": "percentile bootstrap" + ("" if groups is None else " resampling groups"),
        "small_n": SMALL_N,
    }


def _proportion_cis(
    y: np.ndarray,
    p: np.ndarray,
    pred: np.ndarray,
    task: BinaryTask | None,
    points: dict[str, dict[str, Any]],
    groups: np.ndarray | None,
) -> dict[str, list[float] | None]:
    """Wilson intervals of accuracy and of sensitivity, specificity, PPV and NPV at each point."""
    cis = {"accuracy": proportion_ci(y == pred, groups)}
    if task is None:
        return cis
    cis.update(operating_point_cis(task.labels(y) == 1, task.score(p), points, groups))
    return cis


def _case_counts(
    y: np.ndarray, K: int, ordinal: bool, task: BinaryTask | None, has_points: bool
) -> dict[str, int | None]:
    """How many cases each headline figure rests on (its ``<key>_n``).

    Accuracy and QWK: all images. Balanced accuracy: the smallest class present (its recall is
    the least certain term). AUCs: the smaller of positives and negatives (macro: over the
    classes that have an AUC). Sensitivity: positives; specificity: negatives.
    """
    n = len(y)
    support = np.bincount(y, minlength=K)
    present = support[support > 0]
    both = [min(int(c), n - int(c)) for c in support if 0 < c < n]
    out: dict[str, int | None] = {
        "accuracy": n,
        "balanced_accuracy": int(present.min()) if present.size else None,
        "qwk": n if ordinal else None,
        "macro_auc": min(both) if both else None,
    }
    if task is not None:
        n_pos = int(task.labels(y).sum())
        out[f"{task.prefix}auc"] = min(n_pos, n - n_pos) if 0 < n_pos < n else None
        out[f"{task.prefix}sensitivity"] = n_pos if has_points else None
        out[f"{task.prefix}specificity"] = n - n_pos if has_points else None
    return out


def _small_n_warnings(m: dict[str, Any], groups: np.ndarray | None) -> list[str]:
    """One warning per reported headline figure resting on fewer than ``SMALL_N`` cases."""
    out = []
    for key in HEADLINE:
        n = m.get(f"{key}_n")
        if m.get(key) is None or n is None or n >= SMALL_N:
            continue
        grouped = " (fewer independent patients)" if groups is not None else ""
        out.append(
            f"{key} rests on {n} cases{grouped}, fewer than {SMALL_N}: the figure is unstable; "
            "read it with its interval"
        )
    return out


def _binary_block(
    task: BinaryTask | None,
    y: np.ndarray,
    p: np.ndarray,
    point: dict[str, float],
    cis: dict[str, list[float] | None],
    points: dict[str, dict[str, Any]],
    thresholds_from: str | None,
    counts: dict[str, int | None],
) -> dict[str, Any]:
    """Keys of the binary / referable-DR view (all present; None when not applicable)."""
    out: dict[str, Any] = {}
    for pre in ("", "referable_"):
        for k in ("auc", "sensitivity", "specificity"):
            out[f"{pre}{k}"] = None
            out[f"{pre}{k}_ci"] = None
            out[f"{pre}{k}_n"] = None
    out["binary_task"] = None
    out["operating_points"] = None
    out["headline_operating_point"] = None
    out["thresholds_from"] = None
    if task is None:
        return out
    y_bin, score = task.labels(y), task.score(p)
    pre = task.prefix
    out["binary_task"] = {
        "name": task.name,
        "positive_class_indices": list(task.positive),
        "score": task.score_name,
        "prevalence": float(y_bin.mean()),
        "n_positive": int(y_bin.sum()),
    }
    out[f"{pre}auc"] = finite_or_none(point[f"{pre}auc"])
    out[f"{pre}auc_ci"] = cis.get(f"{pre}auc")
    out[f"{pre}auc_n"] = counts.get(f"{pre}auc")
    ops: dict[str, Any] = {}
    for op, d in points.items():
        applied = apply_operating_point(y_bin, score, d["threshold"])
        ops[op] = {
            "threshold": d["threshold"],
            **applied,
            "sensitivity_ci": cis.get(f"op:{op}:sensitivity"),
            "specificity_ci": cis.get(f"op:{op}:specificity"),
            "ppv_ci": cis.get(f"op:{op}:ppv"),
            "npv_ci": cis.get(f"op:{op}:npv"),
            "val_sensitivity": d["val_sensitivity"],
            "val_specificity": d["val_specificity"],
            "rule": d["rule"],
            "val_sites": d.get("sites"),
        }
        ops[op]["sensitivity"] = finite_or_none(ops[op]["sensitivity"])
        ops[op]["specificity"] = finite_or_none(ops[op]["specificity"])
    out["operating_points"] = ops
    out["thresholds_from"] = thresholds_from
    if HEADLINE_POINT in ops:
        h = ops[HEADLINE_POINT]
        out["headline_operating_point"] = HEADLINE_POINT
        for k in ("sensitivity", "specificity"):
            out[f"{pre}{k}"] = h[k]
            out[f"{pre}{k}_ci"] = h[f"{k}_ci"]
            out[f"{pre}{k}_n"] = counts.get(f"{pre}{k}")
    return out


def per_site_metrics(
    part: Part, probs: np.ndarray, **kwargs: Any
) -> dict[str, dict[str, Any]] | None:
    """:func:`compute_metrics` of every site's images (``None`` when the part has no sites).

    ``kwargs`` go to :func:`compute_metrics` unchanged (e.g. ``val=`` the POOLED validation
    labels and probabilities, so every site is scored at the same operating points).
    """
    sites = part.sites
    if sites is None:
        return None
    sites = np.asarray(sites, dtype=object)
    groups = part.groups
    out = {}
    for site in sorted(set(sites.tolist())):
        rows = np.flatnonzero(sites == site)
        try:
            out[site] = compute_metrics(
                part.labels[rows],
                probs[rows],
                groups=None if groups is None else [groups[i] for i in rows],
                **kwargs,
            )
        except (MedtuneError, ValueError) as err:
            out[site] = {"n": len(rows), "error": str(err)}
    return out
