"""95% intervals of evaluation figures: the (cluster) bootstrap and Wilson score intervals.

* Figures that are not proportions (balanced accuracy, AUC, QWK) get percentile bootstrap
  intervals (:func:`bootstrap_cis`). A resample is represented by per-sample multiplicities
  ``w`` (how often each image was drawn, :func:`bootstrap_weights`); with ``groups`` whole
  groups (patients) are resampled (cluster bootstrap). The statistics are weighted forms of the
  scikit-learn metrics (:class:`WeightedAUC`, :mod:`medtune.evaluation.scores`), written by hand
  because sklearn's per-call input validation dominates 1000 resamples x ~10 metrics (about 20 s
  for 1000 images); with w = 1 they equal sklearn exactly (``tests/evaluation/test_metrics.py``).
* Sensitivity, specificity, accuracy, PPV and NPV are proportions k / n. A percentile bootstrap
  of a proportion at 0 or 1 returns [0, 0] or [1, 1] (every resample agrees), claiming certainty
  that 4 negatives cannot give. The Wilson score interval (Wilson, JASA 1927) stays valid there
  (4 of 4 -> [0.51, 1.00]) and has close to nominal coverage for small n (Brown, Cai & DasGupta,
  Statistical Science 2001). Images of one patient are not independent; with groups the interval
  uses the effective sample size n / design effect (Kish, Survey Sampling 1965), estimated from
  the between-group variance of the proportion as in Korn & Graubard (Survey Methodology 1998).
  See ``docs/metrics.md``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
from scipy.stats import binomtest, norm

__all__ = [
    "LEVEL",
    "Stat",
    "WeightedAUC",
    "bootstrap_cis",
    "bootstrap_weights",
    "effective_sample_size",
    "mean_of_proportions_ci",
    "operating_point_cis",
    "proportion_ci",
    "zero_width_fallbacks",
]

LEVEL = 0.95  # coverage of every interval

#: A bootstrapped statistic: (weights, weighted confusion matrix) -> value.
Stat = Callable[[np.ndarray, np.ndarray], float]


# ---------------------------------------------------------------- bootstrap


class WeightedAUC:
    """ROC AUC of ``score`` for binary ``labels`` with sample weights, in O(N) per call: the
    score order and tie blocks are computed once; AUC = P(s_pos > s_neg) + 0.5 P(tie)."""

    def __init__(self, labels: np.ndarray, score: np.ndarray) -> None:
        self.order = np.argsort(score, kind="stable")
        s = np.asarray(score)[self.order]
        self.pos = np.asarray(labels, dtype=np.float64)[self.order]
        self.block = np.concatenate([[0], np.cumsum(s[1:] != s[:-1])]).astype(np.int64)
        self.n_blocks = int(self.block[-1]) + 1 if len(s) else 0

    def __call__(self, w: np.ndarray) -> float:
        ws = w[self.order]
        P = np.bincount(self.block, ws * self.pos, minlength=self.n_blocks)
        N = np.bincount(self.block, ws * (1.0 - self.pos), minlength=self.n_blocks)
        n_pos, n_neg = P.sum(), N.sum()
        if n_pos <= 0 or n_neg <= 0:
            return float("nan")
        neg_below = np.cumsum(N) - N
        return float(np.sum(P * (neg_below + 0.5 * N)) / (n_pos * n_neg))


def bootstrap_weights(
    n: int, groups: Sequence[Any] | None = None, *, n_boot: int, seed: int = 0
) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` resamples as per-sample multiplicities (float arrays of length ``n``).

    Without ``groups``: ``n`` images drawn with replacement. With ``groups``: as many groups as
    there are drawn with replacement and every image of a drawn group comes along (cluster
    bootstrap), so images of one patient always share a weight.
    """
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n_boot):
            yield np.bincount(rng.integers(0, n, n), minlength=n).astype(np.float64)
        return
    _, inv = np.unique(np.asarray([str(g) for g in groups]), return_inverse=True)
    G = int(inv.max()) + 1
    for _ in range(n_boot):
        yield np.bincount(rng.integers(0, G, G), minlength=G)[inv].astype(np.float64)


def bootstrap_cis(
    stats: dict[str, Stat],
    cell: np.ndarray,
    K: int,
    groups: Sequence[Any] | None,
    n_boot: int,
    seed: int,
) -> tuple[dict[str, list[float] | None], dict[str, Any]]:
    """95% percentile intervals of each statistic over ``n_boot`` (cluster) resamples.

    An interval of zero width (every resample gave the same value, e.g. an AUC of 1 or a
    constant prediction's kappa of 0) measures nothing; it is returned as is and handled by
    :func:`zero_width_fallbacks`.
    """
    values = np.full((n_boot, len(stats)), np.nan)
    fns = list(stats.values())
    with warnings.catch_warnings(), np.errstate(invalid="ignore", divide="ignore"):
        warnings.simplefilter("ignore")
        for b, w in enumerate(bootstrap_weights(len(cell), groups, n_boot=n_boot, seed=seed)):
            cm = np.bincount(cell, weights=w, minlength=K * K).reshape(K, K)
            values[b] = [fn(w, cm) for fn in fns]
    cis: dict[str, list[float] | None] = {}
    for j, name in enumerate(stats):
        col = values[:, j][np.isfinite(values[:, j])]
        cis[name] = [float(v) for v in np.percentile(col, [2.5, 97.5])] if col.size >= 2 else None
    info = {
        "n_boot": int(n_boot),
        "seed": int(seed),
        "unit": "image" if groups is None else "group",
        "n_units": len(cell) if groups is None else len({str(g) for g in groups}),
        "method": "percentile",
        "level": LEVEL,
        "fixed": "operating-point thresholds and decoding are held fixed",
    }
    return cis, info


def zero_width_fallbacks(
    cis: dict[str, list[float] | None],
    point: dict[str, float],
    y: np.ndarray,
    pred: np.ndarray,
    groups: np.ndarray | None,
) -> list[str]:
    """Replace bootstrap intervals of zero width, which claim a certainty the data cannot give.

    Balanced accuracy, a mean of per-class recalls, gets :func:`mean_of_proportions_ci`; any
    other figure (AUC, QWK) gets no interval and a warning. Returns the warnings.
    """
    out = []
    for name, ci in list(cis.items()):
        if ci is None or ci[1] - ci[0] > 1e-12:
            continue
        value = point.get(name, ci[0])
        if name == "balanced_accuracy":
            cis[name] = mean_of_proportions_ci(y, pred, groups, LEVEL)
            how = "a conservative interval from per-class Wilson intervals is shown instead"
        else:
            cis[name] = None
            how = "no interval is reported; more cases are needed to measure its uncertainty"
        out.append(f"{name}: every bootstrap resample gave {value:.3f}, so {how}")
    return out


# ---------------------------------------------------------------- proportion intervals


def effective_sample_size(success: np.ndarray, groups: np.ndarray) -> float:
    """Effective number of independent cases behind the proportion ``mean(success)``.

    Parameters
    ----------
    success : ndarray of bool, shape (n,)
        Whether each case counts as a success (e.g. a positive detected).
    groups : ndarray, shape (n,)
        Group (patient) id of each case.

    Returns
    -------
    float
        ``p (1 - p) / Var(p)`` with the cluster-robust (ratio estimator) variance
        ``G / (G - 1) * sum_g (k_g - p n_g)^2 / n^2`` over the G groups, clipped to ``[G, n]``
        (``G <= n_eff``: a group counts at least once; ``n_eff <= n``: clustering never adds
        information). At ``p`` of 0 or 1 the variance is 0 and undefined as a ratio; then the
        number of groups G is used, the conservative end.
    """
    success = np.asarray(success, dtype=np.float64)
    n = len(success)
    _, inv = np.unique(np.asarray(groups).astype(str), return_inverse=True)
    n_groups = int(inv.max()) + 1 if n else 0
    p = float(success.mean()) if n else 0.0
    if n_groups < 2 or p in (0.0, 1.0):
        return float(n_groups)
    k_g = np.bincount(inv, weights=success, minlength=n_groups)
    n_g = np.bincount(inv, minlength=n_groups)
    var = n_groups / (n_groups - 1) * float(np.sum((k_g - p * n_g) ** 2)) / n**2
    if var <= 0.0:
        return float(n)
    return float(np.clip(p * (1.0 - p) / var, n_groups, n))


def _wilson(p: float, n: float, level: float) -> list[float]:
    """Wilson score interval for a proportion ``p`` observed on ``n`` (possibly fractional) cases.

    Written out because ``scipy.stats.binomtest`` only takes integer counts and an effective
    sample size is real-valued; for integer counts it equals scipy's ``method="wilson"`` (tested).
    """
    z = float(norm.ppf(0.5 + level / 2))
    z2n = z * z / n
    centre = (p + z2n / 2) / (1 + z2n)
    half = z / (1 + z2n) * np.sqrt(p * (1 - p) / n + z2n / (4 * n))
    return [float(max(0.0, centre - half)), float(min(1.0, centre + half))]


def proportion_ci(
    success: Any, groups: Sequence[Any] | None = None, *, level: float = LEVEL
) -> list[float] | None:
    """Wilson score interval of the proportion of ``success`` (valid at 0 and 1).

    Parameters
    ----------
    success : array-like of bool, shape (n,)
        One entry per case in the denominator (e.g. every positive for sensitivity).
    groups : sequence, shape (n,), optional
        Group (patient) id per case; the interval then uses :func:`effective_sample_size`.
    level : float, default 0.95
        Coverage.

    Returns
    -------
    list of float or None
        ``[lo, hi]``; None when there are no cases. Without groups this is
        ``scipy.stats.binomtest(k, n).proportion_ci(method="wilson")``.
    """
    success = np.asarray(success, dtype=bool).ravel()
    n = len(success)
    if n == 0:
        return None
    k = int(success.sum())
    if groups is None:
        ci = binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
        return [float(ci.low), float(ci.high)]
    return _wilson(k / n, effective_sample_size(success, np.asarray(groups)), level)


def mean_of_proportions_ci(
    y: np.ndarray, pred: np.ndarray, groups: np.ndarray | None, level: float
) -> list[float] | None:
    """Conservative interval of a mean of per-class recalls (balanced accuracy).

    Each present class gets a Wilson interval at level ``1 - (1 - level) / K`` (Bonferroni), so
    all K hold together with probability >= ``level`` and the mean of the recalls then lies
    between the means of the bounds. Used only where the bootstrap interval collapses.
    """
    classes = np.unique(y)
    if len(classes) == 0:
        return None
    bonferroni = 1.0 - (1.0 - level) / len(classes)
    bounds = [
        proportion_ci(
            pred[y == c] == c, None if groups is None else groups[y == c], level=bonferroni
        )
        for c in classes
    ]
    return [float(np.mean([b[0] for b in bounds])), float(np.mean([b[1] for b in bounds]))]


def operating_point_cis(
    y_bin: np.ndarray,
    score: np.ndarray,
    points: dict[str, dict[str, Any]],
    groups: np.ndarray | None,
) -> dict[str, list[float] | None]:
    """Wilson intervals of sensitivity, specificity, PPV and NPV at each point's threshold."""

    def sub(mask: np.ndarray) -> np.ndarray | None:
        return None if groups is None else groups[mask]

    cis: dict[str, list[float] | None] = {}
    for op, d in points.items():
        hit = score >= d["threshold"]
        cis[f"op:{op}:sensitivity"] = proportion_ci(hit[y_bin], sub(y_bin))
        cis[f"op:{op}:specificity"] = proportion_ci(~hit[~y_bin], sub(~y_bin))
        cis[f"op:{op}:ppv"] = proportion_ci(y_bin[hit], sub(hit))
        cis[f"op:{op}:npv"] = proportion_ci(~y_bin[~hit], sub(~hit))
    return cis
