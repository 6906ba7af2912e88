"""Operating points chosen so the validated sensitivity holds at the worst validation site."""

from __future__ import annotations

import numpy as np
import pytest

from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.operating_points import choose_operating_points
from medtune.evaluation.site_points import worst_site_threshold


def _two_sites(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Site "home" (400 images) scores positives high; site "away" (100) scores them lower:
    a pooled sens90 threshold misses many of away's positives."""
    rng = np.random.default_rng(seed)
    y_home = rng.random(400) < 0.4
    y_away = rng.random(100) < 0.3
    s_home = np.where(y_home, rng.normal(0.8, 0.08, 400), rng.normal(0.3, 0.1, 400))
    s_away = np.where(y_away, rng.normal(0.5, 0.1, 100), rng.normal(0.2, 0.1, 100))
    y = np.concatenate([y_home, y_away]).astype(int)
    return y, np.concatenate([s_home, s_away]), np.array(["home"] * 400 + ["away"] * 100)


def _sens(y, s, thr):
    return float((s[y == 1] >= thr).mean())


def test_worst_site_rule_holds_the_target_at_every_site():
    y, score, sites = _two_sites()
    pooled = choose_operating_points(y, score)["sens90"]
    away = sites == "away"
    assert _sens(y[away], score[away], pooled["threshold"]) < 0.8  # the silent failure
    chosen = choose_operating_points(y, score, sites)["sens90"]
    assert chosen["worst_site"] == "away"
    assert "every site" in chosen["rule"]
    for site in ("home", "away"):
        rows = sites == site
        assert _sens(y[rows], score[rows], chosen["threshold"]) >= 0.9
        assert chosen["sites"][site]["sensitivity"] >= 0.9
    assert chosen["val_sensitivity"] >= 0.9
    # it is the HIGHEST such threshold: the next score above it breaks the target at "away"
    pos_away = np.sort(score[away & (y == 1)])
    lowest_kept = pos_away[pos_away >= chosen["threshold"]].min()
    above = pos_away[pos_away > lowest_kept]
    assert _sens(y[away], score[away], above.min()) < 0.9
    assert chosen["threshold"] < pooled["threshold"]
    assert chosen["val_specificity"] <= pooled["val_specificity"]


def test_sites_with_few_positives_are_left_out_and_one_site_falls_back_to_pooled():
    y, score, sites = _two_sites()
    sites = sites.copy()
    few = np.flatnonzero((sites == "away") & (y == 1))[:5]
    sites[few] = "tiny"  # five positives: too few to steer the threshold
    res = worst_site_threshold(y, score, sites, 0.9)
    assert res is not None and res["sites_left_out"] == ["tiny"]
    assert "tiny" in res["sites"]
    only_home = np.where(sites == "home", "home", "small")
    small_pos = np.flatnonzero((only_home == "small") & (y == 1))
    y2 = y.copy()
    y2[small_pos[3:]] = 0  # the second site keeps 3 positives
    assert worst_site_threshold(y2, score, only_home, 0.9) is None
    assert "worst_site" not in choose_operating_points(y2, score, only_home)["sens90"]


def test_compute_metrics_applies_the_worst_site_thresholds_and_says_so():
    y, score, sites = _two_sites(1)
    probs = np.stack([1 - score.clip(0, 1), score.clip(0, 1)], axis=1)
    names = ["healthy", "disease"]
    m = compute_metrics(y, probs, names, val=(y, probs), val_sites=sites, n_boot=0)
    op = m["operating_points"]["sens90"]
    assert op["val_sites"]["away"]["sensitivity"] >= 0.9
    assert "worst-site" in m["thresholds_from"]
    plain = compute_metrics(y, probs, names, val=(y, probs), n_boot=0)
    assert plain["thresholds_from"] == "validation"
    assert op["threshold"] < plain["operating_points"]["sens90"]["threshold"]
    # Youden's point is not a sensitivity target: unchanged
    assert m["operating_points"]["youden"]["threshold"] == pytest.approx(
        plain["operating_points"]["youden"]["threshold"]
    )
