"""Clinical metrics with bootstrap confidence intervals and validation-chosen operating points.

Every key of the returned dictionary is documented in ``docs/metrics.md``. Summary:

* Predictions are the argmax of ``probs`` or, when ``decoding`` is given, :func:`ordinal.decode`.
* Ordinal labels (class names are consecutive integers, or ``ordinal=True``) get QWK.
* DR grading (5 ordinal classes): referable DR = grade >= 2 (Gulshan et al., JAMA 2016), scored
  by ``P(grade >= 2) = probs[:, 2:].sum(1)``. Binary tasks (2 classes) use ``probs[:, 1]``.
  Operating points (>=90% sensitivity, >=97.5% sensitivity, Youden's J) are chosen on the
  VALIDATION scores given as ``val`` and applied unchanged here; the headline sensitivity and
  specificity are at the Youden point.
* Headline figures get 95% percentile bootstrap intervals; with ``groups`` whole groups
  (patients) are resampled (cluster bootstrap). Thresholds and decoding stay fixed.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from medtune.evaluation.calibration import expected_calibration_error
from medtune.evaluation.decoding import decode
from medtune.evaluation.grades import is_dr_grading, referral_classes, referral_name
from medtune.evaluation.scores import (
    balanced_accuracy,
    balanced_accuracy_from_confusion,
    qwk,
    qwk_from_confusion,
)

__all__ = [
    "BinaryTask",
    "HEADLINE",
    "HEADLINE_METRICS",
    "HeadlineMetric",
    "OPERATING_POINTS",
    "apply_operating_point",
    "binary_task",
    "bootstrap_weights",
    "choose_operating_points",
    "compute_metrics",
    "is_ordinal",
    "quick_metrics",
]

# name -> minimum validation sensitivity (None: Youden's J maximum)
OPERATING_POINTS: dict[str, float | None] = {"sens90": 0.90, "sens97.5": 0.975, "youden": None}
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
    HeadlineMetric("auc", "AUC (positive class)", "AUC", terminal=False),
    HeadlineMetric("sensitivity", "Sensitivity (Youden point)", "sens.", terminal=False),
    HeadlineMetric("specificity", "Specificity (Youden point)", "spec.", terminal=False),
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


@dataclass(frozen=True)
class BinaryTask:
    """A binary view of the labels: positives are ``positive`` class indices, the score is the
    summed probability of those classes. ``prefix`` is ``"referable_"`` for DR, ``""`` for K==2."""

    name: str
    positive: tuple[int, ...]
    prefix: str

    def labels(self, y: np.ndarray) -> np.ndarray:
        return np.isin(np.asarray(y), self.positive).astype(np.int64)

    def score(self, probs: np.ndarray) -> np.ndarray:
        return np.asarray(probs, dtype=np.float64)[:, list(self.positive)].sum(axis=1)


def is_ordinal(class_names: Sequence[Any]) -> bool:
    """Whether the labels are grades (e.g. DR grades "0".."4"): more than two classes named by
    consecutive increasing integers. Graded labels are judged and selected by QWK; two classes
    are a binary task, judged by balanced accuracy and AUC.

    Parameters
    ----------
    class_names : sequence
        Class names in label order.

    Returns
    -------
    bool
    """
    try:
        vals = [int(str(c).strip()) for c in class_names]
    except ValueError:
        return False
    return len(vals) > 2 and all(b - a == 1 for a, b in zip(vals[:-1], vals[1:], strict=True))


def binary_task(class_names: Sequence[Any], ordinal: bool) -> BinaryTask | None:
    """Referable DR for 5 ordinal classes, the positive class (index 1) for 2 classes, else None."""
    positive = referral_classes(class_names, ordinal)  # one definition (evaluation.grades)
    if positive is None:
        return None
    prefix = "referable_" if is_dr_grading(class_names, ordinal) else ""
    return BinaryTask(str(referral_name(class_names, ordinal)), positive, prefix)


# ---------------------------------------------------------------- operating points


def choose_operating_points(y_bin: np.ndarray, score: np.ndarray) -> dict[str, dict[str, Any]]:
    """Thresholds on ``score`` (positive when ``score >= threshold``) for each operating point.

    ``sens90``/``sens97.5``: among ROC points reaching the target sensitivity, the one with the
    highest specificity (ties: higher sensitivity). ``youden``: max ``sensitivity + specificity
    - 1`` (ties: highest threshold). Returns ``{name: {"threshold", "rule", "val_sensitivity",
    "val_specificity"}}``; empty if ``y_bin`` lacks positives or negatives.
    """
    y_bin = np.asarray(y_bin).astype(np.int64)
    if y_bin.min(initial=0) == y_bin.max(initial=0):
        return {}
    fpr, tpr, thr = roc_curve(y_bin, score, drop_intermediate=False)
    finite = np.isfinite(thr)  # sklearn's first threshold is +inf (predict nothing positive)
    spec = 1.0 - fpr
    out: dict[str, dict[str, Any]] = {}
    for name, target in OPERATING_POINTS.items():
        if target is None:
            j = np.where(finite, tpr - fpr, -np.inf)
            i = int(np.argmax(j))
            rule = "max Youden's J (sensitivity + specificity - 1) on validation"
        else:
            ok = np.flatnonzero(finite & (tpr >= target - 1e-12))
            i = int(ok[np.lexsort((-tpr[ok], -spec[ok]))[0]])
            rule = f"highest specificity with sensitivity >= {target:g} on validation"
        out[name] = {
            "threshold": float(thr[i]),
            "rule": rule,
            "val_sensitivity": float(tpr[i]),
            "val_specificity": float(spec[i]),
        }
    return out


def _sens_spec(y_bin: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    pos = y_bin == 1
    n_pos, n_neg = int(pos.sum()), int((~pos).sum())
    sens = float((pred[pos] == 1).sum() / n_pos) if n_pos else float("nan")
    spec = float((pred[~pos] == 0).sum() / n_neg) if n_neg else float("nan")
    return sens, spec


def apply_operating_point(y_bin: np.ndarray, score: np.ndarray, threshold: float) -> dict[str, Any]:
    """Sensitivity, specificity, PPV, NPV and counts of ``score >= threshold`` against ``y_bin``."""
    y_bin = np.asarray(y_bin).astype(np.int64)
    pred = (np.asarray(score) >= threshold).astype(np.int64)
    tn, fp, fn, tp = confusion_matrix(y_bin, pred, labels=[0, 1]).ravel().tolist()
    sens, spec = _sens_spec(y_bin, pred)
    return {
        "sensitivity": sens,
        "specificity": spec,
        "ppv": tp / (tp + fp) if tp + fp else None,
        "npv": tn / (tn + fn) if tn + fn else None,
        "tp": tp,
        "fp": fp,
        "tn": tn,
        "fn": fn,
    }


# ---------------------------------------------------------------- point metrics


def _quiet(fn: Callable[[], float]) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return float(fn())
        except ValueError:
            return float("nan")


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


# ---------------------------------------------------------------- bootstrap
#
# A bootstrap resample is represented by per-sample multiplicities ``w`` (how often each image was
# drawn). The statistics below are the weighted forms of the scikit-learn metrics above, written
# by hand because sklearn's per-call input validation dominates 1000 resamples x ~10 metrics
# (about 20 s for 1000 images); with w = 1 they equal sklearn exactly (see tests/test_metrics.py).


class _WeightedAUC:
    """ROC AUC of ``score`` for binary ``labels`` with sample weights, in O(N) per call: the
    score order and tie blocks are computed once; AUC = P(s_pos > s_neg) + 0.5 P(tie)."""

    def __init__(self, labels: np.ndarray, score: np.ndarray) -> None:
        self.order = np.argsort(score, kind="stable")
        s = np.asarray(score)[self.order]
        self.pos = np.asarray(labels, dtype=np.float64)[self.order]
        self.block = np.concatenate([[0], np.cumsum(s[1:] != s[:-1])]).astype(np.int64)
        self.n_blocks = int(self.block[-1]) + 1 if len(s) else 0

    def __call__(self, w: np.ndarray) -> float:
        ws = w[self.order]
        P = np.bincount(self.block, ws * self.pos, minlength=self.n_blocks)
        N = np.bincount(self.block, ws * (1.0 - self.pos), minlength=self.n_blocks)
        n_pos, n_neg = P.sum(), N.sum()
        if n_pos <= 0 or n_neg <= 0:
            return float("nan")
        neg_below = np.cumsum(N) - N
        return float(np.sum(P * (neg_below + 0.5 * N)) / (n_pos * n_neg))


def _cm_accuracy(cm: np.ndarray) -> float:
    return float(np.trace(cm) / cm.sum())


def _weighted_sens_spec(y_bin: np.ndarray, pred_bin: np.ndarray, w: np.ndarray) -> tuple:
    wp, wn = w * y_bin, w * (1 - y_bin)
    sp, sn = wp.sum(), wn.sum()
    sens = float((wp * pred_bin).sum() / sp) if sp > 0 else float("nan")
    spec = float((wn * (1 - pred_bin)).sum() / sn) if sn > 0 else float("nan")
    return sens, spec


_Stat = Callable[[np.ndarray, np.ndarray], float]  # (weights, weighted confusion matrix) -> value


def _op_stat(y_bin: np.ndarray, pred_bin: np.ndarray, which: int) -> _Stat:
    """Weighted sensitivity (``which=0``) or specificity (``1``) of fixed binary predictions."""
    return lambda w, cm: _weighted_sens_spec(y_bin, pred_bin, w)[which]


def _weighted_statistics(
    y: np.ndarray,
    p: np.ndarray,
    K: int,
    ordinal: bool,
    task: BinaryTask | None,
    points: dict[str, dict[str, Any]],
) -> dict[str, _Stat]:
    """Weighted statistic functions for every figure that gets an interval."""
    class_aucs = [_WeightedAUC(y == k, p[:, k]) for k in range(K)]
    stats: dict[str, _Stat] = {
        "accuracy": lambda w, cm: _cm_accuracy(cm),
        "balanced_accuracy": lambda w, cm: balanced_accuracy_from_confusion(cm),
        "macro_auc": lambda w, cm: _nanmean(np.array([a(w) for a in class_aucs])),
    }
    if ordinal:
        stats["qwk"] = lambda w, cm: qwk_from_confusion(cm)
    if task is not None:
        y_bin, score = task.labels(y).astype(np.float64), task.score(p)
        binary_auc = _WeightedAUC(y_bin, score)
        stats[f"{task.prefix}auc"] = lambda w, cm: binary_auc(w)
        for op, d in points.items():
            pred_bin = (score >= d["threshold"]).astype(np.float64)
            stats[f"op:{op}:sensitivity"] = _op_stat(y_bin, pred_bin, 0)
            stats[f"op:{op}:specificity"] = _op_stat(y_bin, pred_bin, 1)
    return stats


def bootstrap_weights(
    n: int, groups: Sequence[Any] | None = None, *, n_boot: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` resamples as per-sample multiplicities (float arrays of length ``n``).

    Without ``groups``: ``n`` images drawn with replacement. With ``groups``: as many groups as
    there are drawn with replacement and every image of a drawn group comes along (cluster
    bootstrap), so images of one patient always share a weight.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        return
    _, inv = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    G = int(inv.max()) + 1
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, G, G), minlength=G)[inv].astype(np.float64)


def _bootstrap(
    stats: dict[str, _Stat],
    cell: np.ndarray,
    K: int,
    groups: Sequence[Any] | None,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, list[float] | None], dict[str, Any]]:
    """95% percentile intervals of each statistic over ``n_boot`` (cluster) resamples."""
    values = np.full((n_boot, len(stats)), np.nan)
    fns = list(stats.values())
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        for b, w in enumerate(bootstrap_weights(len(cell), groups, n_boot=n_boot, seed=seed)):
            cm = np.bincount(cell, weights=w, minlength=K * K).reshape(K, K)
            values[b] = [fn(w, cm) for fn in fns]
    cis: dict[str, list[float] | None] = {}
    for j, name in enumerate(stats):
        col = values[:, j][np.isfinite(values[:, j])]
        cis[name] = [float(v) for v in np.percentile(col, [2.5, 97.5])] if col.size >= 2 else None
    info = {
        "n_boot": int(n_boot),
        "seed": int(seed),
        "unit": "image" if groups is None else "group",
        "n_units": len(cell) if groups is None else len({str(g) for g in groups}),
        "method": "percentile",
        "level": 0.95,
        "fixed": "operating-point thresholds and decoding are held fixed",
    }
    return cis, info


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


def _f(v: float | None) -> float | None:
    """JSON-safe float: NaN/inf become None."""
    return float(v) if v is not None and np.isfinite(v) else None


def compute_metrics(
    y_true: Any,
    probs: Any,
    class_names: Sequence[Any],
    *,
    groups: Sequence[Any] | None = None,
    ordinal: bool | None = None,
    val: tuple[Any, Any] | None = None,
    decoding: dict[str, Any] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """All evaluation metrics of ``probs`` (N, K) against ``y_true``; see ``docs/metrics.md``.

    ``val=(y_val, probs_val)`` supplies the data on which operating-point thresholds are chosen
    (without it they are chosen on this data and flagged optimistic). ``groups`` (one id per image,
    e.g. patient) switches the bootstrap to resampling whole groups. JSON-serialisable output.
    """
    class_names = [str(c) for c in class_names]
    K = len(class_names)
    y, p = _as_inputs(y_true, probs, K, "compute_metrics")
    if len(y) == 0:
        raise ValueError("compute_metrics: no samples")
    if groups is not None and len(groups) != len(y):
        raise ValueError(f"groups has {len(groups)} entries for {len(y)} samples")
    ordinal = is_ordinal(class_names) if ordinal is None else bool(ordinal)
    pred = np.asarray(decode(p, decoding)).astype(np.int64)
    notes: list[str] = []
    task = binary_task(class_names, ordinal)

    # operating points: chosen on validation, applied unchanged
    points: dict[str, dict[str, Any]] = {}
    thresholds_from = None
    if task is not None:
        if val is not None:
            yv, pv = _as_inputs(val[0], val[1], K, "compute_metrics(val=...)")
            thresholds_from = "validation"
        else:
            yv, pv = y, p
            thresholds_from = SAME_DATA
            notes.append("no validation data given: thresholds chosen on the evaluated data")
        points = choose_operating_points(task.labels(yv), task.score(pv))
        if not points:
            notes.append(f"{task.name}: threshold data lack positives or negatives; no points")

    # point estimates
    point = _point_estimates(y, p, pred, K, ordinal, task)
    aucs = _class_aucs(y, p)
    missing = [class_names[k] for k in range(K) if not np.isfinite(aucs[k])]
    if missing:
        notes.append(
            f"one-vs-rest AUC undefined for classes {missing} (absent or the only class); "
            f"macro_auc averages the other {K - len(missing)} classes"
        )
    prec, rec, f1, support = precision_recall_fscore_support(
        y, pred, labels=np.arange(K), zero_division=0
    )
    cis: dict[str, list[float] | None] = {}
    boot_info = None
    if n_boot > 0:
        stats = _weighted_statistics(y, p, K, ordinal, task, points)
        cis, boot_info = _bootstrap(stats, y * K + pred, K, groups, n_boot, seed)

    def ci(name: str) -> list[float] | None:
        return cis.get(name)

    out: dict[str, Any] = {
        "n": int(len(y)),
        "n_classes": K,
        "class_names": class_names,
        # classes of the model with no image here: their recall/AUC are undefined, not zero
        "classes_absent": [c for k, c in enumerate(class_names) if not np.any(y == k)],
        "ordinal": ordinal,
        "task": "dr_grading" if task and task.prefix else ("binary" if task else "multiclass"),
        "prediction": dict(decoding) if decoding else {"method": "argmax"},
        "accuracy": _f(point["accuracy"]),
        "accuracy_ci": ci("accuracy"),
        "balanced_accuracy": _f(point["balanced_accuracy"]),
        "balanced_accuracy_ci": ci("balanced_accuracy"),
        "macro_f1": _f(f1_score(y, pred, labels=np.arange(K), average="macro", zero_division=0)),
        "qwk": _f(point.get("qwk")),
        "qwk_ci": ci("qwk"),
        "macro_auc": _f(point["macro_auc"]),
        "macro_auc_ci": ci("macro_auc"),
        "ece": _f(expected_calibration_error(p, y)),
        "per_class": {
            name: {
                "precision": float(prec[k]),
                "recall": float(rec[k]),
                "f1": float(f1[k]),
                "support": int(support[k]),
                "auc": _f(aucs[k]),
            }
            for k, name in enumerate(class_names)
        },
        "confusion_matrix": confusion_matrix(y, pred, labels=np.arange(K)).tolist(),
    }
    out.update(_binary_block(task, y, p, point, cis, points, thresholds_from))
    out["bootstrap"] = boot_info
    out["notes"] = notes
    return out


def _binary_block(
    task: BinaryTask | None,
    y: np.ndarray,
    p: np.ndarray,
    point: dict[str, float],
    cis: dict[str, list[float] | None],
    points: dict[str, dict[str, Any]],
    thresholds_from: str | None,
) -> dict[str, Any]:
    """Keys of the binary / referable-DR view (all present; None when not applicable)."""
    out: dict[str, Any] = {}
    for pre in ("", "referable_"):
        for k in ("auc", "sensitivity", "specificity"):
            out[f"{pre}{k}"] = None
            out[f"{pre}{k}_ci"] = None
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
        "score": f"sum of probabilities of classes {list(task.positive)}",
        "prevalence": float(y_bin.mean()),
        "n_positive": int(y_bin.sum()),
    }
    out[f"{pre}auc"] = _f(point[f"{pre}auc"])
    out[f"{pre}auc_ci"] = cis.get(f"{pre}auc")
    ops: dict[str, Any] = {}
    for op, d in points.items():
        applied = apply_operating_point(y_bin, score, d["threshold"])
        ops[op] = {
            "threshold": d["threshold"],
            **applied,
            "sensitivity_ci": cis.get(f"op:{op}:sensitivity"),
            "specificity_ci": cis.get(f"op:{op}:specificity"),
            "val_sensitivity": d["val_sensitivity"],
            "val_specificity": d["val_specificity"],
            "rule": d["rule"],
        }
        ops[op]["sensitivity"] = _f(ops[op]["sensitivity"])
        ops[op]["specificity"] = _f(ops[op]["specificity"])
    out["operating_points"] = ops
    out["thresholds_from"] = thresholds_from
    if HEADLINE_POINT in ops:
        h = ops[HEADLINE_POINT]
        out["headline_operating_point"] = HEADLINE_POINT
        for k in ("sensitivity", "specificity"):
            out[f"{pre}{k}"] = h[k]
            out[f"{pre}{k}_ci"] = h[f"{k}_ci"]
    return out
