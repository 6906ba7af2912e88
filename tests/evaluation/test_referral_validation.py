"""Whether a batch's referrals are at a validated operating point, and the columns that say so."""

from __future__ import annotations

import dataclasses

import numpy as np

from medtune.evaluation.card import OperatingPoints
from medtune.evaluation.label_free import NOT_VALIDATED, referral_validation
from medtune.evaluation.labels import LabelSpace
from medtune.evaluation.referral import ReferralRule, build_rows, mark_referrals

POINTS = OperatingPoints.from_dict(
    {"name": "referable DR", "positive_classes": [2, 3, 4],
     "points": {"none": {"sens90": {"threshold": 0.3}}}}
)  # fmt: skip
SHIFTED = {"shifted": True, "p_value": 1e-6, "closest": "validation (all sites)"}
CONSISTENT = {"shifted": False, "p_value": 0.4, "closest": "APTOS"}


def _check(points=POINTS, verdict=None, testable=True):
    return referral_validation(points, verdict, n_images=30, testable=testable, min_batch=20)


def test_the_batch_test_decides_unless_adapt_calibrated_the_points():
    no = _check(verdict=SHIFTED)
    assert no["validated"] == "no" and no["status"].startswith(NOT_VALIDATED)
    assert "30 images" in no["status"]
    yes = _check(verdict=CONSISTENT)
    assert yes["validated"] == "yes" and "APTOS" in yes["status"]
    assert _check()["validated"] == "unknown"  # too few images to test
    assert _check(testable=False) is None  # no test, no status: nothing to say
    assert _check(points=None, verdict=SHIFTED) is None  # no operating point, no referral
    labelled = dataclasses.replace(POINTS, validated=True, status="moved on 60 labelled images")
    assert _check(labelled, SHIFTED) == {"validated": "yes", "status": labelled.status}
    moved = dataclasses.replace(POINTS, validated=False, status=NOT_VALIDATED + " (quantile)")
    assert _check(moved, CONSISTENT)["validated"] == "no"  # label-free stays unvalidated


def test_mark_referrals_adds_the_columns_after_refer_and_never_changes_the_decision():
    space = LabelSpace.of(["0", "1", "2", "3", "4"])
    probs = np.array([[0.9, 0.05, 0.05, 0, 0], [0.1, 0.1, 0.6, 0.1, 0.1], [0.2] * 5])
    rule = ReferralRule("referable DR", (2, 3, 4), "sens90", 0.3)
    quality = [(True, None), (True, None), (False, "too dark")]
    rows = build_rows(["a", "b", "c"], probs, probs.argmax(1), space, None, rule, quality)
    marked = mark_referrals(rows, _check(verdict=SHIFTED))
    assert [r["refer"] for r in marked] == [r.refer for r in rows] == ["no", "yes", "ungradable"]
    keys = list(marked[0])
    assert keys[keys.index("refer") + 1 : keys.index("refer") + 3] == [
        "operating_point_validated",
        "operating_point_status",
    ]
    assert [r["operating_point_validated"] for r in marked] == ["no", "no", ""]
    again = mark_referrals(marked, _check(verdict=CONSISTENT))  # dicts too, once
    assert [r["operating_point_validated"] for r in again] == ["yes", "yes", ""]
    assert list(again[0]) == keys
    assert mark_referrals(rows, None) == [r.as_dict() for r in rows]
