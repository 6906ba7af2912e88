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


def _patients(n_patients: int, rng: np.random.Generator, shift: float = 0.0, rho: float = 0.9):
    """Two eyes per patient sharing ``rho`` of their feature variance (fellow eyes: one camera,
    one sitting, mostly one grade); the patients' ids in order."""
    z = rng.normal(size=(n_patients, 1, D))
    eyes = np.sqrt(rho) * z + np.sqrt(1 - rho) * rng.normal(size=(n_patients, 2, D)) + shift
    feats = eyes.reshape(-1, D) @ _MIX
    ids = np.repeat([f"p{rng.integers(1 << 40)}" for _ in range(n_patients)], 2)
    return feats, softmax(feats @ _HEAD, axis=1), ids


def test_fellow_eyes_count_as_one_patient_so_paired_batches_keep_the_false_alarm_rate():
    """Counted as independent images, batches of whole patients from the validated site are
    flagged far above alpha (eyepacs-dev: 17-19%); counted as patients they are not, and a
    shifted site is still found."""
    rng = np.random.default_rng(6)
    feats, probs, ids = _patients(200, rng)
    naive = BatchShiftTest.fit(feats, probs)
    paired = BatchShiftTest.fit(feats, probs, patients=ids)
    batches = [_patients(50, rng) for _ in range(150)]
    naive_rate = np.mean([naive.test(f, p)["shifted"] for f, p, _ in batches])
    paired_rate = np.mean([paired.test(f, p, i)["shifted"] for f, p, i in batches])
    assert naive_rate >= 0.15 and paired_rate <= 0.08
    shifted = [_patients(50, rng, shift=0.4) for _ in range(30)]
    assert np.mean([paired.test(f, p, i)["shifted"] for f, p, i in shifted]) >= 0.9
    f, p, i = batches[0]
    verdict = paired.test(f, p, [*i[:-10], *[None] * 10])  # unknown patients count one each
    assert (verdict["n_images"], verdict["n_patients"]) == (100, 45 + 10)
    assert "100 images (55 patients)" in verdict["message"]


def test_patients_survive_save_and_a_file_without_them_still_loads(tmp_path):
    rng = np.random.default_rng(7)
    feats, probs, ids = _patients(40, rng)
    test = BatchShiftTest.fit(feats, probs, patients=ids, n_components=4)
    loaded = BatchShiftTest.load(test.save(tmp_path / "batch_shift.npz"))
    batch = _patients(15, rng, shift=0.3)
    assert loaded.test(*batch) == test.test(*batch)
    as_images = BatchShiftTest.fit(feats, probs, n_components=4).test(*batch)
    assert 0 < as_images["p_value"] < loaded.test(*batch)["p_value"] < 1
    with np.load(tmp_path / "batch_shift.npz") as z:
        old = {k: z[k] for k in z.files if k != "patients"}
    np.savez(tmp_path / "old.npz", **old)
    assert BatchShiftTest.load(tmp_path / "old.npz").patients is None
    with pytest.raises(MedtuneError, match="3 patient ids for 30 batch images"):
        test.test(*batch[:2], ["a", "b", "c"])
