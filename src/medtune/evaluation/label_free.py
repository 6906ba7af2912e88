"""Moving an operating point to a new site without its labels.

At a new site a model's scores move: on EyePACS, after AdaBN, every P(referable) rose (mean 0.06
-> 0.34) and the home threshold's sensitivity went from 0.90 to 0.65 at another specificity
(``findings.md``). Without labels the threshold can still follow the scores, under a stated
assumption:

``quantile`` (quantile mapping of the validation score distribution onto the new site's)
    The new threshold refers the same share of the new site's images as the validated one
    referred on validation: ``t' = Q_new(1 - r)``, ``r = pi * sens + (1 - pi) * (1 - spec)``,
    with the validation prevalence ``pi`` and the validated sensitivity and specificity. Exact
    when the new site's scores are a monotone transform of home scores (same ranking, shifted
    or stretched) and the prevalence is the same.
``em-quantile``
    The same, with the new site's prevalence ``pi'`` estimated from its unlabelled images by
    expectation-maximisation of the class priors (Saerens, Latinne & Decaestecker 2002,
    "Adjusting the outputs of a classifier to new a priori probabilities: a simple procedure";
    ``quapy``'s ``EMQ.EM``, Moreo, Esuli & Sebastiani 2021). Exact under prior shift alone;
    under a score shift too the EM estimate is biased by the shifted posteriors.

Neither is validated at the new site: the operating point's status says so
(:data:`NOT_VALIDATED`) until a labelled sample moves it (``medtune adapt --labels``). Which one
keeps the sensitivity within 0.05 of its validated value at a held-out site is measured by the
leave-one-site-out benchmark (``docs/generalisation.md``).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from medtune.errors import MedtuneError
from medtune.evaluation.card import OperatingPoints

__all__ = [
    "LABEL_FREE_METHODS",
    "NOT_VALIDATED",
    "estimate_prevalence",
    "label_free_threshold",
    "operating_point_status",
    "random_sample_check",
    "referral_validation",
    "score_label_free_points",
]

#: ``medtune adapt --recalibrate`` methods (``none`` keeps the validated threshold).
LABEL_FREE_METHODS = ("none", "quantile", "em-quantile")
#: What a referral at a site flagged as shifted, and not calibrated on its labels, is marked.
NOT_VALIDATED = "operating point not validated here"
#: Level of the test that a labelled sample is a random sample of its site (as the batch test's).
SAMPLE_ALPHA = 0.05


def estimate_prevalence(probs: np.ndarray, train_priors: np.ndarray) -> np.ndarray:
    """Class priors of an unlabelled set by EM (Saerens et al. 2002).

    Parameters
    ----------
    probs : ndarray, shape (N, K)
        Calibrated class probabilities of the new site's images (calibrated where
        ``train_priors`` hold, e.g. temperature-scaled on validation).
    train_priors : ndarray, shape (K,)
        The class frequencies the probabilities are calibrated to.

    Returns
    -------
    ndarray, shape (K,)
        The estimated class priors of the new set (summing to 1).

    Raises
    ------
    MedtuneError
        For mismatched shapes or probabilities that are not finite.
    """
    import warnings

    from quapy.method.aggregative import EMQ

    p = np.asarray(probs, dtype=np.float64)
    prior = np.asarray(train_priors, dtype=np.float64).ravel()
    if p.ndim != 2 or p.shape[1] != prior.size or len(p) == 0 or not np.isfinite(p).all():
        raise MedtuneError(
            f"prevalence estimation needs finite (N, {prior.size}) probabilities, got {p.shape}"
        )
    with warnings.catch_warnings():  # "might not have converged" after quapy's iteration cap
        warnings.simplefilter("ignore")
        priors, _ = EMQ.EM(prior / prior.sum(), p)
    return np.asarray(priors, dtype=np.float64)


def label_free_threshold(
    new_scores: np.ndarray,
    *,
    sensitivity: float,
    specificity: float,
    prevalence: float,
) -> float:
    """The threshold that refers the share of new-site images the validated point would.

    Parameters
    ----------
    new_scores : ndarray, shape (N,)
        The new site's scores (e.g. P(referable)), unlabelled.
    sensitivity, specificity : float
        The validated operating point's sensitivity and specificity (0-1).
    prevalence : float
        The share of positives assumed at the new site (0-1): the validation prevalence
        (``quantile``) or an estimate (``em-quantile``, :func:`estimate_prevalence`).

    Returns
    -------
    float
        ``t'``: refer when ``score >= t'``; about ``prevalence * sensitivity + (1 -
        prevalence) * (1 - specificity)`` of ``new_scores`` lie at or above it (more when
        scores tie at the cut: tied images are all referred). Like every validated operating
        point (:func:`medtune.evaluation.operating_points.gap_threshold`), ``t'`` lies in the
        middle of the gap between the lowest referred score and the next lower one; the lowest
        score itself when every image is referred.

    Raises
    ------
    MedtuneError
        For no scores, or a rate outside [0, 1].
    """
    from medtune.evaluation.operating_points import gap_threshold  # scikit-learn: when moving

    scores = np.asarray(new_scores, dtype=np.float64).ravel()
    if scores.size == 0 or not np.isfinite(scores).all():
        raise MedtuneError("label-free threshold: need the new site's finite scores")
    for name, v in (("sensitivity", sensitivity), ("specificity", specificity)):
        if not 0.0 <= float(v) <= 1.0:
            raise MedtuneError(f"label-free threshold: {name} {v} is outside [0, 1]")
    pi = float(np.clip(prevalence, 0.0, 1.0))
    rate = pi * float(sensitivity) + (1.0 - pi) * (1.0 - float(specificity))
    k = int(np.clip(np.ceil(rate * scores.size - 1e-9), 1, scores.size))
    distinct = np.unique(scores)[::-1]  # decreasing, as roc_curve's thresholds
    kth = np.sort(scores)[::-1][k - 1]  # the k-th highest score: at least k images referred
    # the same rule as every validated point: the middle of the gap below the lowest score kept,
    # so a new image scoring a hair under a saturated or tied score is referred too
    return gap_threshold(distinct, int(np.flatnonzero(distinct == kth)[0]))


def random_sample_check(
    sample_scores: np.ndarray,
    site_scores: np.ndarray,
    alpha: float = SAMPLE_ALPHA,
    *,
    sample_patients: Any = None,
    site_patients: Any = None,
) -> dict[str, Any]:
    """Test whether a labelled sample looks like a random sample of the site's images.

    A threshold moved to keep 90% of a sample's positives keeps about 90% of the site's only
    when the sample's positives are a random draw of the site's. Images chosen for a grader
    (``medtune adapt --suggest``: uncertain and unusual ones) are not: thresholds moved on them
    kept 0.74-0.86 sensitivity on the rest of each held-out development site
    (``docs/generalisation.md``). Their scores give them away: the two-sample Kolmogorov-Smirnov
    test of the sample's P(referable) against the site's rejected every suggested sample of 25
    to 200 images at the three sites (p <= 2e-4) and 3-6% of random samples at the 0.05 level.

    Parameters
    ----------
    sample_scores : numpy.ndarray, (n,)
        P(referable) (or the task's score) of the labelled sample.
    site_scores : numpy.ndarray, (m,)
        The same score, from the same model, of the site's other images (those the sample does
        not hold: with the sample among them the test is conservative).
    alpha : float, default 0.05
        Level of the test: a random sample is called "not random" with about this probability.
    sample_patients, site_patients : sequence of str, optional
        Each image's patient (``""`` or ``None`` when unknown): a sample of patients holds
        both eyes of each, which are not independent images, so the test counts patients
        (:func:`medtune.evaluation.shift.ks_test`).

    Returns
    -------
    dict
        ``test`` (its name), ``n_sample``, ``n_site``, their ``n_sample_patients`` and
        ``n_site_patients``, ``statistic`` (KS distance), ``p_value`` and ``random``
        (``p_value >= alpha``).

    Notes
    -----
    ``scipy.stats.ks_2samp`` (exact p-values for independent images; Kolmogorov's distribution
    at the patients' effective size otherwise, :func:`medtune.evaluation.shift.ks_test`).
    """
    from medtune.evaluation.shift import count_patients, ks_test

    x = np.asarray(sample_scores, dtype=np.float64).ravel()
    y = np.asarray(site_scores, dtype=np.float64).ravel()
    statistic, p_values = ks_test(x, y, sample_patients, site_patients)
    p = float(p_values[0])
    return {
        "test": "two-sample Kolmogorov-Smirnov, P(referable) of the sample vs the site's images",
        "n_sample": int(len(x)),
        "n_site": int(len(y)),
        "n_sample_patients": len(x) if sample_patients is None else count_patients(sample_patients),
        "n_site_patients": len(y) if site_patients is None else count_patients(site_patients),
        "statistic": float(statistic[0]),
        "p_value": p,
        "random": bool(p >= alpha),
    }


def operating_point_status(
    shifted: bool | None,
    *,
    labelled: int = 0,
    method: str = "none",
    sample: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Whether a run's operating point is validated at the site it serves.

    Parameters
    ----------
    shifted : bool or None
        The batch shift test's verdict on the site's images
        (:meth:`medtune.evaluation.shift.BatchShiftTest.test`); ``None`` when not tested.
    labelled : int, default 0
        Labelled images of the site the point was moved on (``medtune adapt --labels``).
    method : str, default "none"
        The label-free method that moved it (:data:`LABEL_FREE_METHODS`).
    sample : dict or None, default None
        :func:`random_sample_check` of the labelled sample against the site's images.

    Returns
    -------
    dict
        ``validated`` (bool) and ``status``: :data:`NOT_VALIDATED` for a shifted (or untested)
        site calibrated on no labels, whatever the label-free method, and for points moved on
        a labelled sample that is not a random sample of the site.
    """
    if labelled > 0 and sample is not None and not sample["random"]:
        why = (
            f"moved on {labelled} labelled images that are not a random sample of this site, "
            f"KS p = {sample['p_value']:.2g}: label a random sample"
        )
        return {"validated": False, "status": f"{NOT_VALIDATED} ({why})"}
    if labelled > 0:
        return {"validated": True, "status": f"moved on {labelled} labelled images of this site"}
    if shifted is False and method == "none":
        return {"validated": True, "status": "site consistent with validation"}
    how = "" if method == "none" else f" (moved without labels: {method})"
    return {"validated": False, "status": NOT_VALIDATED + how}


def referral_validation(
    points: OperatingPoints | None,
    verdict: dict[str, Any] | None,
    *,
    n_images: int,
    testable: bool,
    min_batch: int,
) -> dict[str, str] | None:
    """Whether the referrals of one batch of images were made at an operating point validated
    for where the batch comes from: the ``operating_point_validated`` and
    ``operating_point_status`` columns of ``medtune predict`` and the page
    (:func:`medtune.evaluation.referral.mark_referrals`).

    The referral itself never changes (it still follows the threshold); a referral whose
    validated sensitivity may not hold is marked, never silently kept.

    Parameters
    ----------
    points : OperatingPoints or None
        The operating points used (``ModelCard.operating_points``; their ``validated`` and
        ``status`` say whether ``medtune adapt`` calibrated them at a site).
    verdict : dict or None
        :meth:`medtune.evaluation.shift.BatchShiftTest.test` of the batch, ``None`` when it was
        not tested.
    n_images : int
        Images in the batch (named in the status of a tested batch).
    testable : bool
        Whether the model has a batch shift test (``batch_shift.npz``).
    min_batch : int
        The fewest patients tested (:data:`medtune.evaluation.shift.MIN_BATCH`; an image of
        an unknown patient counts as one).

    Returns
    -------
    dict or None
        ``validated`` (``"yes"``, ``"no"`` or ``"unknown"``) and ``status`` (why, one line);
        ``None`` when there is nothing to say (no operating points, or a model with neither a
        status nor a batch test).

    Notes
    -----
    In order: points marked not validated by ``adapt`` (moved without labels, or kept at a
    shifted site) are ``no``; points moved on labels of the site are ``yes``; else the batch
    test decides (``no`` when shifted: :data:`NOT_VALIDATED`); an untested batch is
    ``unknown``.
    """
    from medtune.evaluation.shift import batch_words

    if points is None:
        return None
    if points.validated is not None and points.status:
        return {"validated": "yes" if points.validated else "no", "status": points.status}
    if verdict is not None:
        p = f"p = {verdict['p_value']:.2g}"
        of = batch_words(n_images, verdict.get("n_patients"))
        if verdict["shifted"]:
            why = f"this batch of {of} differs from every validation site, {p}"
            return {"validated": "no", "status": f"{NOT_VALIDATED} ({why})"}
        why = f"this batch of {of} is consistent with {verdict['closest']}, {p}"
        return {"validated": "yes", "status": why}
    if not testable:
        return None
    return {  # the count is left out: every request of a growing running batch reads the same
        "validated": "unknown",
        "status": (
            f"not tested: the batch shift test needs images of at least {min_batch} patients"
        ),
    }


def score_label_free_points(
    y: np.ndarray,
    probs: np.ndarray,
    operating_points: OperatingPoints | None,
    tta: str = "none",
    groups: Any = None,
) -> dict[str, Any] | None:
    """Sensitivity and specificity, with Wilson 95% intervals, at operating points that were
    moved without labels (``model.json`` of a ``medtune adapt --recalibrate`` run).

    Parameters
    ----------
    y : ndarray of int, shape (N,)
        Class labels of the evaluated images.
    probs : ndarray, shape (N, K)
        Their calibrated probabilities.
    operating_points : OperatingPoints or None
        ``ModelCard.operating_points``; only points marked ``label_free`` are scored.
    tta : str, default "none"
        Which TTA mode's points.
    groups : sequence, optional
        Patient ids (clustered intervals).

    Returns
    -------
    dict or None
        ``{name: {"threshold", "sensitivity", "specificity", "sensitivity_ci",
        "specificity_ci", "tp", "fp", "tn", "fn", ...}}`` plus ``method`` and ``status``;
        ``None`` when the points were not moved without labels.
    """
    from medtune.evaluation.intervals import proportion_ci
    from medtune.evaluation.labels import BinaryTask
    from medtune.evaluation.operating_points import apply_operating_point

    ops = operating_points
    points = None if ops is None else ops.points.get(tta)
    if ops is None or not ops.label_free or not points:
        return None
    task = BinaryTask(ops.name, ops.positive_classes, "")
    y_bin, score = task.labels(y) == 1, task.score(probs)
    g = None if groups is None else np.asarray([str(x) for x in groups])
    out: dict[str, Any] = {"method": ops.label_free, "status": ops.status}
    for name, point in points.items():
        hit = score >= float(point.threshold)
        out[name] = {
            "threshold": float(point.threshold),
            **apply_operating_point(y_bin.astype(int), score, float(point.threshold)),
            "sensitivity_ci": proportion_ci(hit[y_bin], None if g is None else g[y_bin]),
            "specificity_ci": proportion_ci(~hit[~y_bin], None if g is None else g[~y_bin]),
        }
    return out
