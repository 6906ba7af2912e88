"""Issue 16 item 11: transferability scores are finite or a one-line error, never a traceback."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from medtune.errors import MedtuneError
from medtune.transfer.transferability import (
    leep,
    logme,
    mean_max_probability,
    mean_prediction_entropy,
    nce,
    prediction_entropies,
)


def _duplicate_heavy(seed: int, d: int, copies: list[int], consistent: bool = True):
    """A few distinct feature rows, each copied many times (like a data set of copied images)."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(len(copies), d)) * rng.uniform(0.1, 10)
    F = np.repeat(base, copies, axis=0)
    y = np.repeat(np.arange(len(copies)) % 3, copies)
    if not consistent:
        y[:: max(1, len(y) // 7)] = (y[:: max(1, len(y) // 7)] + 1) % 3
    return F, y


@pytest.mark.parametrize(
    ("seed", "d", "copies"),
    [(0, 64, [300, 5, 3]), (1, 1280, [500, 2]), (2, 32, [40] * 5), (3, 8, [100, 1, 1, 1, 1, 1])],
)
def test_duplicate_heavy_features_give_a_finite_score(seed: int, d: int, copies: list[int]) -> None:
    F, y = _duplicate_heavy(seed, d, copies)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow / invalid-value warnings either
        scores = [logme(F, y, side=side) for side in ("auto", "features", "samples")]
    assert np.all(np.isfinite(scores))
    assert scores == pytest.approx([scores[0]] * 3, abs=1e-8)
    # a copy adds no evidence: the score is that of the distinct images
    _, first = np.unique(F, axis=0, return_index=True)
    assert scores[0] == pytest.approx(logme(F[np.sort(first)], y[np.sort(first)]), abs=1e-10)


def test_duplicates_with_conflicting_labels_stay_finite() -> None:
    F, y = _duplicate_heavy(4, 16, [60, 50, 40, 2], consistent=False)
    assert np.isfinite(logme(F, y))


@pytest.mark.parametrize("scale", [1e-200, 1e-8, 1.0, 1e8, 1e200])
def test_logme_is_invariant_to_any_global_scale(scale: float) -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 150)
    F = np.eye(3)[y] @ rng.normal(size=(3, 20)) + rng.normal(size=(150, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert logme(scale * F, y) == pytest.approx(logme(F, y), abs=1e-8)


def test_labels_exactly_linear_in_rank_deficient_features_refused_in_one_line() -> None:
    # distinct rows, but the one-hot labels are columns of F and rank 4 < 60 samples: the
    # evidence grows without bound as the noise goes to zero
    rng = np.random.default_rng(6)
    y = rng.integers(0, 3, 60)
    F = np.column_stack([np.eye(3)[y], rng.normal(size=60)])
    with pytest.raises(MedtuneError, match="unbounded") as info:
        logme(F, y)
    assert "\n" not in str(info.value)


def test_random_degenerate_inputs_never_overflow_or_nan() -> None:
    rng = np.random.default_rng(7)
    for trial in range(30):
        n_distinct = int(rng.integers(1, 8))
        d = int(rng.choice([1, 3, 50, 300]))
        copies = rng.integers(1, 80, n_distinct).tolist()
        F = np.repeat(rng.normal(size=(n_distinct, d)), copies, axis=0)
        F *= 10.0 ** rng.uniform(-100, 100)
        y = rng.integers(0, 2, len(F))
        y[:2] = [0, 1]
        try:
            value = logme(F, y)
        except MedtuneError as err:  # allowed: a one-line refusal
            assert "\n" not in str(err), trial
            continue
        assert np.isfinite(value), trial


@pytest.mark.parametrize(
    "bad",
    [
        np.array([[0.5, 0.5], [np.nan, 1.0]]),
        np.array([[0.5, 0.5], [0.0, 0.0]]),
        np.array([[1.5, -0.5], [0.2, 0.8]]),
        np.array([[0.5, 0.5], [np.inf, 0.0]]),
    ],
)
def test_probability_scores_refuse_inputs_that_would_give_nan(bad: np.ndarray) -> None:
    y = np.array([0, 1])
    for score in (
        lambda: leep(bad, y),
        lambda: mean_prediction_entropy(bad),
        lambda: mean_max_probability(bad),
        lambda: prediction_entropies(bad),
    ):
        with pytest.raises(MedtuneError) as info:
            score()
        assert "\n" not in str(info.value)


def test_probability_scores_are_finite_at_the_extremes() -> None:
    y = np.array([0, 0, 1, 1, 1])
    hard = np.eye(4)[[0, 0, 3, 3, 3]]  # one-hot: zeros everywhere else
    assert leep(hard, y) == pytest.approx(nce([0, 0, 3, 3, 3], y)) == 0.0
    assert mean_prediction_entropy(hard, normalise=True) == 0.0
    assert mean_max_probability(hard) == 1.0
    counts = np.array([[3.0, 1.0], [2.0, 2.0], [0.0, 5.0], [1.0, 1.0], [9.0, 1.0]])  # unnormalised
    assert np.isfinite(leep(counts, y)) and mean_prediction_entropy(counts, normalise=True) > 0.0
    assert nce(np.zeros(5, int), y) == pytest.approx(-(0.4 * np.log(2.5) + 0.6 * np.log(1 / 0.6)))
