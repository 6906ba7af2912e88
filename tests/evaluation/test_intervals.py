"""Issue 16 item 9: intervals stay valid at small n and at 0/1, and small n is flagged."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy.stats import binomtest

from medtune.evaluation import intervals
from medtune.evaluation import metrics as M
from medtune.evaluation.intervals import effective_sample_size, proportion_ci
from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.report import write_report
from medtune.evaluation.tables import metrics_table

DR = ["0", "1", "2", "3", "4"]


def _probs(pred: np.ndarray, K: int, conf: float = 0.8) -> np.ndarray:
    """Probabilities whose argmax is ``pred``."""
    p = np.full((len(pred), K), (1 - conf) / (K - 1))
    p[np.arange(len(pred)), pred] = conf
    return p


def _all_intervals(m: dict) -> dict[str, list[float]]:
    """Every interval of a compute_metrics dict, operating points included."""
    out = {k: v for k, v in m.items() if k.endswith("_ci") and v is not None}
    for op, d in (m.get("operating_points") or {}).items():
        out |= {f"{op}:{k}": v for k, v in d.items() if k.endswith("_ci") and v is not None}
    return out


def test_perfect_specificity_on_four_negatives_is_not_certain() -> None:
    y = np.array([0] * 4 + [1] * 40)
    score = np.r_[np.linspace(0.05, 0.2, 4), np.linspace(0.6, 0.95, 40)]
    m = compute_metrics(y, np.c_[1 - score, score], ["neg", "pos"], n_boot=200)
    assert m["specificity"] == 1.0 and m["specificity_n"] == 4
    lo, hi = m["specificity_ci"]
    assert hi == 1.0 and lo == pytest.approx(0.5101, abs=1e-3)  # Wilson, 4 of 4
    assert m["sensitivity_n"] == 40 and m["sensitivity_ci"][0] < 1.0
    assert any(w.startswith("specificity rests on 4 cases") for w in m["warnings"])
    assert not any(w.startswith("sensitivity rests") for w in m["warnings"])
    json.dumps(m, allow_nan=False)


def test_zero_sensitivity_after_one_epoch_has_an_upper_bound_above_zero() -> None:
    # an untrained model predicts every case negative at the validation-chosen threshold
    y = np.array([0] * 30 + [1] * 6)
    val_score = np.r_[np.full(30, 0.1), np.full(6, 0.9)]
    test_score = np.full(36, 0.05)
    m = compute_metrics(
        y,
        np.c_[1 - test_score, test_score],
        ["neg", "pos"],
        val=(y, np.c_[1 - val_score, val_score]),
        n_boot=100,
    )
    assert m["sensitivity"] == 0.0
    lo, hi = m["sensitivity_ci"]
    assert lo == 0.0 and hi == pytest.approx(binomtest(0, 6).proportion_ci(method="wilson").high)
    assert hi > 0.3


def test_accuracy_ppv_npv_at_one_have_wilson_intervals() -> None:
    y = np.array([0, 1, 2, 0, 1, 2, 0, 1])
    m = compute_metrics(y, _probs(y, 3), ["a", "b", "c"], n_boot=100)
    assert m["accuracy"] == 1.0 and m["accuracy_n"] == 8
    assert m["accuracy_ci"][0] == pytest.approx(binomtest(8, 8).proportion_ci(method="wilson").low)
    yb = np.array([0] * 5 + [1] * 7)
    mb = compute_metrics(yb, _probs(yb, 2), ["neg", "pos"], n_boot=100)
    youden = mb["operating_points"]["youden"]
    assert youden["ppv"] == 1.0 and youden["npv"] == 1.0
    assert youden["ppv_ci"][0] < 0.8 and youden["npv_ci"][0] < 0.8


def test_no_interval_collapses_for_small_or_perfect_data() -> None:
    """Every kind of figure: perfect, hopeless, constant and noisy predictions at small n."""
    rng = np.random.default_rng(0)
    cases = []
    for n in (6, 12, 25):
        y5 = rng.integers(0, 5, n)
        y5[:5] = np.arange(5)
        y2 = np.r_[0, 1, rng.integers(0, 2, n - 2)]
        cases += [
            (y5, _probs(y5, 5), DR),  # perfect grading
            (y5, _probs(np.zeros(n, int), 5), DR),  # constant prediction
            (y5, _probs((y5 + 2) % 5, 5), DR),  # always wrong
            (y2, _probs(y2, 2), ["neg", "pos"]),
            (y2, _probs(1 - y2, 2), ["neg", "pos"]),
        ]
    for y, p, names in cases:
        m = compute_metrics(y, p, names, n_boot=100)
        for key, (lo, hi) in _all_intervals(m).items():
            assert hi - lo > 1e-6, (key, lo, hi, names, y)
        for key in M.HEADLINE:
            if m[key] is not None and m[f"{key}_ci"] is None:
                assert any(w.startswith(f"{key}:") for w in m["warnings"]), key


def test_perfect_balanced_accuracy_gets_a_conservative_interval() -> None:
    y = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2])
    m = compute_metrics(y, _probs(y, 3), ["a", "b", "c"], n_boot=100)
    lo, hi = m["balanced_accuracy_ci"]
    assert hi == 1.0 and lo < binomtest(2, 2).proportion_ci(method="wilson").low + 0.2
    assert m["balanced_accuracy_n"] == 2
    assert m["macro_auc_ci"] is None  # AUC 1 in every resample: no interval, a warning instead
    assert any(w.startswith("macro_auc: every bootstrap resample") for w in m["warnings"])


def test_wilson_by_hand_equals_scipy_for_integer_counts() -> None:
    for k, n in [(0, 1), (0, 4), (3, 4), (4, 4), (17, 50), (999, 1000)]:
        ci = binomtest(k, n).proportion_ci(confidence_level=0.9, method="wilson")
        assert intervals._wilson(k / n, n, 0.9) == pytest.approx([ci.low, ci.high], abs=1e-12)
        assert proportion_ci(np.arange(n) < k, level=0.9) == pytest.approx([ci.low, ci.high])


def test_grouped_intervals_use_the_number_of_patients() -> None:
    # 10 patients x 6 identical images: the evidence is 10 cases, not 60
    groups = np.repeat(np.arange(10), 6)
    all_right = np.ones(60, bool)
    assert effective_sample_size(all_right, groups) == 10
    assert proportion_ci(all_right, groups) == pytest.approx(proportion_ci(np.ones(10, bool)))
    seven = np.repeat(np.arange(10) < 7, 6)
    assert effective_sample_size(seven, groups) == pytest.approx(10)
    assert proportion_ci(seven, groups) == pytest.approx(proportion_ci(np.arange(10) < 7))
    # independent-looking groups keep (about) every image
    mixed = np.tile([True, False, True, True, False, True], 10)
    assert effective_sample_size(mixed, groups) == 60


def test_grouped_metrics_widen_the_proportions() -> None:
    y0 = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1, 1])
    pred0 = np.array([0, 0, 1, 1, 1, 0, 1, 0, 1, 0, 1, 1])
    y, pred = np.repeat(y0, 5), np.repeat(pred0, 5)
    groups = np.repeat(np.arange(12), 5).tolist()
    img = compute_metrics(y, _probs(pred, 2), ["neg", "pos"], n_boot=50)
    grp = compute_metrics(y, _probs(pred, 2), ["neg", "pos"], groups=groups, n_boot=50)
    width = lambda ci: ci[1] - ci[0]  # noqa: E731
    assert width(grp["accuracy_ci"]) > 1.8 * width(img["accuracy_ci"])
    assert width(grp["specificity_ci"]) > 1.8 * width(img["specificity_ci"])
    assert "effective sample size" in grp["intervals"]["proportions"]


def test_small_n_is_visible_in_the_cli_table_and_the_report(tmp_path) -> None:
    y = np.array([0] * 4 + [1] * 40)
    m = compute_metrics(y, _probs(y, 2), ["neg", "pos"], n_boot=100)
    table = metrics_table({"test": m})
    spec_row = next(line for line in table.splitlines() if line.startswith("specificity"))
    assert "(n=4)" in spec_row and "[0.510, 1.000]" in spec_row
    sens_row = next(line for line in table.splitlines() if line.startswith("sensitivity"))
    assert "(n=" not in sens_row
    assert "fewer than 30 cases" in table
    html_path = write_report(
        tmp_path, metrics=m, config={}, y_true=y, probs=_probs(y, 2), class_names=["neg", "pos"]
    )
    html = html_path.read_text()
    assert 'id="small-n-note"' in html and "(n=4)" in html
    assert "specificity rests on 4 cases" in html
    assert "Wilson" in html


def test_large_samples_carry_no_small_n_flag() -> None:
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 400)
    pred = np.where(rng.random(400) < 0.8, y, 1 - y)
    m = compute_metrics(y, _probs(pred, 2), ["neg", "pos"], n_boot=100)
    assert m["warnings"] == []
    assert "(n=" not in metrics_table({"test": m})
