"""Batch-level shift test: false alarms on same-distribution batches, power on a made-up shift."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.special import softmax

from medtune.errors import MedtuneError
from medtune.evaluation.shift import BatchShiftTest

D, K = 48, 5
_RNG = np.random.default_rng(0)
_MIX = _RNG.normal(size=(D, D)) / np.sqrt(D)  # correlated features, like pooled CNN features
_HEAD = _RNG.normal(size=(D, K))


def _site(n: int, rng: np.random.Generator, shift: float = 0.0, scale: float = 1.0):
    """Features of a site and the probabilities a fixed linear head gives them."""
    feats = (rng.normal(size=(n, D)) * scale + shift) @ _MIX
    return feats, softmax(feats @ _HEAD, axis=1)


def _alarms(test: BatchShiftTest, draw, trials: int) -> float:
    return float(np.mean([test.test(*draw())["shifted"] for _ in range(trials)]))


def test_false_alarm_rate_on_same_distribution_batches_is_at_most_alpha():
    rng = np.random.default_rng(1)
    test = BatchShiftTest.fit(*_site(400, rng), alpha=0.05)
    rate = _alarms(test, lambda: _site(100, rng), trials=200)
    assert rate <= 0.08  # stated 0.05; 200 trials leave about 0.015 of binomial noise
    verdict = test.test(*_site(100, rng))
    assert set(verdict) >= {"shifted", "p_value", "alpha", "message", "n_images"}
    assert verdict["alpha"] == 0.05 and verdict["n_images"] == 100


def test_power_on_a_made_up_shift():
    rng = np.random.default_rng(2)
    test = BatchShiftTest.fit(*_site(400, rng))
    assert _alarms(test, lambda: _site(100, rng, shift=0.4), trials=40) >= 0.9
    assert _alarms(test, lambda: _site(100, rng, scale=1.4), trials=40) >= 0.9
    verdict = test.test(*_site(100, rng, shift=0.4))
    assert verdict["shifted"] and "not validated here" in verdict["message"]


def test_a_batch_from_one_validated_site_is_not_flagged_but_a_new_site_is():
    rng = np.random.default_rng(3)
    fa, pa = _site(300, rng)
    fb, pb = _site(150, rng, shift=0.8)
    test = BatchShiftTest.fit(np.vstack([fa, fb]), np.vstack([pa, pb]), ["a"] * 300 + ["b"] * 150)
    rate_b = _alarms(test, lambda: _site(100, rng, shift=0.8), trials=60)
    assert rate_b <= 0.1  # site b alone differs from the pool, but matches its own reference
    assert test.test(*_site(100, rng, shift=0.8))["closest"] == "b"
    assert _alarms(test, lambda: _site(100, rng, shift=-0.8), trials=20) == 1.0


def test_save_load_round_trip_and_clear_errors(tmp_path):
    rng = np.random.default_rng(4)
    test = BatchShiftTest.fit(*_site(60, rng), ["s"] * 60, n_components=8, alpha=0.01)
    loaded = BatchShiftTest.load(test.save(tmp_path / "batch_shift.npz"))
    batch = _site(30, rng)
    assert loaded.test(*batch) == test.test(*batch)
    with pytest.raises(MedtuneError, match="dimensions"):
        test.test(np.zeros((5, D + 1)), np.full((5, K), 1 / K))
    (tmp_path / "bad.npz").write_bytes(b"no")
    with pytest.raises(MedtuneError, match="not a readable batch-shift file"):
        BatchShiftTest.load(tmp_path / "bad.npz")


def test_a_small_validation_set_keeps_the_false_alarm_rate():
    """Components fitted on the reference itself narrow its minor components: 40 validation
    images with 32 components flagged a third of same-site batches; one per 12 images does not."""
    rng = np.random.default_rng(5)
    alarms = []
    for _ in range(60):
        test = BatchShiftTest.fit(*_site(40, rng))
        assert test.pca_components.shape[0] == 40 // 12
        alarms.append(test.test(*_site(25, rng))["shifted"])
    assert np.mean(alarms) <= 0.12
    assert BatchShiftTest.fit(*_site(400, rng)).pca_components.shape[0] == 32
