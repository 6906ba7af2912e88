"""compute_metrics against scikit-learn, operating points, and the (cluster) bootstrap."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    cohen_kappa_score,
    confusion_matrix,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)

from medtune.evaluation import metrics as M
from medtune.evaluation.decoding import decode
from medtune.evaluation.intervals import WeightedAUC, bootstrap_weights
from medtune.evaluation.labels import LabelSpace
from medtune.evaluation.metrics import compute_metrics, quick_metrics
from medtune.evaluation.operating_points import choose_operating_points
from medtune.evaluation.scores import balanced_accuracy_from_confusion, qwk_from_confusion

DR = ["0", "1", "2", "3", "4"]


def _noisy(n: int, K: int, seed: int, strength: float = 1.5) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, K, n)
    z = rng.normal(size=(n, K))
    z[np.arange(n), y] += strength
    return y, softmax(z, axis=1)


def _dr_probs(score: list[float]) -> np.ndarray:
    """5-class probabilities whose referable score P(grade >= 2) is ``score``."""
    s = np.asarray(score, dtype=np.float64)[:, None]
    return np.hstack([np.repeat((1 - s) / 2, 2, axis=1), np.repeat(s / 3, 3, axis=1)])


# ---------------------------------------------------------------- point metrics vs sklearn


def test_hand_made_case_matches_sklearn() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    probs = np.array(
        [
            [0.7, 0.2, 0.1],
            [0.5, 0.4, 0.1],
            [0.2, 0.5, 0.3],
            [0.1, 0.8, 0.1],
            [0.3, 0.4, 0.3],
            [0.6, 0.3, 0.1],
            [0.1, 0.1, 0.8],
            [0.2, 0.2, 0.6],
            [0.1, 0.5, 0.4],
            [0.3, 0.3, 0.4],
        ]
    )
    names = ["a", "b", "c"]
    m = compute_metrics(y, probs, names, n_boot=0)
    pred = probs.argmax(1)
    assert m["n"] == 10 and m["task"] == "multiclass" and m["ordinal"] is False
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred))
    auc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert m["macro_auc"] == pytest.approx(auc)
    assert m["confusion_matrix"] == confusion_matrix(y, pred).tolist()
    p, r, f, s = precision_recall_fscore_support(y, pred, zero_division=0)
    for k, name in enumerate(names):
        got = m["per_class"][name]
        assert (got["precision"], got["recall"], got["f1"]) == pytest.approx((p[k], r[k], f[k]))
        assert got["support"] == s[k]
        assert got["auc"] == pytest.approx(roc_auc_score(y == k, probs[:, k]))
    assert m["qwk"] is None and m["referable_auc"] is None and m["operating_points"] is None
    assert m["bootstrap"] is None and m["accuracy_ci"] is None


def test_qwk_and_ordinal_autodetect() -> None:
    y, probs = _noisy(200, 5, seed=1)
    m = compute_metrics(y, probs, DR, n_boot=0)
    assert m["ordinal"] is True and m["task"] == "dr_grading"
    pred = probs.argmax(1)
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert compute_metrics(y, probs, LabelSpace.of(DR, ordinal=False), n_boot=0)["qwk"] is None
    names = ["none", "mild", "moderate", "severe", "proliferative"]
    assert compute_metrics(y, probs, names, n_boot=0)["ordinal"] is False
    assert (
        compute_metrics(y, probs, LabelSpace.of(names, ordinal=True), n_boot=0)["task"]
        == "dr_grading"
    )


def test_absent_class_auc_is_null_with_note() -> None:
    y, probs = _noisy(60, 3, seed=2)
    y[y == 2] = 0
    m = compute_metrics(y, probs, ["x", "y", "z"], n_boot=50)
    assert m["per_class"]["z"]["auc"] is None
    expected = np.mean([roc_auc_score(y == k, probs[:, k]) for k in (0, 1)])
    assert m["macro_auc"] == pytest.approx(expected)
    assert any("'z'" in n for n in m["notes"])
    json.dumps(m, allow_nan=False)


def test_decoding_drives_predictions() -> None:
    y, probs = _noisy(100, 5, seed=3, strength=0.8)
    dec = {"method": "expected_grade", "thresholds": [0.7, 1.6, 2.4, 3.3]}
    m = compute_metrics(y, probs, DR, decoding=dec, n_boot=0)
    pred = decode(probs, dec)
    assert m["confusion_matrix"] == confusion_matrix(y, pred, labels=range(5)).tolist()
    assert m["qwk"] == pytest.approx(cohen_kappa_score(y, pred, weights="quadratic"))
    assert m["prediction"]["method"] == "expected_grade"


def test_rejects_logits_and_bad_shapes() -> None:
    y, probs = _noisy(20, 3, seed=4)
    with pytest.raises(ValueError, match="probabilities"):
        compute_metrics(y, np.log(probs), ["a", "b", "c"], n_boot=0)
    with pytest.raises(ValueError, match="shape"):
        compute_metrics(y, probs, ["a", "b"], n_boot=0)


def test_keys_are_stable_and_json_safe() -> None:
    y2, p2 = _noisy(80, 2, seed=5)
    y3, p3 = _noisy(80, 3, seed=5)
    y5, p5 = _noisy(80, 5, seed=5)
    ms = [
        compute_metrics(y2, p2, ["neg", "pos"], n_boot=20),
        compute_metrics(y3, p3, ["a", "b", "c"], n_boot=20),
        compute_metrics(y5, p5, DR, n_boot=20),
    ]
    assert {frozenset(m) for m in ms} == {frozenset(ms[0])}
    for m in ms:
        json.dumps(m, allow_nan=False)
        for key in M.HEADLINE:
            assert key in m and f"{key}_ci" in m


def test_quick_metrics() -> None:
    y, probs = _noisy(50, 5, seed=6)
    q = quick_metrics(y, probs, ordinal=True)
    assert q["qwk"] == pytest.approx(cohen_kappa_score(y, probs.argmax(1), weights="quadratic"))
    assert q["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, probs.argmax(1)))
    assert "qwk" not in quick_metrics(y, probs, ordinal=False)


# ---------------------------------------------------------------- operating points


def test_validation_thresholds_are_applied_unchanged_to_test() -> None:
    # validation: Youden's J ties at 0.6 and 0.35 -> the higher point, keeping scores >= 0.6;
    # its threshold sits mid-gap between 0.6 and the next lower score 0.4: 0.5
    y_val = np.array([0, 1, 0, 1, 2, 3, 4, 2])
    s_val = [0.1, 0.2, 0.3, 0.4, 0.35, 0.6, 0.7, 0.8]
    # test: perfectly separable at 0.7, so re-choosing on test would give a different threshold
    y_te = np.array([0, 1, 0, 1, 2, 3, 4, 2])
    s_te = [0.45, 0.55, 0.48, 0.65, 0.7, 0.75, 0.8, 0.9]
    p_val, p_te = _dr_probs(s_val), _dr_probs(s_te)
    m = compute_metrics(y_te, p_te, DR, val=(y_val, p_val), n_boot=0)
    yd = m["operating_points"]["youden"]
    assert m["thresholds_from"] == "validation"
    assert yd["threshold"] == pytest.approx(0.5)
    assert (yd["sensitivity"], yd["specificity"]) == (1.0, 0.5)
    assert m["referable_sensitivity"] == 1.0 and m["referable_specificity"] == 0.5
    assert (yd["tp"], yd["fp"], yd["tn"], yd["fn"]) == (4, 2, 2, 0)
    # the optimistic same-data choice differs
    same = compute_metrics(y_te, p_te, DR, n_boot=0)
    assert same["thresholds_from"] == "same data (optimistic)"
    assert same["operating_points"]["youden"]["threshold"] == pytest.approx((0.65 + 0.7) / 2)
    assert same["referable_specificity"] == 1.0


def test_sensitivity_targets_on_validation() -> None:
    rng = np.random.default_rng(7)
    y = rng.integers(0, 2, 400)
    score = np.clip(0.5 * y + rng.normal(0.25, 0.2, 400), 0, 1)
    pts = choose_operating_points(y, score)
    assert pts["sens90"]["val_sensitivity"] >= 0.9
    assert pts["sens97.5"]["val_sensitivity"] >= 0.975
    assert pts["sens97.5"]["threshold"] <= pts["sens90"]["threshold"]
    pred = (score >= pts["youden"]["threshold"]).astype(int)
    j = recall_score(y, pred) + recall_score(y, pred, pos_label=0) - 1
    assert pts["youden"]["val_sensitivity"] + pts["youden"]["val_specificity"] - 1 == j
    every = score[None, :] >= np.unique(score)[:, None]  # one row per candidate threshold
    j_all = every[:, y == 1].mean(1) + (~every[:, y == 0]).mean(1) - 1
    assert j_all.max() <= j + 1e-12


def test_binary_task_uses_positive_class() -> None:
    y_val, p_val = _noisy(150, 2, seed=8, strength=1.0)
    y, p = _noisy(150, 2, seed=9, strength=1.0)
    m = compute_metrics(y, p, ["healthy", "disease"], val=(y_val, p_val), n_boot=100)
    assert m["task"] == "binary" and m["referable_auc"] is None
    assert m["auc"] == pytest.approx(roc_auc_score(y, p[:, 1]))
    thr = choose_operating_points(y_val, p_val[:, 1])["youden"]["threshold"]
    pred = (p[:, 1] >= thr).astype(int)
    assert m["sensitivity"] == pytest.approx(recall_score(y, pred))
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0))
    assert set(m["operating_points"]) == {"sens90", "sens97.5", "youden"}
    assert "referred_by_class" not in m["operating_points"]["youden"]  # it IS sens/spec


def test_referred_by_grade_counts_each_grade_at_the_validated_threshold() -> None:
    # validation: grades 0-1 score 0.1-0.3, grades 2-4 score 0.6-0.8, so every point's
    # threshold lies between 0.3 and 0.6
    y_val = np.array([0, 0, 1, 1, 2, 2, 3, 3, 4, 4])
    s_val = [0.1, 0.2, 0.25, 0.3, 0.6, 0.65, 0.7, 0.75, 0.8, 0.8]
    # test: one grade-0 image above the cut, one grade-2 below, grade 3 all caught, no grade 1
    y = np.array([0, 0, 0, 2, 2, 3, 3, 4])
    s = [0.05, 0.1, 0.9, 0.2, 0.7, 0.9, 0.95, 0.1]
    groups = ["a", "a", "b", "c", "d", "e", "e", "f"]
    m = compute_metrics(y, _dr_probs(s), DR, val=(y_val, _dr_probs(s_val)), groups=groups, n_boot=0)
    by = m["operating_points"]["sens90"]["referred_by_class"]
    assert {g: (d["referred"], d["n"]) for g, d in by.items()} == {
        "0": (1, 3), "1": (0, 0), "2": (1, 2), "3": (2, 2), "4": (0, 1)
    }  # fmt: skip
    assert by["0"]["share"] == pytest.approx(1 / 3) and by["1"]["share"] is None
    assert by["1"]["share_ci"] is None
    lo, hi = by["3"]["share_ci"]
    assert lo < 1.0 == hi  # two images of ONE patient: a wide interval, not a certainty
    # the positive grades add up to the point's sensitivity
    op = m["operating_points"]["sens90"]
    assert sum(by[g]["referred"] for g in "234") == op["tp"] and op["tp"] + op["fn"] == 5


# ---------------------------------------------------------------- bootstrap


def test_weighted_statistics_equal_sklearn_on_expanded_samples() -> None:
    y, probs = _noisy(120, 5, seed=10, strength=1.0)
    probs = np.round(probs, 2)  # create ties in the scores
    probs /= probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    w = np.random.default_rng(0).integers(0, 3, len(y)).astype(float)
    idx = np.repeat(np.arange(len(y)), w.astype(int))
    ye, pe, yhe = y[idx], probs[idx], pred[idx]
    cm = np.bincount(y * 5 + pred, weights=w, minlength=25).reshape(5, 5)
    assert balanced_accuracy_from_confusion(cm) == pytest.approx(balanced_accuracy_score(ye, yhe))
    assert qwk_from_confusion(cm) == pytest.approx(cohen_kappa_score(ye, yhe, weights="quadratic"))
    for k in range(5):
        auc = WeightedAUC(y == k, probs[:, k])
        assert auc(w) == pytest.approx(roc_auc_score(ye == k, pe[:, k]))
        assert auc(np.ones(len(y))) == pytest.approx(roc_auc_score(y == k, probs[:, k]))


def test_bootstrap_ci_contains_point_and_is_deterministic() -> None:
    y, probs = _noisy(150, 5, seed=11, strength=1.2)
    y_val, p_val = _noisy(150, 5, seed=12, strength=1.2)
    a = compute_metrics(y, probs, DR, val=(y_val, p_val), n_boot=200, seed=3)
    b = compute_metrics(y, probs, DR, val=(y_val, p_val), n_boot=200, seed=3)
    c = compute_metrics(y, probs, DR, val=(y_val, p_val), n_boot=200, seed=4)
    assert a == b
    assert a["macro_auc_ci"] != c["macro_auc_ci"]  # bootstrap (accuracy: Wilson)
    for key in M.HEADLINE:
        if a[key] is None:
            continue
        lo, hi = a[f"{key}_ci"]
        assert lo <= a[key] <= hi, key
    assert a["bootstrap"]["unit"] == "image" and a["bootstrap"]["n_boot"] == 200


def test_group_bootstrap_resamples_whole_groups() -> None:
    groups = np.repeat([f"p{i}" for i in range(12)], 3)
    for w in bootstrap_weights(len(groups), list(groups), n_boot=20, seed=0):
        assert w.sum() == len(groups)
        for g in np.unique(groups):
            assert len(np.unique(w[groups == g])) == 1


def test_cluster_bootstrap_is_wider_for_correlated_images() -> None:
    # 40 patients x 10 identical images: the effective sample size is 40, not 400
    y0, p0 = _noisy(40, 3, seed=13, strength=0.8)
    y, probs = np.repeat(y0, 10), np.repeat(p0, 10, axis=0)
    groups = np.repeat(np.arange(40), 10).tolist()
    img = compute_metrics(y, probs, ["a", "b", "c"], n_boot=300)
    grp = compute_metrics(y, probs, ["a", "b", "c"], groups=groups, n_boot=300)
    assert grp["bootstrap"]["unit"] == "group" and grp["bootstrap"]["n_units"] == 40
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(grp["accuracy_ci"]) > 2 * width(img["accuracy_ci"])
    assert grp["accuracy"] == img["accuracy"]
