"""Eyes and patients from image rows: per-eye max over gradable images, patient rules, and the
patient-level figures with Wilson intervals."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.stats import binomtest

from medtune.data.laterality import ImageEye
from medtune.errors import MedtuneError
from medtune.evaluation.patients import (
    INSUFFICIENT,
    aggregate_eyes,
    aggregate_patient,
    aggregate_patients,
    patient_metrics,
)

NAMES = ("No DR", "Mild NPDR", "Moderate NPDR", "Severe NPDR", "Proliferative DR")


def row(image: str, grade: int, p_ref: float, *, ok: bool = True, threshold: float = 0.5) -> dict:
    """An image row as medtune predict writes it."""
    return {
        "image": image,
        "quality": "gradable" if ok else "ungradable",
        "quality_reason": "" if ok else "out of focus",
        "grade": grade,
        "grade_name": NAMES[grade],
        "p_referable": p_ref,
        "refer": ("yes" if p_ref >= threshold else "no") if ok else "ungradable",
    }


def test_eye_takes_the_highest_grade_of_its_gradable_images_only() -> None:
    rows = [
        row("a1", 1, 0.2),
        row("a2", 0, 0.1),
        row("a3", 4, 0.99, ok=False),  # ungradable: its grade never counts
    ]
    (eye,) = aggregate_eyes(rows, [("p1", "right")] * 3)
    assert (eye.grade, eye.grade_name, eye.refer) == (1, "Mild NPDR", "no")
    assert eye.p_referable == pytest.approx(0.2)
    assert eye.n_gradable == 2 and eye.images == ("a1", "a2", "a3")
    assert eye.quality_reasons == ("out of focus",)


def test_eye_is_referred_when_any_gradable_image_is() -> None:
    rows = [row("b1", 0, 0.1), row("b2", 2, 0.7)]
    (eye,) = aggregate_eyes(rows, [("p1", "left"), ("p1", "left")])
    assert eye.refer == "yes" and eye.grade == 2 and eye.p_referable == pytest.approx(0.7)


def test_eye_without_gradable_image_is_ungradable() -> None:
    rows = [row("c1", 3, 0.9, ok=False), row("c2", 0, 0.1, ok=False)]
    (eye,) = aggregate_eyes(rows, [("p1", "left")] * 2)
    assert eye.quality == "ungradable" and not eye.graded
    assert eye.grade is None and eye.p_referable is None and eye.refer == "ungradable"
    assert eye.to_dict()["grade"] is None


def test_rows_are_grouped_by_patient_and_eye_in_order() -> None:
    rows = [row(f"i{k}", 0, 0.1) for k in range(6)]
    eyes = [
        ImageEye("B", "left"),
        ImageEye("A", "right"),
        ImageEye("B", "right"),
        ImageEye(None, None),  # no patient: left out
        ImageEye("A", None),  # laterality unknown: its own eye
        ImageEye("B", "left"),
    ]
    out = aggregate_eyes(rows, eyes)
    assert [(e.patient_id, e.eye, e.images) for e in out] == [
        ("B", "right", ("i2",)),
        ("B", "left", ("i0", "i5")),
        ("A", "right", ("i1",)),
        ("A", "unknown", ("i4",)),
    ]


def test_patient_and_eye_may_come_from_the_rows_themselves() -> None:
    rows = [
        dict(row("x", 2, 0.8), patient_id="9", eye="OS"),
        dict(row("y", 0, 0.1), patient_id="9", eye="R"),
        dict(row("z", 0, 0.1), patient_id="9", eye="OU"),  # no single eye
    ]
    (patient,) = aggregate_patients(rows)
    assert patient.patient_id == "9" and patient.refer == "yes"
    assert [e.eye for e in patient.eyes] == ["right", "left", "unknown"]
    assert patient.reason == "referable in the left eye"


def _patient(left: list[dict] | None, right: list[dict] | None, rule: str = "either-eye"):
    rows, eyes = [], []
    for side, images in (("left", left), ("right", right)):
        for r in images or []:
            rows.append(r)
            eyes.append(("p", side))
    return aggregate_patient(aggregate_eyes(rows, eyes), rule)


def test_patient_is_referred_when_either_eye_is_referable() -> None:
    p = _patient([row("l", 0, 0.1)], [row("r", 3, 0.9)])
    assert p.refer == "yes" and p.grade == 3 and p.grade_name == "Severe NPDR"
    assert p.to_dict()["right_refer"] == "yes" and p.to_dict()["left_refer"] == "no"
    # one ungradable eye does not stop a referral from the other, under either rule
    for rule in ("either-eye", "both-eyes"):
        assert _patient([row("l", 0, 0.1, ok=False)], [row("r", 2, 0.8)], rule).refer == "yes"


def test_patient_with_no_gradable_eye_has_insufficient_quality() -> None:
    p = _patient([row("l", 4, 0.99, ok=False)], [row("r", 3, 0.95, ok=False)])
    assert p.refer == INSUFFICIENT and p.insufficient and p.grade is None
    assert "left eye ungradable" in p.reason and "right eye ungradable" in p.reason


def test_rules_differ_on_one_negative_eye_and_one_ungradable_eye() -> None:
    left, right = [row("l", 0, 0.1)], [row("r", 2, 0.9, ok=False)]
    assert _patient(left, right, "either-eye").refer == "no"
    both = _patient(left, right, "both-eyes")
    assert both.refer == INSUFFICIENT and both.reason == "right eye ungradable"
    assert _patient(left, None, "both-eyes").reason == "no right eye photograph"
    assert _patient(left, [row("r", 1, 0.2)], "both-eyes").refer == "no"


def test_patient_rule_errors() -> None:
    (eye,) = aggregate_eyes([row("a", 0, 0.1)], [("p", "left")])
    (other,) = aggregate_eyes([row("b", 0, 0.1)], [("q", "left")])
    with pytest.raises(MedtuneError, match="patient rule 'any' is unknown"):
        aggregate_patient([eye], "any")
    with pytest.raises(MedtuneError, match="eyes of 2 patients"):
        aggregate_patient([eye, other])
    with pytest.raises(MedtuneError, match="no eyes"):
        aggregate_patient([])


def test_no_validated_threshold_leaves_the_answer_empty() -> None:
    rows = [dict(row("a", 0, 0.1), refer="")]
    (p,) = aggregate_patients(rows, [("p", "left")])
    assert p.refer == ""


def test_patient_metrics_counts_and_wilson_intervals() -> None:
    # 6 patients x 2 eyes x 1 image; truth: patients 0-2 referable (in one eye)
    eyes = [(f"p{k}", side) for k in range(6) for side in ("right", "left")]
    positive = np.zeros(12, bool)
    positive[[0, 3, 4]] = True  # p0 right, p1 left, p2 right
    p = np.full(12, 0.1)
    p[[0, 3]] = 0.9  # p0, p1 detected
    p[10] = 0.8  # p5 falsely referred
    gradable = np.ones(12, bool)
    gradable[[4, 5]] = False  # p2: both eyes ungradable -> insufficient quality
    m = patient_metrics(eyes, positive, p, gradable, {"sens90": 0.5, "youden": 0.95})
    assert m is not None
    assert (m["n_patients"], m["n_positive"], m["n_negative"]) == (6, 3, 3)
    assert (m["n_eyes"], m["n_ungradable_eyes"]) == (12, 2)
    op = m["operating_points"]["sens90"]
    assert (op["tp"], op["fn"], op["tn"], op["fp"]) == (2, 0, 2, 1)
    assert op["n_insufficient"] == 1 and op["n_insufficient_positive"] == 1
    assert m["sensitivity"] == 1.0 and m["specificity"] == pytest.approx(2 / 3)
    assert m["imageability"] == pytest.approx(5 / 6)
    assert m["insufficient_share"] == pytest.approx(1 / 6)
    ci = binomtest(2, 2).proportion_ci(method="wilson")
    assert m["sensitivity_ci"] == pytest.approx([ci.low, ci.high])
    ci = binomtest(5, 6).proportion_ci(method="wilson")
    assert m["imageability_ci"] == pytest.approx([ci.low, ci.high])
    assert m["insufficient_share_ci"] == pytest.approx([1 - ci.high, 1 - ci.low])
    # insufficient quality counted as a referral: 3/3 positives, 2/3 negatives
    assert op["sensitivity_insufficient_referred"] == 1.0
    assert op["specificity_insufficient_referred"] == pytest.approx(2 / 3)
    strict = m["operating_points"]["youden"]  # nothing reaches 0.95
    assert (strict["tp"], strict["fp"]) == (0, 0) and strict["sensitivity"] == 0.0


def test_patient_metrics_without_patients_is_none() -> None:
    assert (
        patient_metrics([None, ImageEye(None, "left")], [0, 1], [0.1, 0.9], [1, 1], {"a": 0.5})
        is None
    )


def test_patient_metrics_both_eyes_rule_lowers_imageability() -> None:
    eyes = [("p0", "right"), ("p0", "left"), ("p1", "right"), ("p1", "left")]
    gradable = np.array([True, False, True, True])
    args = (eyes, [0, 0, 0, 0], [0.1] * 4, gradable, {"sens90": 0.5})
    assert patient_metrics(*args)["imageability"] == 1.0
    assert patient_metrics(*args, rule="both-eyes")["imageability"] == 0.5
