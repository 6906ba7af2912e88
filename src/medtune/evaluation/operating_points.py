"""Operating points: referral thresholds chosen on validation and applied unchanged.

Three points per binary task (``config.OPERATING_POINTS``): ``sens90`` and ``sens97.5`` (the
highest specificity with sensitivity at or above the target; with validation sites, at every
site too, :mod:`medtune.evaluation.site_points`) and ``youden`` (Youden's J, Youden 1950). The
threshold sits in the middle of the gap below the chosen score (:func:`gap_threshold`).
:func:`validated_operating_points` gives the points with their validation figures for the model
card (:func:`card_operating_points`, one set per TTA mode); :func:`move_operating_point` moves a
point to a new site with a small labelled sample of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest
from sklearn.metrics import confusion_matrix, roc_curve

from medtune.config import OPERATING_POINTS
from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature, fit_temperature
from medtune.evaluation.card import OperatingPoint, OperatingPoints
from medtune.evaluation.intervals import operating_point_cis
from medtune.evaluation.labels import BinaryTask, LabelSpace
from medtune.evaluation.scores import finite_or_none
from medtune.evaluation.site_points import MIN_SITE_POSITIVES, site_rates, worst_site_threshold

__all__ = [
    "apply_operating_point",
    "card_operating_points",
    "choose_operating_points",
    "gap_threshold",
    "move_operating_point",
    "validated_operating_points",
]


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
    cis = operating_point_cis(y_bin == 1, score, chosen, g)
    out = {}
    for name, d in chosen.items():
        applied = apply_operating_point(y_bin, score, d["threshold"])
        out[name] = OperatingPoint(
            threshold=d["threshold"],
            rule=d["rule"],
            sensitivity=finite_or_none(applied["sensitivity"]),
            sensitivity_ci=cis[f"op:{name}:sensitivity"],
            specificity=finite_or_none(applied["specificity"]),
            specificity_ci=cis[f"op:{name}:specificity"],
            val_sites=d.get("sites"),
        )
    return out


def card_operating_points(
    y_val: np.ndarray,
    val_logits: dict[str, np.ndarray],
    temperature: float,
    labels: LabelSpace,
    groups: Any,
    sites: Any = None,
) -> OperatingPoints | None:
    """The referral thresholds chosen on validation, per TTA mode, for the model card.

    Parameters
    ----------
    y_val : ndarray of int, shape (N,)
        Validation labels.
    val_logits : dict of str to ndarray, shape (N, K)
        Validation logits per TTA mode (``"none"``, ``"rot90"``).
    temperature : float
        The fitted temperature.
    labels : LabelSpace
        The model's classes (the referral task is :attr:`LabelSpace.binary_task`).
    groups : sequence or None
        Patient ids (clustered intervals).
    sites : sequence or None, default None
        The site of each validation image: sensitivity points hold at the worst site.

    Returns
    -------
    OperatingPoints or None
        ``None`` when the model has no referral task or validation lacks positives or
        negatives. Sensitivity and specificity are those on validation, where the thresholds
        were chosen (in-sample), with 95% Wilson intervals (:func:`validated_operating_points`).
    """
    task = labels.binary_task
    if task is None:
        return None
    points = {
        tta: validated_operating_points(
            y_val, apply_temperature(z, temperature), task, groups, sites
        )
        for tta, z in val_logits.items()
    }
    if not points.get("none"):
        return None
    return OperatingPoints(
        name=task.name,
        positive_classes=task.positive,
        score=task.score_name,
        n_val=len(y_val),
        n_val_positive=int(task.labels(y_val).sum()),
        points=points,
    )
