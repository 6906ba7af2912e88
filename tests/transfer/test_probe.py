"""Linear probes: C selection, folded linear weights, stage ranking, cross-validated score."""

from __future__ import annotations

import numpy as np
import pytest

from medtune.errors import MedtuneError
from medtune.transfer.linear_probe import (
    cv_probe_score,
    fit_probe,
    probe_all_stages,
)


def _blobs(n: int, d: int, k: int, sep: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n)
    centres = rng.normal(size=(k, d)) * sep
    return rng.normal(size=(n, d)) + centres[y], y


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_picks_interior_C_with_best_validation_score() -> None:
    X, y = _blobs(1060, 100, 3, 0.25, seed=0)
    Cs = np.logspace(-4, 2, 7)
    res = fit_probe(X[:60], y[:60], X[60:], y[60:], Cs=Cs)
    assert res.metric == "balanced_accuracy"
    assert set(res.scores_by_C) == set(Cs)
    assert res.val_score == max(res.scores_by_C.values()) == res.scores_by_C[res.C]
    # 60 samples in 100 dimensions: neither the strongest nor the weakest penalty is best
    assert Cs[0] < res.C < Cs[-1]
    assert res.val_score > 0.7  # chance is 1/3


def test_ties_are_broken_by_log_loss_and_ordinal_uses_qwk() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, 200)
    X = rng.normal(size=(200, 5)) + 10.0 * np.eye(3, 5)[y]  # separable: many C score perfectly
    res = fit_probe(X[:100], y[:100], X[100:], y[100:], ordinal=True, Cs=np.logspace(-2, 2, 5))
    assert res.metric == "qwk" and res.val_score == pytest.approx(1.0)
    tied = [c for c, s in res.scores_by_C.items() if s == res.val_score]
    assert len(tied) > 1
    assert res.val_log_loss == min(res.log_loss_by_C[c] for c in tied)


@pytest.mark.parametrize("k", [2, 4])
def test_linear_weights_reproduce_predict_proba(k: int) -> None:
    X, y = _blobs(240, 12, k, 0.7, seed=2)
    X = X * np.linspace(0.01, 50, 12) + np.linspace(-100, 100, 12)  # raw, unstandardised scale
    X[:, 3] = 7.0  # a constant feature must not break the folding
    res = fit_probe(X[:160], y[:160], X[160:], y[160:], Cs=[0.01, 1.0])
    W, b = res.to_linear_weights()
    assert W.shape == (k, 12) and b.shape == (k,)
    np.testing.assert_allclose(_softmax(X @ W.T + b), res.predict_proba(X), atol=1e-10)
    np.testing.assert_array_equal(res.coef_, W)
    np.testing.assert_array_equal(res.predict(X), res.classes[np.argmax(X @ W.T + b, axis=1)])


def test_rotation_augmented_rows_fit_one_probe() -> None:
    X, y = _blobs(120, 6, 3, 1.0, seed=3)
    rotated = [X + 0.01 * r for r in range(4)]  # stand-in for 4 rotations' features
    res = fit_probe(np.vstack(rotated), np.tile(y, 4), X, y, Cs=[1.0])
    probs = res.predict_proba(X)
    assert probs.shape == (120, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0)
    assert (res.predict(X) == y).mean() > 0.8


def test_probe_all_stages_ranks_informative_stage_first() -> None:
    X, y = _blobs(200, 8, 3, 1.5, seed=4)
    noise = np.random.default_rng(5).normal(size=(200, 16))
    ranked = probe_all_stages(
        {"noise": (noise[:120], noise[120:]), "informative": (X[:120], X[120:])},
        y[:120],
        y[120:],
        Cs=[0.01, 1.0],
    )
    assert [stage for stage, _ in ranked] == ["informative", "noise"]
    assert ranked[0][1].val_score > ranked[1][1].val_score + 0.2


def test_cv_probe_score_is_group_aware_and_informative() -> None:
    X, y = _blobs(90, 5, 2, 1.5, seed=6)
    groups = np.repeat(np.arange(45), 2)  # two images per "patient"
    y = y[::2].repeat(2)
    X = X + np.eye(2)[y] @ np.random.default_rng(7).normal(size=(2, 5)) * 2
    noise = np.random.default_rng(8).normal(size=(90, 5))
    good = cv_probe_score(X, y, groups=groups, folds=3, Cs=[0.1, 1.0])
    bad = cv_probe_score(noise, y, groups=groups, folds=3, Cs=[0.1, 1.0])
    assert good > 0.8 and good > bad + 0.2


def test_single_class_training_split_is_a_user_error() -> None:
    X = np.random.default_rng(0).normal(size=(10, 3))
    with pytest.raises(MedtuneError):
        fit_probe(X, np.zeros(10, int), X, np.zeros(10, int))
