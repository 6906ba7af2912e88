"""Moving a validated operating point to a new site: only with labels, reaching the target."""

from __future__ import annotations

import numpy as np
import pytest

from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature, fit_temperature
from medtune.evaluation.labels import LabelSpace
from medtune.evaluation.operating_points import (
    apply_operating_point,
    choose_operating_points,
    move_operating_point,
)

REFERABLE = LabelSpace.of([str(g) for g in range(5)], ordinal=True).binary_task


def _logits(n: int, seed: int, shift: float = 0.0, scale: float = 1.0) -> tuple[np.ndarray, ...]:
    """Grades 0-4 and 5-class logits peaking near the true grade, moved by ``shift`` grades."""
    rng = np.random.default_rng(seed)
    y = rng.choice(5, size=n, p=[0.5, 0.1, 0.25, 0.07, 0.08])
    centre = y + shift + rng.normal(0, 0.8, n)
    logits = -scale * (np.arange(5)[None, :] - centre[:, None]) ** 2
    return logits, y


@pytest.fixture(scope="module")
def validated():
    """The home site's sens90 point, chosen on its validation logits (temperature 1)."""
    logits, y = _logits(600, 0)
    score = REFERABLE.score(apply_temperature(logits, 1.0))
    return choose_operating_points(REFERABLE.labels(y), score)["sens90"]


def test_without_labels_nothing_moves(validated):
    logits, _ = _logits(80, 1, shift=-0.7)
    out = move_operating_point(
        logits,
        None,
        REFERABLE,
        validated_threshold=validated["threshold"],
        target_sensitivity=0.9,
        temperature=1.3,
    )
    assert out == {
        "moved": False,
        "threshold": validated["threshold"],
        "temperature": 1.3,
        "rule": "validated operating point kept (no labels from the new site)",
    }


def test_labels_move_the_point_until_the_target_sensitivity_holds(validated):
    logits, y = _logits(120, 2, shift=-0.7, scale=3.0)  # new site: scores lower, overconfident
    y_bin = REFERABLE.labels(y)
    stale = apply_operating_point(
        y_bin, REFERABLE.score(apply_temperature(logits, 1.0)), validated["threshold"]
    )
    assert stale["sensitivity"] < 0.9  # the validated point no longer holds here
    out = move_operating_point(
        logits,
        y,
        REFERABLE,
        validated_threshold=validated["threshold"],
        target_sensitivity=0.9,
    )
    assert out["moved"] and out["threshold"] != validated["threshold"]
    assert out["temperature"] == pytest.approx(fit_temperature(logits, y))
    assert out["temperature"] > 1.5  # the overconfident logits get softened
    score = REFERABLE.score(apply_temperature(logits, out["temperature"]))
    applied = apply_operating_point(y_bin, score, out["threshold"])
    assert applied["sensitivity"] >= 0.9 and applied["sensitivity"] == out["sensitivity"]
    assert applied["specificity"] == out["specificity"]
    # the same rule as the validated points: choose_operating_points' sens90 on the sample
    assert out["threshold"] == choose_operating_points(y_bin, score)["sens90"]["threshold"]
    assert (out["n_images"], out["n_positives"]) == (120, int(y_bin.sum()))
    low, high = out["sensitivity_ci95"]
    assert low < out["sensitivity"] <= high <= 1.0


def test_too_few_positives_are_refused(validated):
    logits, y = _logits(200, 3)
    keep = np.flatnonzero(y < 2)[:40].tolist() + np.flatnonzero(y >= 2)[:9].tolist()
    with pytest.raises(MedtuneError, match="9 positive and 40 negative") as err:
        move_operating_point(
            logits[keep],
            y[keep],
            REFERABLE,
            validated_threshold=validated["threshold"],
            target_sensitivity=0.9,
        )
    assert "at least 10 positives" in str(err.value) and "\n" not in str(err.value)
    only_pos = np.flatnonzero(y >= 2)[:20]
    with pytest.raises(MedtuneError, match="0 negative"):
        move_operating_point(
            logits[only_pos],
            y[only_pos],
            REFERABLE,
            validated_threshold=0.5,
            target_sensitivity=0.9,
        )
