"""Label-free threshold transfer on made-up score shifts, and the operating point's status."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import expit

from medtune.evaluation.card import OperatingPoints
from medtune.evaluation.label_free import (
    NOT_VALIDATED,
    estimate_prevalence,
    label_free_threshold,
    operating_point_status,
    random_sample_check,
    score_label_free_points,
)
from medtune.evaluation.operating_points import choose_operating_points


def _site(n: int, prevalence: float, rng: np.random.Generator, offset: float = 0.0):
    """Labels and calibrated two-class posteriors at ``prevalence`` 0.5 (x ~ N(+-1, 1)); a new
    site's scores are the same posteriors pushed through ``logit -> logit + offset``."""
    y = (rng.random(n) < prevalence).astype(int)
    x = rng.normal(np.where(y == 1, 1.0, -1.0), 1.0)
    p = expit(2 * x + offset)  # 2x: the log-likelihood ratio of N(1,1) vs N(-1,1)
    return y, np.stack([1 - p, p], axis=1)


def _sens_spec(y, score, thr):
    hit = score >= thr
    return hit[y == 1].mean(), (~hit[y == 0]).mean()


def test_quantile_mapping_holds_sensitivity_under_a_monotone_score_shift():
    rng = np.random.default_rng(0)
    y_val, p_val = _site(4000, 0.5, rng)
    val = choose_operating_points(y_val, p_val[:, 1])["sens90"]
    y_new, p_new = _site(4000, 0.5, rng, offset=-2.5)  # every score pushed down
    stale_sens, _ = _sens_spec(y_new, p_new[:, 1], val["threshold"])
    assert stale_sens < 0.6  # the silent failure the transfer must fix
    thr = label_free_threshold(
        p_new[:, 1],
        sensitivity=val["val_sensitivity"],
        specificity=val["val_specificity"],
        prevalence=y_val.mean(),
    )
    sens, spec = _sens_spec(y_new, p_new[:, 1], thr)
    assert sens == pytest.approx(val["val_sensitivity"], abs=0.05)
    assert spec == pytest.approx(val["val_specificity"], abs=0.05)


def test_em_estimates_a_new_prevalence_and_keeps_specificity_where_quantile_does_not():
    rng = np.random.default_rng(1)
    y_val, p_val = _site(4000, 0.5, rng)
    val = choose_operating_points(y_val, p_val[:, 1])["sens90"]
    y_new, p_new = _site(4000, 0.15, rng)  # prior shift only: grade 0 dominates
    priors = np.bincount(y_val, minlength=2) / len(y_val)
    estimated = estimate_prevalence(p_new, priors)[1]
    assert estimated == pytest.approx(y_new.mean(), abs=0.03)
    kwargs = {"sensitivity": val["val_sensitivity"], "specificity": val["val_specificity"]}
    em_thr = label_free_threshold(p_new[:, 1], prevalence=estimated, **kwargs)
    sens, spec = _sens_spec(y_new, p_new[:, 1], em_thr)
    assert sens == pytest.approx(val["val_sensitivity"], abs=0.05)
    assert spec == pytest.approx(val["val_specificity"], abs=0.05)
    # assuming the validation prevalence refers far too many healthy eyes here
    q_thr = label_free_threshold(p_new[:, 1], prevalence=y_val.mean(), **kwargs)
    assert _sens_spec(y_new, p_new[:, 1], q_thr)[1] < spec - 0.2


def test_status_marks_a_shifted_site_without_labels_as_not_validated():
    assert operating_point_status(True)["status"] == NOT_VALIDATED
    moved = operating_point_status(True, method="quantile")
    assert not moved["validated"] and moved["status"].startswith(NOT_VALIDATED)
    assert operating_point_status(None)["validated"] is False
    assert operating_point_status(False)["validated"] is True
    assert operating_point_status(True, labelled=40)["validated"] is True


def test_random_samples_pass_the_sample_check_at_its_rate_and_chosen_ones_fail():
    """A random sample of a site passes about 95% of the time; the images a grader is shown
    first (the most uncertain: P(referable) nearest 0.5) fail, and their points are marked."""
    rng = np.random.default_rng(0)
    _, probs = _site(800, 0.2, rng)
    site = probs[:, 1]
    flagged = []
    for _ in range(300):
        drawn = rng.choice(len(site), 100, replace=False)
        flagged.append(not random_sample_check(site[drawn], np.delete(site, drawn))["random"])
    assert 0.02 <= np.mean(flagged) <= 0.09  # the stated 5%
    order = np.argsort(np.abs(site - 0.5))
    check = random_sample_check(site[order[:100]], site[order[100:]])
    assert not check["random"] and check["p_value"] < 1e-6
    assert (check["n_sample"], check["n_site"]) == (100, 700)
    status = operating_point_status(True, labelled=100, sample=check)
    assert status["validated"] is False and status["status"].startswith(NOT_VALIDATED)
    assert "not a random sample" in status["status"]
    passed = random_sample_check(site[:400], site)
    assert operating_point_status(True, labelled=400, sample=passed)["validated"] is True


def test_a_random_sample_of_patients_passes_when_fellow_eyes_count_once():
    """Graders label patients, both eyes: counted as independent images, a random sample of
    patients looks unlike the site far more often than 5%; counted as patients it does not."""
    rng = np.random.default_rng(3)
    n_patients = 500
    person = rng.normal(size=n_patients)  # fellow eyes share most of their score
    eyes = np.repeat(person, 2) + 0.2 * rng.normal(size=2 * n_patients)
    site, ids = 1 / (1 + np.exp(-eyes)), np.repeat([f"p{i}" for i in range(n_patients)], 2)
    naive, counted = [], []
    for _ in range(300):
        drawn = np.isin(ids, [f"p{i}" for i in rng.choice(n_patients, 60, replace=False)])
        naive.append(not random_sample_check(site[drawn], site[~drawn])["random"])
        check = random_sample_check(
            site[drawn], site[~drawn], sample_patients=ids[drawn], site_patients=ids[~drawn]
        )
        counted.append(not check["random"])
    assert np.mean(naive) >= 0.12 and np.mean(counted) <= 0.08
    assert (check["n_sample"], check["n_sample_patients"]) == (120, 60)
    assert check["n_site_patients"] == n_patients - 60


def test_label_free_points_are_scored_by_evaluate_and_others_are_not():
    rng = np.random.default_rng(2)
    y, p = _site(500, 0.3, rng)
    ops = {
        "name": "disease",
        "positive_classes": [1],
        "label_free": "quantile",
        "status": NOT_VALIDATED,
        "points": {"none": {"sens90": {"threshold": 0.4}}},
    }
    scored = score_label_free_points(y, p, OperatingPoints.from_dict(ops))
    sens, spec = _sens_spec(y, p[:, 1], 0.4)
    assert scored["sens90"]["sensitivity"] == pytest.approx(sens)
    assert scored["sens90"]["specificity"] == pytest.approx(spec)
    lo, hi = scored["sens90"]["sensitivity_ci"]
    assert lo < sens < hi and scored["status"] == NOT_VALIDATED
    plain = OperatingPoints.from_dict({**ops, "label_free": None})
    assert score_label_free_points(y, p, plain) is None
    assert score_label_free_points(y, p, OperatingPoints.from_dict(ops), tta="rot90") is None


def test_label_free_threshold_sits_in_the_gap_below_tied_and_saturated_scores():
    """The gap rule of every validated point (metrics.gap_threshold): a new image scoring a
    hair under a saturated score is referred too, and tied scores are referred together."""
    saturated = np.array([1.0, 1.0, 1.0, 0.6, 0.2, 0.1])
    thr = label_free_threshold(saturated, sensitivity=1.0, specificity=1.0, prevalence=0.5)
    assert thr == pytest.approx(0.8)  # 3 referred: between 1.0 and the next score, 0.6
    assert thr <= 1.0 - 1e-14  # was exactly 1.0: this image went unreferred
    tied = np.array([0.9, 0.7, 0.7, 0.7, 0.3, 0.3])
    thr = label_free_threshold(tied, sensitivity=0.5, specificity=1.0, prevalence=0.5)
    assert (tied >= thr).sum() == 4 and thr == pytest.approx(0.5)  # all tied 0.7s, not one
    everyone = label_free_threshold(tied, sensitivity=1.0, specificity=0.0, prevalence=0.5)
    assert everyone == 0.3 and (tied >= everyone).all()  # the lowest score: no gap below it
    same = np.full(5, 0.42)
    assert label_free_threshold(same, sensitivity=0.9, specificity=0.9, prevalence=0.2) == 0.42
