"""Calibration (ECE, reliability data, temperature scaling) and ordinal decoding."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import cohen_kappa_score

from medtune.errors import MedtuneError
from medtune.evaluation.calibration import (
    apply_temperature,
    expected_calibration_error,
    fit_temperature,
    nll,
    reliability_curve,
)
from medtune.evaluation.decoding import (
    choose_decoding,
    decode,
    decode_scores,
    expected_grade,
    fit_qwk_thresholds,
)


def _qwk(y: np.ndarray, pred: np.ndarray) -> float:
    return cohen_kappa_score(y, pred, weights="quadratic", labels=range(5))


# ---------------------------------------------------------------- calibration


def test_ece_near_zero_for_calibrated_and_large_for_overconfident() -> None:
    rng = np.random.default_rng(0)
    p1 = rng.uniform(size=20000)
    y = (rng.uniform(size=p1.size) < p1).astype(int)  # label drawn from the stated probability
    probs = np.stack([1 - p1, p1], axis=1)
    assert expected_calibration_error(probs, y) < 0.02
    sharp = softmax(np.log(probs + 1e-12) * 4, axis=1)
    assert expected_calibration_error(sharp, y) > 0.1


def test_reliability_curve_bins() -> None:
    probs = np.array([[0.95, 0.05], [0.55, 0.45], [0.6, 0.4], [0.2, 0.8]])
    y = np.array([0, 1, 0, 1])
    c = reliability_curve(probs, y, n_bins=10)
    assert sum(c["count"]) == 4 and len(c["bin_edges"]) == 11
    assert c["count"][5] == 2 and c["accuracy"][5] == 0.5
    assert c["confidence"][5] == pytest.approx(0.575) and c["confidence"][0] is None
    expected = (abs(0.5 - 0.575) * 2 + abs(1 - 0.8) + abs(1 - 0.95)) / 4
    assert c["ece"] == pytest.approx(expected)


def test_temperature_recovers_known_value() -> None:
    rng = np.random.default_rng(1)
    z = rng.normal(scale=2.0, size=(6000, 5))  # true logits
    y = np.array([rng.choice(5, p=p) for p in softmax(z, axis=1)])
    T0 = 2.5
    overconfident = z * T0  # a model whose logits are T0 times too large
    t_fit = fit_temperature(overconfident, y)
    assert t_fit == pytest.approx(T0, rel=0.08)
    assert nll(overconfident, y, t_fit) < nll(overconfident, y, 1.0)
    probs = apply_temperature(overconfident, t_fit)
    assert np.allclose(probs.sum(1), 1) and (probs.argmax(1) == z.argmax(1)).all()


# ---------------------------------------------------------------- ordinal


def _shifted_case(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities whose argmax is almost always grade 0 but whose expected grade rises with the
    true grade: a miscalibrated but informative model."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 5, n)
    probs = np.full((n, 5), 0.15 / 5)
    probs[:, 0] += 0.45
    probs[np.arange(n), y] += 0.4
    probs = probs + rng.uniform(0, 0.02, probs.shape)
    return y, probs / probs.sum(1, keepdims=True)


def test_expected_grade_and_decode() -> None:
    probs = np.array([[0.1, 0.2, 0.4, 0.2, 0.1], [0.9, 0.1, 0, 0, 0]])
    assert expected_grade(probs) == pytest.approx([2.0, 0.1])
    assert decode(probs, {"method": "argmax"}).tolist() == [2, 0]
    assert decode(probs, None).tolist() == [2, 0]
    eg = {"method": "expected_grade", "thresholds": [0.05, 1.5, 2.5, 3.5]}
    assert decode(probs, eg).tolist() == [2, 1]
    assert decode_scores(np.array([0.5, 0.49, 3.6]), [0.5, 1.5, 2.5, 3.5]).tolist() == [1, 0, 4]
    with pytest.raises(MedtuneError, match="unknown decoding"):
        decode(probs, {"method": "median"})
    with pytest.raises(MedtuneError, match="thresholds"):
        decode(probs, {"method": "expected_grade", "thresholds": [1.0]})


def test_qwk_thresholds_beat_argmax() -> None:
    y, probs = _shifted_case(400, seed=2)
    scores = expected_grade(probs)
    t = fit_qwk_thresholds(scores, y, 5)
    assert len(t) == 4 and all(a < b for a, b in zip(t[:-1], t[1:], strict=True))
    q_fit = _qwk(y, decode_scores(scores, t))
    q_arg = _qwk(y, probs.argmax(1))
    q_round = _qwk(y, decode_scores(scores, [0.5, 1.5, 2.5, 3.5]))
    assert q_fit > q_arg + 0.3 and q_fit >= q_round
    # the fitted cuts generalise to fresh data from the same model
    y2, p2 = _shifted_case(400, seed=3)
    assert _qwk(y2, decode_scores(expected_grade(p2), t)) > _qwk(y2, p2.argmax(1)) + 0.3


def test_choose_decoding_records_both_scores() -> None:
    y, probs = _shifted_case(300, seed=4)
    d = choose_decoding(y, probs, 5)
    assert d["method"] == "expected_grade" and len(d["thresholds"]) == 4
    assert set(d["val_qwk"]) == {"argmax", "expected_grade", "expected_grade_cv"}
    assert d["val_qwk"]["expected_grade_cv"] > d["val_qwk"]["argmax"]
    pred = decode(probs, d)
    assert _qwk(y, pred) == pytest.approx(d["val_qwk"]["expected_grade"])


def test_choose_decoding_keeps_argmax_for_a_sharp_model() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 5, 200)
    probs = np.full((200, 5), 0.01)
    probs[np.arange(200), y] = 0.96
    d = choose_decoding(y, probs, 5)
    assert d["method"] == "argmax" and d["val_qwk"]["argmax"] == pytest.approx(1.0)
