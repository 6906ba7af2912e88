"""LogME, NCE, LEEP, prediction entropy, and the strategy advisor's decisions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.optimize import minimize
from scipy.stats import multivariate_normal

from medtune.transfer.advisor import Advice, SimilarityEvidence, decide, format_table
from medtune.transfer.transferability import (
    leep,
    logme,
    mean_max_probability,
    mean_prediction_entropy,
    nce,
)

# ---------------------------------------------------------------------------------- LogME


def _linear_features(n: int, d: int, k: int, noise: float, seed: int):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    F = np.eye(k)[y] @ rng.normal(size=(k, d)) + noise * rng.normal(size=(n, d))
    return F, y, rng


def test_logme_prefers_label_related_features() -> None:
    F, y, rng = _linear_features(300, 20, 3, 1.0, seed=0)
    informative = logme(F, y)
    assert np.isfinite(informative)
    assert informative > logme(rng.normal(size=F.shape), y) + 0.5
    assert informative > logme(F, rng.permutation(y)) + 0.5


def _brute_force_evidence(F: np.ndarray, target: np.ndarray) -> float:
    """max over alpha, beta of log N(target; 0, F F^T / alpha + I / beta), per sample."""

    def neg(log_ab: np.ndarray) -> float:
        alpha, beta = np.exp(log_ab)
        cov = F @ F.T / alpha + np.eye(len(F)) / beta
        return -multivariate_normal(np.zeros(len(F)), cov).logpdf(target)

    best = minimize(
        neg,
        x0=np.zeros(2),
        method="Nelder-Mead",
        options={"xatol": 1e-8, "fatol": 1e-10, "maxiter": 2000},
    )
    return -best.fun / len(F)


@pytest.mark.parametrize(("n", "d"), [(40, 6), (12, 30)])
def test_logme_equals_directly_maximised_marginal_likelihood(n: int, d: int) -> None:
    F, y, _ = _linear_features(n, d, 2, 0.8, seed=1)
    expected = np.mean([_brute_force_evidence(F, (y == c).astype(float)) for c in (0, 1)])
    assert logme(F, y) == pytest.approx(expected, abs=1e-4)


@pytest.mark.parametrize(("n", "d"), [(80, 30), (30, 80)])
def test_logme_gram_sides_agree(n: int, d: int) -> None:
    F, y, _ = _linear_features(n, d, 4, 1.0, seed=2)
    a, b = logme(F, y, side="features"), logme(F, y, side="samples")
    assert a == pytest.approx(b, abs=1e-8)


def test_logme_invariances() -> None:
    F, y, rng = _linear_features(150, 10, 3, 1.0, seed=3)
    base = logme(F, y)
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    assert logme(F @ q, y) == pytest.approx(base, abs=1e-6)  # orthogonal rotation of features
    assert logme(25.0 * F, y) == pytest.approx(base, abs=1e-5)  # alpha absorbs a global scale
    padded = np.hstack([F, np.zeros((150, 4))])
    assert logme(padded, y) == pytest.approx(base, abs=1e-8)  # dead (all-zero) channels
    assert logme(F, y + 10) == pytest.approx(base)  # only the partition of labels matters


# ----------------------------------------------------------------------------- NCE / LEEP


def test_nce_by_hand() -> None:
    y = np.array([0, 0, 1, 1])
    assert nce(np.array([5, 5, 9, 9]), y) == pytest.approx(0.0)  # Z determines Y
    assert nce(np.array([5, 9, 5, 9]), y) == pytest.approx(-np.log(2))  # independent: -H(Y)
    # Z=a: Y = 0,0,1 ; Z=b: Y = 1  ->  -H(Y|Z) = 3/4 * (2/3 ln 2/3 + 1/3 ln 1/3)
    z = np.array([1, 1, 1, 2])
    expected = 0.75 * (2 / 3 * np.log(2 / 3) + 1 / 3 * np.log(1 / 3))
    assert nce(z, np.array([0, 0, 1, 1])) == pytest.approx(expected)


def test_leep_by_hand() -> None:
    theta = np.array([[0.8, 0.2], [0.2, 0.8]])
    # P(y,z) = [[.4,.1],[.1,.4]], P(z) = [.5,.5], P(y|z) = [[.8,.2],[.2,.8]];
    # each image: .8*.8 + .2*.2 = .68
    assert leep(theta, np.array([0, 1])) == pytest.approx(np.log(0.68))


def test_leep_with_hard_predictions_equals_nce() -> None:
    rng = np.random.default_rng(4)
    z = rng.integers(0, 6, 50)
    y = rng.integers(0, 3, 50)
    assert leep(np.eye(6)[z], y) == pytest.approx(nce(z, y))


def test_prediction_entropy() -> None:
    uniform = np.full((3, 1000), 1e-3)
    assert mean_prediction_entropy(uniform) == pytest.approx(np.log(1000))
    assert mean_prediction_entropy(uniform, normalise=True) == pytest.approx(1.0)
    probs = np.array([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0]])
    assert mean_prediction_entropy(probs) == pytest.approx(np.log(2) / 2)
    assert mean_prediction_entropy(probs, normalise=True) == pytest.approx(0.25)
    assert mean_max_probability(probs) == pytest.approx(0.75)


# -------------------------------------------------------------------------------- advisor

SMALL = {0: 300, 1: 120, 2: 250, 3: 60, 4: 50}
LARGE = {0: 25810, 1: 2443, 2: 5292, 3: 873, 4: 708}  # Kaggle DR training grades
NATURAL = SimilarityEvidence(entropy=0.30, reference_entropy=0.28)
UNLIKE = SimilarityEvidence(
    entropy=0.62, reference_entropy=0.28, max_prob=0.08, reference_max_prob=0.55
)
# (stage, LogME, probe score) in forward order, stem first
LAST_BEST = [
    ("stem", -0.9, 0.30),
    ("s1", -0.8, 0.40),
    ("s2", -0.7, 0.50),
    ("s3", -0.6, 0.58),
    ("s4", -0.5, 0.66),
]
EARLIER_BEST = [
    ("stem", -0.9, 0.30),
    ("s1", -0.8, 0.55),
    ("s2", -0.5, 0.71),
    ("s3", -0.7, 0.71),
    ("s4", -0.6, 0.62),
]


def _check_reasons(advice: Advice) -> None:
    for key in ("size", "similarity", "scenario", "stage", "freeze", "lr"):
        assert isinstance(advice.reasons[key], str) and advice.reasons[key].endswith(".")
    json.dumps(advice.to_dict())


def test_small_similar_is_linear_probe_on_last_stage() -> None:
    adv = decide(SMALL, NATURAL, LAST_BEST, n_stages=5)
    assert (adv.scenario, adv.strategy, adv.stage) == (1, "linear-probe", "s4")
    assert adv.freeze == 5 and adv.backbone_lr_mult == 0.0
    _check_reasons(adv)


def test_large_similar_is_finetune_with_frozen_early_stages() -> None:
    adv = decide(LARGE, NATURAL, LAST_BEST, n_stages=5)
    assert (adv.scenario, adv.strategy, adv.stage) == (2, "finetune", None)
    assert adv.freeze == 2 and adv.backbone_lr_mult == pytest.approx(0.1)
    _check_reasons(adv)


def test_small_different_is_layer_probe_on_best_earlier_stage() -> None:
    adv = decide(SMALL, UNLIKE, EARLIER_BEST, n_stages=5)
    assert (adv.scenario, adv.strategy) == (3, "layer-probe")
    assert adv.stage == "s2"  # ties with s3 on probe score; higher LogME wins
    assert adv.freeze == 5
    _check_reasons(adv)


def test_large_different_is_full_finetune_with_higher_lr() -> None:
    adv = decide(LARGE, UNLIKE, EARLIER_BEST, n_stages=5)
    assert (adv.scenario, adv.strategy, adv.stage, adv.freeze) == (4, "finetune", None, 0)
    assert 0.3 <= adv.backbone_lr_mult <= 1.0
    _check_reasons(adv)


def test_inconclusive_layers_defer_to_entropy_and_conclusive_layers_win() -> None:
    flat = [("s1", -0.8, 0.60), ("s2", -0.7, 0.61), ("s3", -0.6, 0.60)]
    assert decide(SMALL, UNLIKE, flat, n_stages=3).scenario == 3
    assert decide(SMALL, NATURAL, flat, n_stages=3).scenario == 1
    assert decide(SMALL, UNLIKE, LAST_BEST, n_stages=5).scenario == 1  # last stage clearly best


def test_format_table_lists_every_stage() -> None:
    rows = {"efficientnet_lite0": [("stem", 32, -0.9, 0.3), ("s1", 24, None, 0.5)]}
    adv = decide(SMALL, NATURAL, [(s, lm, p) for s, _, lm, p in rows["efficientnet_lite0"]], 2)
    text = format_table(rows, {"efficientnet_lite0": adv})
    assert "efficientnet_lite0" in text and "stem" in text and "-0.900" in text
    assert "0.500 *<" in text
