"""Operating points that hold on the WORST validation site, not only on the pooled validation set.

A model validated on several sites at once has one pooled ROC curve; a threshold chosen on it for
90% sensitivity can give 0.98 at one site and 0.50 at another (three development sites, one run,
``findings.md``). Screening programmes need the stated sensitivity wherever the model was
validated, so a sensitivity operating point is chosen here as the highest threshold at which the
sensitivity reaches the target at EVERY validation site with enough positives (and in the pool).

Sensitivity falls as the threshold rises, so for each site the highest threshold that keeps its
sensitivity at or above the target is the ``ceil(target * n_pos)``-th largest positive score, and
the threshold that keeps it at every site is the smallest of those (no search over thresholds).
Sites with fewer than :data:`MIN_SITE_POSITIVES` positives are named and left out: their
sensitivity moves in steps of more than 10 points.

This is the worst-group (minimax) criterion of distributionally robust learning applied to the
threshold alone (Sagawa et al. 2020, "Distributionally robust neural networks for group shifts"),
and the per-site view of external validation that regulators ask for (e.g. the site-level
sensitivities of IDx-DR's pivotal trial, Abramoff et al. 2018). It costs specificity at the other
sites; that cost is reported per site.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

__all__ = ["MIN_SITE_POSITIVES", "site_rates", "worst_site_threshold"]

#: Fewest positives a site (a validation site, or a labelled new-site sample) needs before its
#: sensitivity steers a threshold: with 10, a sensitivity of 9/10 has a 95% Clopper-Pearson
#: interval of 0.55-1.00.
MIN_SITE_POSITIVES = 10


def _highest_threshold(pos_scores: np.ndarray, target: float) -> float:
    """The highest threshold with ``mean(pos_scores >= threshold) >= target``."""
    k = max(1, math.ceil(target * len(pos_scores) - 1e-9))
    return float(np.sort(pos_scores)[::-1][k - 1])


def worst_site_threshold(
    y_bin: np.ndarray,
    score: np.ndarray,
    sites: Sequence[Any],
    target: float,
    *,
    min_positives: int = MIN_SITE_POSITIVES,
) -> dict[str, Any] | None:
    """The highest threshold keeping sensitivity >= ``target`` on every validation site.

    Parameters
    ----------
    y_bin : ndarray of int, shape (N,)
        1 for positives (e.g. referable DR), 0 for negatives.
    score : ndarray of float, shape (N,)
        The score thresholded (positive when ``score >= threshold``).
    sites : sequence of str, shape (N,)
        Site of each image.
    target : float
        Sensitivity (0-1) to hold, e.g. 0.9.
    min_positives : int, default :data:`MIN_SITE_POSITIVES` (10)
        Sites with fewer positives are left out (listed under ``sites_left_out``).

    Returns
    -------
    dict or None
        ``None`` when fewer than two sites have ``min_positives`` positives (the pooled rule
        applies). Else ``threshold`` (the smallest of the sites' and the pool's highest
        thresholds), ``worst_site`` (the site that set it, or ``"pooled"``),
        ``sites_left_out`` (names), and ``sites``: :func:`site_rates` at ``threshold``.

    Raises
    ------
    ValueError
        When the arrays differ in length or ``target`` is outside (0, 1].
    """
    y_bin = np.asarray(y_bin).astype(np.int64).ravel()
    score = np.asarray(score, dtype=np.float64).ravel()
    names = np.asarray([str(s) for s in sites], dtype=object)
    if not (len(y_bin) == len(score) == len(names)):
        raise ValueError(f"{len(y_bin)} labels, {len(score)} scores and {len(names)} sites")
    if not 0.0 < float(target) <= 1.0:
        raise ValueError(f"target sensitivity must be in (0, 1], got {target}")
    counted = {s: int(y_bin[names == s].sum()) for s in sorted(set(names.tolist()))}
    used = [s for s, n in counted.items() if n >= min_positives]
    if len(used) < 2:
        return None
    limits = {s: _highest_threshold(score[(names == s) & (y_bin == 1)], target) for s in used}
    limits["pooled"] = _highest_threshold(score[y_bin == 1], target)
    worst = min(limits, key=lambda s: (limits[s], s != "pooled"))
    threshold = limits[worst]
    return {
        "threshold": threshold,
        "worst_site": worst,
        "sites_left_out": [s for s in counted if s not in used],
        "sites": site_rates(y_bin, score, names, threshold),
    }


def site_rates(
    y_bin: np.ndarray, score: np.ndarray, sites: Sequence[Any], threshold: float
) -> dict[str, dict[str, Any]]:
    """Sensitivity and specificity of ``score >= threshold`` at each site.

    Parameters
    ----------
    y_bin : ndarray of int, shape (N,)
    score : ndarray of float, shape (N,)
    sites : sequence of str, shape (N,)
    threshold : float

    Returns
    -------
    dict
        ``{site: {"n", "n_positive", "sensitivity", "specificity"}}``, sites sorted by name;
        a rate is ``None`` where the site has no positive (or no negative).
    """
    y_bin = np.asarray(y_bin).astype(np.int64).ravel()
    hit = np.asarray(score, dtype=np.float64).ravel() >= threshold
    names = np.asarray([str(s) for s in sites], dtype=object)
    out = {}
    for site in sorted(set(names.tolist())):
        rows = names == site
        pos, neg = rows & (y_bin == 1), rows & (y_bin == 0)
        out[site] = {
            "n": int(rows.sum()),
            "n_positive": int(pos.sum()),
            "sensitivity": float(hit[pos].mean()) if pos.any() else None,
            "specificity": float((~hit[neg]).mean()) if neg.any() else None,
        }
    return out
