"""Ordinal decoding of class probabilities (DR grades 0-4).

Two decodings:

* ``{"method": "argmax"}``: the most probable grade.
* ``{"method": "expected_grade", "thresholds": [t1, ..., t_{K-1}]}``: the expected grade
  ``E = sum_k k * p_k`` is cut at increasing thresholds; grade = number of thresholds ``<= E``.
  Thresholds are fitted on VALIDATION data to maximise quadratic weighted kappa (QWK).

:func:`choose_decoding` picks one on validation data. Because the thresholds are fitted on the same
validation set, their in-sample QWK is optimistic; the choice therefore uses a cross-fitted QWK
(thresholds fitted on k-1 folds, scored on the held-out fold) and records every score.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medtune.errors import MedtuneError
from medtune.evaluation.scores import qwk, rank_value

__all__ = [
    "choose_decoding",
    "decode",
    "decode_scores",
    "expected_grade",
    "fit_qwk_thresholds",
    "validate_decoding",
]

METHODS = ("argmax", "expected_grade")


def expected_grade(probs: np.ndarray) -> np.ndarray:
    """Expected grade ``sum_k k * probs[:, k]`` (float array of length N)."""
    probs = np.asarray(probs, dtype=np.float64)
    return probs @ np.arange(probs.shape[1], dtype=np.float64)


def default_thresholds(K: int) -> list[float]:
    """Rounding cut points ``[0.5, 1.5, ..., K - 1.5]``."""
    return [k + 0.5 for k in range(K - 1)]


def decode_scores(scores: np.ndarray, thresholds: Sequence[float]) -> np.ndarray:
    """Grade = number of thresholds ``<= score`` (thresholds must be increasing)."""
    return np.digitize(np.asarray(scores, dtype=np.float64), np.asarray(thresholds, dtype=float))


def _qwk_rank(y: np.ndarray, pred: np.ndarray, K: int) -> float:
    """QWK for comparing candidate cut points: undefined ranks lowest."""
    return rank_value(qwk(y, pred, K))


def _candidates(scores_sorted: np.ndarray, lo: float, hi: float, max_candidates: int) -> np.ndarray:
    """Cut points strictly inside (lo, hi): midpoints between neighbouring distinct scores
    (and the interval ends), thinned to at most ``max_candidates``."""
    inside = scores_sorted[(scores_sorted > lo) & (scores_sorted < hi)]
    inside = np.unique(inside)
    if inside.size == 0:
        return inside
    if inside.size > max_candidates:
        inside = np.unique(inside[np.linspace(0, inside.size - 1, max_candidates).astype(int)])
    left = lo if np.isfinite(lo) else inside[0] - 1.0
    right = hi if np.isfinite(hi) else inside[-1] + 1.0
    pts = np.concatenate([[left], inside, [right]])
    return (pts[:-1] + pts[1:]) / 2.0


def fit_qwk_thresholds(
    scores: np.ndarray,
    y: np.ndarray,
    K: int,
    *,
    init: Sequence[float] | None = None,
    max_sweeps: int = 10,
    max_candidates: int = 256,
) -> list[float]:
    """Fit increasing cut points on ``scores`` (e.g. expected grades) maximising QWK.

    Coordinate-wise exhaustive search: each cut in turn is moved to the best midpoint between
    distinct scores lying between its neighbours (so the cuts stay strictly monotone), sweeping
    until no cut improves QWK. Starts from ``[0.5, 1.5, ...]``; never returns worse than the start.
    Hand-written: no library optimises ordinal cut points for kappa.
    """
    scores = np.asarray(scores, dtype=np.float64).ravel()
    y = np.asarray(y).astype(np.int64).ravel()
    t = np.asarray(init if init is not None else default_thresholds(K), dtype=np.float64)
    if t.size != K - 1 or np.any(np.diff(t) <= 0):
        raise ValueError(f"init must be {K - 1} increasing thresholds, got {t.tolist()}")
    s_sorted = np.sort(scores)
    best = _qwk_rank(y, decode_scores(scores, t), K)
    for _ in range(max_sweeps):
        improved = False
        for i in range(K - 1):
            lo = t[i - 1] if i > 0 else -np.inf
            hi = t[i + 1] if i < K - 2 else np.inf
            for c in _candidates(s_sorted, lo, hi, max_candidates):
                trial = t.copy()
                trial[i] = c
                q = _qwk_rank(y, decode_scores(scores, trial), K)
                if q > best + 1e-12:
                    best, t, improved = q, trial, True
        if not improved:
            break
    return [float(v) for v in t]


def decode(probs: np.ndarray, decoding: dict[str, Any] | None) -> np.ndarray:
    """Labels from ``probs`` (N, K) under ``decoding`` (``None`` means argmax)."""
    probs = np.asarray(probs, dtype=np.float64)
    method = (decoding or {}).get("method", "argmax")
    if method == "argmax":
        return probs.argmax(axis=1)
    if method == "expected_grade":
        thresholds = (decoding or {}).get("thresholds") or default_thresholds(probs.shape[1])
        if len(thresholds) != probs.shape[1] - 1:
            raise MedtuneError(
                f"decoding thresholds {list(thresholds)} need {probs.shape[1] - 1} values for "
                f"{probs.shape[1]} classes; refit them with choose_decoding"
            )
        return decode_scores(expected_grade(probs), thresholds)
    raise MedtuneError(f"unknown decoding method {method!r}; use one of {', '.join(METHODS)}")


def validate_decoding(spec: Any, n_classes: int, source: object = "decoding") -> dict[str, Any]:
    """A stored decoding checked for ``n_classes`` classes (``None`` or empty means argmax).

    Parameters
    ----------
    spec : mapping or None
        ``{"method": "argmax"}`` or ``{"method": "expected_grade", "thresholds": [...]}``.
    n_classes : int
        K; expected-grade decoding needs K - 1 non-decreasing thresholds.
    source : object, default "decoding"
        Named in error messages (the file it came from).

    Returns
    -------
    dict
        A copy with the thresholds as floats.

    Raises
    ------
    MedtuneError
        For an unknown method or wrong thresholds.
    """
    spec = dict(spec) if spec else {"method": "argmax"}
    method = spec.get("method")
    if method not in METHODS:
        raise MedtuneError(f"{source}: decoding method {method!r} is unknown; use one of {METHODS}")
    if method == "expected_grade":
        th = spec.get("thresholds")
        if th is None or len(th) != n_classes - 1:
            raise MedtuneError(
                f"{source}: expected_grade decoding needs {n_classes - 1} thresholds "
                f"(one per boundary between {n_classes} grades)"
            )
        th = [float(t) for t in th]
        if any(b < a for a, b in zip(th, th[1:], strict=False)):
            raise MedtuneError(f"{source}: expected_grade thresholds must be non-decreasing")
        spec["thresholds"] = th
    return spec


def _folds(y: np.ndarray, n_folds: int, seed: int):
    # imported here: the torch-free ONNX predictor imports this module for ``decode`` only
    from sklearn.model_selection import KFold, StratifiedKFold

    counts = np.bincount(y)
    counts = counts[counts > 0]
    if counts.min() >= n_folds:
        return StratifiedKFold(n_folds, shuffle=True, random_state=seed).split(y, y)
    return KFold(n_folds, shuffle=True, random_state=seed).split(y)


def choose_decoding(
    y_val: np.ndarray, probs_val: np.ndarray, K: int, *, n_folds: int = 5, seed: int = 0
) -> dict[str, Any]:
    """Pick argmax or expected-grade thresholds by validation QWK.

    Returns ``{"method", "thresholds" (fitted on all of val), "val_qwk": {"argmax",
    "expected_grade" (in-sample, optimistic), "expected_grade_cv" (cross-fitted)},
    "selected_by"}``. Expected-grade wins only if its cross-fitted QWK beats argmax; with fewer
    than ``2 * n_folds`` validation images the in-sample score is used instead.
    """
    y_val = np.asarray(y_val).astype(np.int64).ravel()
    probs_val = np.asarray(probs_val, dtype=np.float64)
    scores = expected_grade(probs_val)
    q_arg = qwk(y_val, probs_val.argmax(axis=1), K)
    thresholds = fit_qwk_thresholds(scores, y_val, K)
    q_in = qwk(y_val, decode_scores(scores, thresholds), K)
    q_cv: float | None = None
    if len(y_val) >= 2 * n_folds:
        oof = np.empty_like(y_val)
        for tr, te in _folds(y_val, n_folds, seed):
            t_fold = fit_qwk_thresholds(scores[tr], y_val[tr], K)
            oof[te] = decode_scores(scores[te], t_fold)
        q_cv = qwk(y_val, oof, K)
    q_eg = q_cv if q_cv is not None else q_in
    method = "expected_grade" if rank_value(q_eg) > rank_value(q_arg) else "argmax"
    return {
        "method": method,
        "thresholds": thresholds,
        "val_qwk": {"argmax": q_arg, "expected_grade": q_in, "expected_grade_cv": q_cv},
        "selected_by": (
            f"{n_folds}-fold cross-fitted validation QWK"
            if q_cv is not None
            else "in-sample validation QWK (validation set too small to cross-fit)"
        ),
    }
