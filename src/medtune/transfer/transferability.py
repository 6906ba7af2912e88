"""Transferability scores computed without training: LogME, NCE, LEEP, prediction entropy.

No maintained package implements these, so they are written here from the papers' equations:

- LogME: K. You, Y. Liu, J. Wang, M. Long, "LogME: Practical Assessment of Pre-trained Models for
  Transfer Learning", ICML 2021.
- NCE: A. T. Tran, C. V. Nguyen, T. Hassner, "Transferability and Hardness of Supervised
  Classification Tasks", ICCV 2019.
- LEEP: C. V. Nguyen, T. Hassner, M. Seeger, C. Archambeau, "LEEP: A New Measure to Evaluate
  Transferability of Learned Representations", ICML 2020.

All logarithms are natural (nats).
"""

from __future__ import annotations

from typing import Literal

import numpy as np

from medtune.errors import MedtuneError

_EPS = 1e-300

Side = Literal["auto", "features", "samples"]


# --------------------------------------------------------------------------------------- LogME


def _spectrum(F: np.ndarray, Y: np.ndarray, side: Side = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Non-zero squared singular values ``s`` (r,) of F and the projections ``U^T Y`` (r, K).

    ``F = U diag(sqrt(s)) V^T`` (thin SVD) comes from the eigendecomposition of the smaller Gram
    matrix: ``F^T F`` (D x D) when N >= D, with ``U^T Y = diag(s^-1/2) V^T (F^T Y)`` so U is never
    formed; else ``F F^T`` (N x N), whose eigenvectors are U.
    """
    n, d = F.shape
    if side == "auto":
        side = "features" if n >= d else "samples"
    if side not in ("features", "samples"):
        raise ValueError(f"side must be auto, features or samples, not {side!r}")
    s, vecs = np.linalg.eigh(F.T @ F if side == "features" else F @ F.T)
    keep = s > s.max(initial=0.0) * max(n, d) * np.finfo(np.float64).eps
    s, vecs = s[keep], vecs[:, keep]
    if side == "features":
        return s, (vecs.T @ (F.T @ Y)) / np.sqrt(s)[:, None]
    return s, vecs.T @ Y


def _log_evidence(
    s: np.ndarray, z: np.ndarray, y_sq: float, n: int, tol: float = 1e-12, max_iter: int = 1000
) -> float:
    """Maximised log evidence of one target, given the spectrum and ``z = U^T y``.

    Bayesian linear model ``w ~ N(0, I/alpha)``, ``y ~ N(F w, I/beta)``. With ``A = alpha I +
    beta F^T F`` and posterior mean ``m = beta A^-1 F^T y``:
        log p(y) = n/2 log beta + D/2 log alpha - n/2 log 2pi - beta/2 |F m - y|^2
                   - alpha/2 |m|^2 - 1/2 log|A|.
    The D - r zero singular values contribute ``log alpha`` to both ``D/2 log alpha`` and
    ``log|A|``, cancelling, so only the r non-zero values matter. alpha and beta are updated by
    the fixed point gamma = sum(beta s / (alpha + beta s)), alpha = gamma / |m|^2,
    beta = (n - gamma) / |F m - y|^2, until the per-sample evidence changes by < ``tol``.
    When F spans y exactly (typical for D >= N) beta grows without bound while the evidence
    converges to a finite limit; stopping on the evidence makes that case well defined.
    """
    z2 = z * z
    out_of_span = y_sq - float(z2.sum())
    out_of_span = out_of_span if out_of_span > 1e-10 * y_sq else 0.0  # round-off of an exact span
    alpha, beta = 1.0, 1.0
    evidence = _evidence_at(alpha, beta, s, z2, out_of_span, n)
    for _ in range(max_iter):
        denom = alpha + beta * s
        gamma = float(np.sum(beta * s / denom))
        m_sq = float(np.sum(beta**2 * s * z2 / denom**2))
        res = float(np.sum((alpha / denom) ** 2 * z2)) + out_of_span
        new_alpha, new_beta = gamma / max(m_sq, _EPS), (n - gamma) / max(res, _EPS)
        if not (
            np.isfinite(new_alpha) and np.isfinite(new_beta) and new_alpha > 0 and new_beta > 0
        ):
            break
        new_evidence = _evidence_at(new_alpha, new_beta, s, z2, out_of_span, n)
        if not np.isfinite(new_evidence):
            break
        alpha, beta = new_alpha, new_beta
        done = abs(new_evidence - evidence) <= tol * n
        evidence = new_evidence
        if done:
            break
    return evidence


def _evidence_at(
    alpha: float, beta: float, s: np.ndarray, z2: np.ndarray, out_of_span: float, n: int
) -> float:
    """Log evidence at given alpha, beta (see ``_log_evidence``), over the r non-zero values."""
    denom = alpha + beta * s
    m_sq = float(np.sum(beta**2 * s * z2 / denom**2))
    res = float(np.sum((alpha / denom) ** 2 * z2)) + out_of_span
    # n/2 log beta - 1/2 sum_r log(alpha + beta s) kept stable for large beta
    log_det = float(np.sum(np.log(alpha / beta + s)))
    return (
        (n - len(s)) / 2 * np.log(beta)
        + len(s) / 2 * np.log(alpha)
        - n / 2 * np.log(2 * np.pi)
        - beta / 2 * res
        - alpha / 2 * m_sq
        - 0.5 * log_det
    )


def logme(features: np.ndarray, labels: np.ndarray, *, side: Side = "auto") -> float:
    """LogME: per-sample log evidence of a Bayesian linear model, averaged over one-hot classes.

    Higher is better (more transferable). ``side`` selects the Gram matrix used for the SVD
    (``auto``: the smaller of D x D and N x N); all choices give the same value up to round-off.
    """
    F = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).ravel()
    if F.ndim != 2 or len(F) != len(y):
        raise ValueError(f"features must be N x D with N labels, got {F.shape}, {y.shape}")
    if not np.all(np.isfinite(F)):
        raise MedtuneError("features contain NaN or inf; delete the feature cache and rerun")
    classes = np.unique(y)
    if len(classes) < 2:
        raise MedtuneError("LogME needs labels of at least two classes")
    targets = (y[:, None] == classes[None, :]).astype(np.float64)  # one-hot (N, K)
    s, proj = _spectrum(F, targets, side)
    n = len(y)
    per_class = [
        _log_evidence(s, proj[:, k], float(targets[:, k].sum()), n) / n for k in range(len(classes))
    ]
    return float(np.mean(per_class))


# ------------------------------------------------------------------------------- NCE and LEEP


def _index(values: np.ndarray) -> tuple[np.ndarray, int]:
    _, inverse = np.unique(np.asarray(values).ravel(), return_inverse=True)
    return inverse, int(inverse.max()) + 1


def nce(source_labels_pred: np.ndarray, target_labels: np.ndarray) -> float:
    """Negative conditional entropy ``-H(Y | Z)`` (nats) from empirical joint counts.

    ``Z``: the pretrained classifier's argmax source label per image; ``Y``: the target label.
    0 when Z determines Y; ``-H(Y)`` when Z is independent of Y.
    """
    z, nz = _index(source_labels_pred)
    y, ny = _index(target_labels)
    if len(z) != len(y) or len(y) == 0:
        raise ValueError("source and target labels must be non-empty and of equal length")
    joint = np.zeros((nz, ny))
    np.add.at(joint, (z, y), 1.0)
    joint /= len(y)
    p_z = joint.sum(axis=1, keepdims=True)
    nonzero = joint > 0
    return float(np.sum(joint[nonzero] * np.log((joint / p_z)[nonzero])))


def leep(source_probs: np.ndarray, target_labels: np.ndarray) -> float:
    """LEEP: mean log-likelihood of the target labels under the "empirical predictor".

    ``P(y | z)`` is estimated from the soft joint ``P(y, z) = mean_i theta_i(z) [y_i = y]``, and
    each image is scored by ``log sum_z P(y_i | z) theta_i(z)``. At most 0; higher is better.
    """
    theta = np.asarray(source_probs, dtype=np.float64)
    y, ny = _index(target_labels)
    if theta.ndim != 2 or len(theta) != len(y):
        raise ValueError(f"source_probs must be N x Z with N labels, got {theta.shape}")
    onehot = np.eye(ny)[y]
    joint = onehot.T @ theta / len(y)  # (Y, Z)
    p_z = joint.sum(axis=0, keepdims=True)
    cond = np.divide(joint, p_z, out=np.zeros_like(joint), where=p_z > 0)
    likelihood = np.sum(theta * cond[y], axis=1)
    return float(np.mean(np.log(np.maximum(likelihood, _EPS))))


# ---------------------------------------------------------------------------- prediction entropy


def prediction_entropies(source_probs: np.ndarray) -> np.ndarray:
    """Per-image entropy (nats) of the source classifier's predicted distribution."""
    p = np.asarray(source_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < 2:
        raise ValueError(f"source_probs must be N x C with C >= 2, got {p.shape}")
    p = p / p.sum(axis=1, keepdims=True)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -np.sum(p * logs, axis=1)


def mean_prediction_entropy(source_probs: np.ndarray, *, normalise: bool = False) -> float:
    """Mean prediction entropy in nats, or divided by ``log(C)`` (0 confident .. 1 uniform)."""
    h = float(np.mean(prediction_entropies(source_probs)))
    return h / np.log(np.shape(source_probs)[1]) if normalise else h


def mean_max_probability(source_probs: np.ndarray) -> float:
    """Mean top-1 probability of the source classifier (low -> unlike its training images)."""
    p = np.asarray(source_probs, dtype=np.float64)
    return float(np.mean(p.max(axis=1) / p.sum(axis=1)))
