"""Calibration: expected calibration error, reliability-curve data and temperature scaling.

Temperature scaling (Guo et al. 2017) divides the logits by one scalar ``T > 0`` fitted on the
VALIDATION split by minimising the negative log-likelihood

    T* = argmin_T  -(1/N) * sum_i log softmax(z_i / T)[y_i]

It changes confidence, never the argmax, so accuracy is unchanged. The NLL is convex in ``1/T``
(log-sum-exp of a linear function minus a linear term), hence unimodal in ``log T``, so a bounded
scalar search over ``log T`` finds the global minimum.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from scipy.special import log_softmax
from scipy.special import softmax as _softmax

__all__ = [
    "apply_temperature",
    "expected_calibration_error",
    "fit_temperature",
    "nll",
    "reliability_curve",
]

_LOG_T_BOUNDS = (np.log(0.05), np.log(20.0))


def _check_probs_labels(probs: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    probs = np.asarray(probs, dtype=np.float64)
    y = np.asarray(y).astype(np.int64).ravel()
    if probs.ndim != 2 or probs.shape[0] != y.shape[0]:
        raise ValueError(f"probs must be (N, K) with N == len(y); got {probs.shape} and {y.shape}")
    return probs, y


def reliability_curve(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> dict[str, Any]:
    """Top-label reliability data: equal-width confidence bins over [0, 1].

    Returns ``{"bin_edges", "confidence", "accuracy", "count", "ece", "n_bins"}``; ``confidence``
    and ``accuracy`` are per-bin means (``None`` for empty bins). Hand-written: scikit-learn's
    ``calibration_curve`` is binary only and returns no bin counts.
    """
    probs, y = _check_probs_labels(probs, y)
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # bins are (lo, hi]; a confidence of exactly 0 goes into the first bin
    idx = np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)
    count = np.bincount(idx, minlength=n_bins)
    conf_sum = np.bincount(idx, weights=conf, minlength=n_bins)
    acc_sum = np.bincount(idx, weights=correct, minlength=n_bins)
    nz = count > 0
    mean_conf = np.where(nz, conf_sum / np.maximum(count, 1), np.nan)
    mean_acc = np.where(nz, acc_sum / np.maximum(count, 1), np.nan)
    n = max(int(count.sum()), 1)
    ece = float(np.sum(np.abs(mean_acc[nz] - mean_conf[nz]) * count[nz]) / n)
    return {
        "n_bins": int(n_bins),
        "bin_edges": edges.tolist(),
        "confidence": [float(v) if ok else None for ok, v in zip(nz, mean_conf, strict=True)],
        "accuracy": [float(v) if ok else None for ok, v in zip(nz, mean_acc, strict=True)],
        "count": count.astype(int).tolist(),
        "ece": ece,
    }


def expected_calibration_error(probs: np.ndarray, y: np.ndarray, n_bins: int = 15) -> float:
    """Top-label ECE: sum over equal-width confidence bins of |accuracy - confidence| * share."""
    return float(reliability_curve(probs, y, n_bins)["ece"])


def nll(logits: np.ndarray, y: np.ndarray, T: float = 1.0) -> float:
    """Mean negative log-likelihood of ``softmax(logits / T)``."""
    logits, y = _check_probs_labels(logits, y)
    logp = log_softmax(logits / float(T), axis=1)
    return float(-logp[np.arange(len(y)), y].mean())


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """Fit the temperature ``T`` minimising validation NLL (bounded search over log T in
    [log 0.05, log 20]); returns ``T`` (``1.0`` if there are no samples)."""
    logits, y = _check_probs_labels(logits, y)
    if len(y) == 0:
        return 1.0
    from scipy.optimize import minimize_scalar  # 0.25 s to import: only when fitting

    res = minimize_scalar(
        lambda log_t: nll(logits, y, float(np.exp(log_t))),
        bounds=_LOG_T_BOUNDS,
        method="bounded",
        options={"xatol": 1e-5},
    )
    return float(np.exp(res.x))


def apply_temperature(logits: np.ndarray, T: float) -> np.ndarray:
    """Probabilities ``softmax(logits / T)`` (float64, rows sum to 1)."""
    if not T > 0:
        raise ValueError(f"temperature must be > 0, got {T}")
    return _softmax(np.asarray(logits, dtype=np.float64) / float(T), axis=1)
