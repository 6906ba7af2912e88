"""Operating points at the edge of the score range: saturated validation scores (issue 23.1).

A linear probe on a separable set, sharpened by a small temperature, scores every validation
positive at exactly 1.0. A threshold placed ON that score excludes a new photograph scoring
0.99999999999998: the very image it was meant to catch. Thresholds now sit in the gap below
the lowest score they keep positive, and the CSV never prints such a score as 1.000000.
"""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest

from medtune.evaluation.calibration import apply_temperature
from medtune.evaluation.labels import LabelSpace
from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.operating_points import (
    apply_operating_point,
    choose_operating_points,
    move_operating_point,
)
from medtune.evaluation.referral import ReferralRule, build_rows, format_figure
from medtune.workflows.predict import to_csv

NEARLY_ONE = 0.99999999999998  # what a saturated new positive scores in float64
DR = LabelSpace.of([str(g) for g in range(5)], ordinal=True)
REFERABLE = DR.binary_task


def _saturated(n_neg: int, n_pos: int, top_negative: float) -> tuple[np.ndarray, np.ndarray]:
    """Negatives spread up to ``top_negative``, every positive at exactly 1.0."""
    neg = np.linspace(0.0, top_negative, n_neg)
    y = np.r_[np.zeros(n_neg, int), np.ones(n_pos, int)]
    return y, np.r_[neg, np.ones(n_pos)]


@pytest.mark.parametrize("top_negative", [0.3, 0.9, 1 - 1e-6, 1 - 1e-12])
def test_saturated_positives_do_not_push_thresholds_onto_one(top_negative):
    y, score = _saturated(8, 6, top_negative)
    points = choose_operating_points(y, score)
    for name, point in points.items():
        t = point["threshold"]
        assert top_negative < t < 1.0, name  # strictly inside the gap, not on the positives
        assert t <= NEARLY_ONE, name  # a new positive scoring 1 - 2e-14 is caught
        # the validation figures the point was chosen for are unchanged
        assert point["val_sensitivity"] == 1.0 and point["val_specificity"] == 1.0
        applied = apply_operating_point(y, score, t)
        assert (applied["sensitivity"], applied["specificity"]) == (1.0, 1.0)


def test_gap_thresholds_keep_every_validation_figure_on_random_tied_scores():
    """The whole family: with ties, saturation at both ends and any mix, the threshold never
    lies on a validation score and gives exactly the figures reported for the point."""
    rng = np.random.default_rng(3)
    for trial in range(200):
        n = int(rng.integers(4, 40))
        y = rng.integers(0, 2, n)
        y[:2] = [0, 1]
        score = np.round(np.clip(rng.normal(0.3 + 0.5 * y, 0.4), 0, 1), int(rng.integers(1, 4)))
        score[rng.random(n) < 0.2] = 1.0
        for name, point in choose_operating_points(y, score).items():
            t = point["threshold"]
            applied = apply_operating_point(y, score, t)
            assert applied["sensitivity"] == pytest.approx(point["val_sensitivity"]), trial
            assert applied["specificity"] == pytest.approx(point["val_specificity"]), trial
            kept = score[score >= t]
            below = score[score < t]
            if len(below):  # strictly between the scores on either side (midpoint of the gap)
                assert t == pytest.approx((kept.min() + below.max()) / 2), (trial, name)


def test_sharp_temperature_on_a_separable_probe_still_refers_new_positives():
    """End to end: validation logits of a separable set at temperature 0.12 (probabilities
    saturate), the sens90 point from compute_metrics, and new referable photographs whose
    P(referable) is 1 - 2e-14: every one is referred and the CSV shows it is not 1."""
    rng = np.random.default_rng(0)
    y_val = np.repeat(np.arange(5), 6)
    logits = -10.0 * (np.arange(5)[None, :] - y_val[:, None]) ** 2 + rng.normal(0, 0.1, (30, 5))
    p_val = apply_temperature(logits, 0.12)
    assert REFERABLE.score(p_val)[y_val >= 2].min() == 1.0  # the validation positives saturate
    m = compute_metrics(y_val, p_val, [str(g) for g in range(5)], val=(y_val, p_val), n_boot=20)
    point = m["operating_points"]["sens90"]
    assert point["threshold"] < NEARLY_ONE

    new = np.tile([1e-14, 1e-14, 1 - 4e-14, 1e-14, 0.0], (4, 1))  # P(referable) = 1 - 2e-14
    rule = ReferralRule("referable DR", REFERABLE.positive, "sens90", point["threshold"])
    rows = build_rows([f"eye{i}.png" for i in range(4)], new, np.full(4, 2), DR, None, rule)
    assert [r.refer for r in rows] == ["yes"] * 4
    parsed = list(csv.DictReader(io.StringIO(to_csv(rows))))
    assert all(float(r["p_referable"]) < 1.0 for r in parsed)
    assert all(r["p_referable"] != "1.000000" for r in parsed)


def test_moved_site_point_also_sits_in_the_gap():
    """``adapt --labels``: a sample whose positives saturate after refitting the temperature."""
    y = np.repeat(np.arange(5), 12)
    logits = -40.0 * (np.arange(5)[None, :] - y[:, None]) ** 2  # perfectly separable, sharp
    out = move_operating_point(
        logits, y, REFERABLE, validated_threshold=0.5, target_sensitivity=0.9
    )
    score = REFERABLE.score(apply_temperature(logits, out["temperature"]))
    assert score[y >= 2].min() == 1.0
    assert score[y < 2].max() < out["threshold"] < NEARLY_ONE
    assert out["sensitivity"] == 1.0 and out["specificity"] == 1.0


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (0.25, "0.250000"),
        (1.0, "1.000000"),
        (0.0, "0.000000"),
        (NEARLY_ONE, "0.99999999999998"),
        (1 - 1e-7, "0.9999999"),
        (3e-9, "0.000000003"),
        (1e-20, "1e-20"),
        (2.9999999, "2.9999999"),  # an expected grade just below 3 is not shown as 3
    ],
)
def test_figures_never_round_to_a_whole_number_they_are_not(value, text):
    assert format_figure(value) == text
    assert float(format_figure(value)) != round(float(format_figure(value))) or value == round(
        value
    )
