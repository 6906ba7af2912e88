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
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest, norm
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_recall_fscore_support,
    roc_auc_score,
    roc_curve,
)

from medtune.config import OPERATING_POINTS
from medtune.errors import MedtuneError
from medtune.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
)
from medtune.evaluation.card import OperatingPoint
from medtune.evaluation.decoding import decode
from medtune.evaluation.labels import BinaryTask, LabelSpace
from medtune.evaluation.scores import (
    balanced_accuracy,
    balanced_accuracy_from_confusion,
    qwk,
    qwk_from_confusion,
)
from medtune.evaluation.site_points import MIN_SITE_POSITIVES, site_rates, worst_site_threshold

__all__ = [
    "HEADLINE",
    "HEADLINE_METRICS",
    "HeadlineMetric",
    "MIN_SITE_POSITIVES",
    "OPERATING_POINTS",
    "apply_operating_point",
    "bootstrap_weights",
    "choose_operating_points",
    "compute_metrics",
    "effective_sample_size",
    "gap_threshold",
    "move_operating_point",
    "proportion_ci",
    "quick_metrics",
    "validated_operating_points",
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
LEVEL = 0.95  # coverage of every interval
SMALL_N = 30  # a figure resting on fewer cases than this is flagged in ``warnings``


# ---------------------------------------------------------------- operating points


def choose_operating_points(
    y_bin: np.ndarray, score: np.ndarray, sites: Sequence[Any] | None = None
) -> dict[str, dict[str, Any]]:
    """Thresholds on ``score`` (positive when ``score >= threshold``) for each operating point.

    ``sens90``/``sens97.5``: among ROC points reaching the target sensitivity, the one with the
    highest specificity (ties: higher sensitivity). With ``sites`` (one per image) and at least
    two sites holding :data:`MIN_SITE_POSITIVES` positives, the target must hold at every such
    site too (:func:`medtune.evaluation.site_points.worst_site_threshold`), and each point adds
    ``sites`` (sensitivity and specificity per site) and ``worst_site``. ``youden``: max
    ``sensitivity + specificity - 1`` (ties: highest threshold). The threshold itself is the
    midpoint of the gap between the lowest score the point keeps positive and the next lower
    score (:func:`gap_threshold`), so validation figures are unchanged but a new image scoring
    just below a saturated validation score (``0.99999999999998`` against positives at exactly
    ``1.0``) is still caught.

    Parameters
    ----------
    y_bin : ndarray of int, shape (N,)
        1 for positives (e.g. referable DR), 0 for negatives.
    score : ndarray of float, shape (N,)
        The score positives are expected to exceed (e.g. P(referable DR), 0-1).
    sites : ndarray of str, shape (N,), or None
        The site of each image, for the worst-site rule; None pools every image.

    Returns
    -------
    dict
        ``{name: {"threshold", "rule", "val_sensitivity", "val_specificity"}}`` for ``sens90``,
        ``sens97.5`` and ``youden``; empty if ``y_bin`` lacks positives or negatives.
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
            worst = None
        else:
            worst = None if sites is None else worst_site_threshold(y_bin, score, sites, target)
            allowed = finite if worst is None else finite & (thr <= worst["threshold"])
            i = _at_sensitivity(tpr, spec, allowed, target)
            rule = f"highest specificity with sensitivity >= {target:g} on validation"
            if worst is not None:
                rule += (
                    f", pooled and at every site with >= {MIN_SITE_POSITIVES} positives "
                    f"(worst: {worst['worst_site']})"
                )
        out[name] = {
            "threshold": gap_threshold(thr, i),
            "rule": rule,
            "val_sensitivity": float(tpr[i]),
            "val_specificity": float(spec[i]),
        }
        if worst is not None:
            out[name]["worst_site"] = worst["worst_site"]
            out[name]["sites"] = site_rates(y_bin, score, sites, float(thr[i]))  # type: ignore[arg-type]
    return out


def gap_threshold(thresholds: np.ndarray, i: int) -> float:
    """The threshold for ROC point ``i``, placed in the middle of the gap below its score.

    ``roc_curve`` (``drop_intermediate=False``) returns the distinct scores in decreasing order,
    and point ``i`` is "positive when ``score >= thresholds[i]``". That threshold sits exactly on
    a validation score: when validation positives saturate at ``1.0`` it excludes every new
    image scoring ``1 - 1e-14``, the very images it was meant to catch. Any value in
    ``(thresholds[i + 1], thresholds[i]]`` gives the same validation figures; the midpoint of
    that gap (the maximum-margin choice, as an SVM places its boundary, Cortes & Vapnik 1995) is
    the one least sensitive to scores that moved a little. Written here because scikit-learn's
    ``roc_curve`` returns only the observed scores.

    Parameters
    ----------
    thresholds : ndarray of float, shape (M,)
        ``roc_curve``'s thresholds (decreasing; the first may be ``inf``).
    i : int
        The chosen point, with ``thresholds[i]`` finite.

    Returns
    -------
    float
        ``thresholds[i + 1] < t <= thresholds[i]``; ``thresholds[i]`` itself for the lowest score
        (the point that calls everything positive) or where no float lies inside the gap.
    """
    high = float(thresholds[i])
    if i + 1 >= len(thresholds):
        return high
    low = float(thresholds[i + 1])
    mid = low + (high - low) / 2.0
    return mid if low < mid <= high else high


def _at_sensitivity(tpr: np.ndarray, spec: np.ndarray, finite: np.ndarray, target: float) -> int:
    """ROC index with sensitivity >= ``target`` and the highest specificity (ties: sensitivity)."""
    ok = np.flatnonzero(finite & (tpr >= target - 1e-12))
    return int(ok[np.lexsort((-tpr[ok], -spec[ok]))[0]])


def move_operating_point(
    logits: np.ndarray,
    y: np.ndarray | None,
    task: BinaryTask,
    *,
    validated_threshold: float,
    target_sensitivity: float,
    temperature: float = 1.0,
    min_positives: int = MIN_SITE_POSITIVES,
) -> dict[str, Any]:
    """Move a validated operating point to a new site using a small labelled sample of it.

    Without labels (``y is None``) nothing moves: the validated threshold and temperature are
    returned with ``moved=False``. With labels, the temperature is refitted on the sample
    (:func:`~medtune.evaluation.calibration.fit_temperature`, Guo et al. 2017) and the threshold
    on the recalibrated score is the one :func:`choose_operating_points` would pick: the highest
    specificity among points with sensitivity >= ``target_sensitivity`` on the sample.

    Parameters
    ----------
    logits : ndarray, shape (N, K)
        The model's logits for the sample's images (before any temperature).
    y : ndarray of int, shape (N,), or None
        Class labels (e.g. DR grades 0-4) of the sample; ``None`` keeps the validated point.
    task : BinaryTask
        The binary view (e.g. referable DR: grades 2-4) the operating point is on.
    validated_threshold : float
        The run's threshold on ``task.score(softmax(logits / temperature))``.
    target_sensitivity : float
        Sensitivity (0-1) the validated operating point was chosen for, e.g. 0.9 for ``sens90``.
    temperature : float, default 1.0
        The run's validated temperature (returned unchanged without labels).
    min_positives : int, default :data:`MIN_SITE_POSITIVES` (10)
        Fewest positives (and at least one negative) the sample must hold to move the point.

    Returns
    -------
    dict
        ``moved`` (bool), ``threshold`` and ``temperature`` (apply both: positive when
        ``task.score(apply_temperature(logits, temperature)) >= threshold``), ``rule``, and with
        labels ``n_images``, ``n_positives``, ``n_negatives``, ``sensitivity``,
        ``sensitivity_ci95`` (Clopper-Pearson) and ``specificity`` on the sample.

    Raises
    ------
    MedtuneError
        When the sample has fewer than ``min_positives`` positives or no negatives, or the
        shapes of ``logits`` and ``y`` disagree.
    """
    from scipy.stats import binomtest  # Clopper-Pearson; imported here to keep the module light

    if y is None:
        return {
            "moved": False,
            "threshold": float(validated_threshold),
            "temperature": float(temperature),
            "rule": "validated operating point kept (no labels from the new site)",
        }
    if not 0.0 < float(target_sensitivity) <= 1.0:
        raise MedtuneError(f"target sensitivity must be in (0, 1], got {target_sensitivity}")
    logits = np.asarray(logits, dtype=np.float64)
    y = np.asarray(y).astype(np.int64).ravel()
    if logits.ndim != 2 or len(logits) != len(y):
        raise MedtuneError(
            f"logits must be (N, K) with one label per row; got {logits.shape} and {len(y)} labels"
        )
    y_bin = task.labels(y)
    n_pos = int(y_bin.sum())
    n_neg = len(y_bin) - n_pos
    if n_pos < min_positives or n_neg < 1:
        raise MedtuneError(
            f"the labelled sample has {n_pos} positive and {n_neg} negative images ({task.name}); "
            f"moving the operating point needs at least {min_positives} positives and one "
            "negative: label more images of the new site or keep the validated point"
        )
    new_t = fit_temperature(logits, y)
    score = task.score(apply_temperature(logits, new_t))
    fpr, tpr, thr = roc_curve(y_bin, score, drop_intermediate=False)
    i = _at_sensitivity(tpr, 1.0 - fpr, np.isfinite(thr), float(target_sensitivity))
    threshold = gap_threshold(thr, i)
    applied = apply_operating_point(y_bin, score, threshold)
    ci = binomtest(applied["tp"], n_pos).proportion_ci(0.95, method="exact")
    return {
        "moved": True,
        "threshold": threshold,
        "temperature": float(new_t),
        "rule": (
            f"temperature refitted and highest specificity with sensitivity >= "
            f"{float(target_sensitivity):g} on {len(y)} labelled new-site images"
        ),
        "n_images": len(y),
        "n_positives": n_pos,
        "n_negatives": n_neg,
        "sensitivity": applied["sensitivity"],
        "sensitivity_ci95": [float(ci.low), float(ci.high)],
        "specificity": applied["specificity"],
    }


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
    """Weighted accuracy (accuracy's interval is Wilson's; this is the tested reference)."""
    return float(np.trace(cm) / cm.sum())


_Stat = Callable[[np.ndarray, np.ndarray], float]  # (weights, weighted confusion matrix) -> value


def _weighted_statistics(
    y: np.ndarray,
    p: np.ndarray,
    K: int,
    ordinal: bool,
    task: BinaryTask | None,
) -> dict[str, _Stat]:
    """Weighted statistic functions for every figure that gets a bootstrap interval (the
    proportions get Wilson intervals instead, see :func:`proportion_ci`)."""
    class_aucs = [_WeightedAUC(y == k, p[:, k]) for k in range(K)]
    stats: dict[str, _Stat] = {
        "balanced_accuracy": lambda w, cm: balanced_accuracy_from_confusion(cm),
        "macro_auc": lambda w, cm: _nanmean(np.array([a(w) for a in class_aucs])),
    }
    if ordinal:
        stats["qwk"] = lambda w, cm: qwk_from_confusion(cm)
    if task is not None:
        y_bin, score = task.labels(y).astype(np.float64), task.score(p)
        binary_auc = _WeightedAUC(y_bin, score)
        stats[f"{task.prefix}auc"] = lambda w, cm: binary_auc(w)
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
    """95% percentile intervals of each statistic over ``n_boot`` (cluster) resamples.

    An interval of zero width (every resample gave the same value, e.g. an AUC of 1 or a
    constant prediction's kappa of 0) measures nothing; it is returned as is and handled by
    :func:`_interval_fallbacks`.
    """
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
        "level": LEVEL,
        "fixed": "operating-point thresholds and decoding are held fixed",
    }
    return cis, info


# ---------------------------------------------------------------- proportion intervals
#
# Sensitivity, specificity, accuracy, PPV and NPV are proportions k / n. A percentile bootstrap
# of a proportion at 0 or 1 returns [0, 0] or [1, 1] (every resample agrees), claiming
# certainty that 4 negatives cannot give. The Wilson score interval (Wilson, JASA 1927) stays
# valid there (4 of 4 -> [0.51, 1.00]) and has close to nominal coverage for small n (Brown, Cai
# & DasGupta, Statistical Science 2001). Images of one patient are not independent; with groups
# the interval uses the effective sample size n / design effect (Kish, Survey Sampling 1965),
# estimated from the between-group variance of the proportion as in Korn & Graubard (Survey
# Methodology 1998). See docs/metrics.md.


def effective_sample_size(success: np.ndarray, groups: np.ndarray) -> float:
    """Effective number of independent cases behind the proportion ``mean(success)``.

    Parameters
    ----------
    success : ndarray of bool, shape (n,)
        Whether each case counts as a success (e.g. a positive detected).
    groups : ndarray, shape (n,)
        Group (patient) id of each case.

    Returns
    -------
    float
        ``p (1 - p) / Var(p)`` with the cluster-robust (ratio estimator) variance
        ``G / (G - 1) * sum_g (k_g - p n_g)^2 / n^2`` over the G groups, clipped to ``[G, n]``
        (``G <= n_eff``: a group counts at least once; ``n_eff <= n``: clustering never adds
        information). At ``p`` of 0 or 1 the variance is 0 and undefined as a ratio; then the
        number of groups G is used, the conservative end.
    """
    success = np.asarray(success, dtype=np.float64)
    n = len(success)
    _, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups = int(inv.max()) + 1 if n else 0
    p = float(success.mean()) if n else 0.0
    if n_groups < 2 or p in (0.0, 1.0):
        return float(n_groups)
    k_g = np.bincount(inv, weights=success, minlength=n_groups)
    n_g = np.bincount(inv, minlength=n_groups)
    var = n_groups / (n_groups - 1) * float(np.sum((k_g - p * n_g) ** 2)) / n**2
    if var <= 0.0:
        return float(n)
    return float(np.clip(p * (1.0 - p) / var, n_groups, n))


def _wilson(p: float, n: float, level: float) -> list[float]:
    """Wilson score interval for a proportion ``p`` observed on ``n`` (possibly fractional) cases.

    Written out because ``scipy.stats.binomtest`` only takes integer counts and an effective
    sample size is real-valued; for integer counts it equals scipy's ``method="wilson"`` (tested).
    """
    z = float(norm.ppf(0.5 + level / 2))
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * np.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def proportion_ci(
    success: Any, groups: Sequence[Any] | None = None, *, level: float = LEVEL
) -> list[float] | None:
    """Wilson score interval of the proportion of ``success`` (valid at 0 and 1).

    Parameters
    ----------
    success : array-like of bool, shape (n,)
        One entry per case in the denominator (e.g. every positive for sensitivity).
    groups : sequence, shape (n,), optional
        Group (patient) id per case; the interval then uses :func:`effective_sample_size`.
    level : float, default 0.95
        Coverage.

    Returns
    -------
    list of float or None
        ``[lo, hi]``; None when there are no cases. Without groups this is
        ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``.
    """
    success = np.asarray(success, dtype=bool).ravel()
    n = len(success)
    if n == 0:
        return None
    k = int(success.sum())
    if groups is None:
        ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
        return [float(ci.low), float(ci.high)]
    return _wilson(k / n, effective_sample_size(success, np.asarray(groups)), level)


def _mean_of_proportions_ci(
    y: np.ndarray, pred: np.ndarray, groups: np.ndarray | None, level: float
) -> list[float] | None:
    """Conservative interval of a mean of per-class recalls (balanced accuracy).

    Each present class gets a Wilson interval at level ``1 - (1 - level) / K`` (Bonferroni), so
    all K hold together with probability >= ``level`` and the mean of the recalls then lies
    between the means of the bounds. Used only where the bootstrap interval collapses.
    """
    classes = np.unique(y)
    if len(classes) == 0:
        return None
    bonferroni = 1.0 - (1.0 - level) / len(classes)
    bounds = [
        proportion_ci(
            pred[y == c] == c, None if groups is None else groups[y == c], level=bonferroni
        )
        for c in classes
    ]
    return [float(np.mean([b[0] for b in bounds])), float(np.mean([b[1] for b in bounds]))]


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
    ordinal = space.ordinal
    pred = np.asarray(decode(p, decoding)).astype(np.int64)
    notes: list[str] = []
    task = space.binary_task

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
        points = choose_operating_points(task.labels(yv), task.score(pv), val_sites)
        if val is not None and any("worst_site" in d for d in points.values()):
            thresholds_from += ", sensitivity held at every validation site (worst-site rule)"
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
    boot_info = intervals = None
    warn: list[str] = []
    g = None if groups is None else np.asarray([str(x) for x in groups])
    if n_boot > 0:
        stats = _weighted_statistics(y, p, K, ordinal, task)
        cis, boot_info = _bootstrap(stats, y * K + pred, K, groups, n_boot, seed)
        warn += _interval_fallbacks(cis, point, y, pred, g)
        cis.update(_proportion_cis(y, p, pred, task, points, g))
        intervals = _interval_info(g)
    counts = _case_counts(y, K, ordinal, task, bool(points))

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
        # what the headline sensitivity, specificity and AUC are computed for
        "positive": None if task is None else task.name,
        "prediction": dict(decoding) if decoding else {"method": "argmax"},
        "accuracy": _f(point["accuracy"]),
        "accuracy_ci": ci("accuracy"),
        "accuracy_n": counts["accuracy"],
        "balanced_accuracy": _f(point["balanced_accuracy"]),
        "balanced_accuracy_ci": ci("balanced_accuracy"),
        "balanced_accuracy_n": counts["balanced_accuracy"],
        "macro_f1": _f(f1_score(y, pred, labels=np.arange(K), average="macro", zero_division=0)),
        "qwk": _f(point.get("qwk")),
        "qwk_ci": ci("qwk"),
        "qwk_n": counts["qwk"],
        "macro_auc": _f(point["macro_auc"]),
        "macro_auc_ci": ci("macro_auc"),
        "macro_auc_n": counts["macro_auc"],
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
    out.update(_binary_block(task, y, p, point, cis, points, thresholds_from, counts))
    out["bootstrap"] = boot_info
    out["intervals"] = intervals
    out["notes"] = notes
    out["warnings"] = warn + _small_n_warnings(out, g)
    return out


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


def _interval_fallbacks(
    cis: dict[str, list[float] | None],
    point: dict[str, float],
    y: np.ndarray,
    pred: np.ndarray,
    groups: np.ndarray | None,
) -> list[str]:
    """Replace bootstrap intervals of zero width, which claim a certainty the data cannot give.

    Balanced accuracy, a mean of per-class recalls, gets :func:`_mean_of_proportions_ci`; any
    other figure (AUC, QWK) gets no interval and a warning. Returns the warnings.
    """
    out = []
    for name, ci in list(cis.items()):
        if ci is None or ci[1] - ci[0] > 1e-12:
            continue
        value = point.get(name, ci[0])
        if name == "balanced_accuracy":
            cis[name] = _mean_of_proportions_ci(y, pred, groups, LEVEL)
            how = "a conservative interval from per-class Wilson intervals is shown instead"
        else:
            cis[name] = None
            how = "no interval is reported; more cases are needed to measure its uncertainty"
        out.append(f"{name}: every bootstrap resample gave {value:.3f}, so {how}")
    return out


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
    cis.update(_point_cis(task.labels(y) == 1, task.score(p), points, groups))
    return cis


def _point_cis(
    y_bin: np.ndarray,
    score: np.ndarray,
    points: dict[str, dict[str, Any]],
    groups: np.ndarray | None,
) -> dict[str, list[float] | None]:
    """Wilson intervals of sensitivity, specificity, PPV and NPV at each point's threshold."""

    def sub(mask: np.ndarray) -> np.ndarray | None:
        return None if groups is None else groups[mask]

    cis: dict[str, list[float] | None] = {}
    for op, d in points.items():
        hit = score >= d["threshold"]
        cis[f"op:{op}:sensitivity"] = proportion_ci(hit[y_bin], sub(y_bin))
        cis[f"op:{op}:specificity"] = proportion_ci(~hit[~y_bin], sub(~y_bin))
        cis[f"op:{op}:ppv"] = proportion_ci(y_bin[hit], sub(hit))
        cis[f"op:{op}:npv"] = proportion_ci(~y_bin[~hit], sub(~hit))
    return cis


def validated_operating_points(
    y: Any,
    probs: Any,
    task: BinaryTask,
    groups: Sequence[Any] | None = None,
    sites: Sequence[Any] | None = None,
) -> dict[str, OperatingPoint]:
    """The operating points chosen on validation, with their figures on the same images.

    Parameters
    ----------
    y : array-like of int, shape (N,)
        Validation labels.
    probs : array-like, shape (N, K)
        Calibrated validation probabilities.
    task : BinaryTask
        The referral task (:attr:`medtune.evaluation.labels.LabelSpace.binary_task`).
    groups : sequence, shape (N,), optional
        Patient ids: the intervals use the effective sample size of the clustered data.
    sites : sequence, shape (N,), optional
        The site of each validation image: sensitivity points hold at the worst site too
        (:func:`choose_operating_points`), and each point records its per-site figures.

    Returns
    -------
    dict of str to OperatingPoint
        ``sens90``, ``sens97.5`` and ``youden`` (:func:`choose_operating_points`) with the
        in-sample sensitivity and specificity and their 95% Wilson intervals; empty when
        validation lacks positives or negatives.
    """
    y_bin = task.labels(np.asarray(y).astype(np.int64).ravel())
    score = task.score(probs)
    chosen = choose_operating_points(y_bin, score, sites)
    g = None if groups is None else np.asarray([str(x) for x in groups])
    cis = _point_cis(y_bin == 1, score, chosen, g)
    out = {}
    for name, d in chosen.items():
        applied = apply_operating_point(y_bin, score, d["threshold"])
        out[name] = OperatingPoint(
            threshold=d["threshold"],
            rule=d["rule"],
            sensitivity=_f(applied["sensitivity"]),
            sensitivity_ci=cis[f"op:{name}:sensitivity"],
            specificity=_f(applied["specificity"]),
            specificity_ci=cis[f"op:{name}:specificity"],
            val_sites=d.get("sites"),
        )
    return out


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
    out[f"{pre}auc"] = _f(point[f"{pre}auc"])
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
            out[f"{pre}{k}_n"] = counts.get(f"{pre}{k}")
    return out
