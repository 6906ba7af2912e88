"""Transferability scores computed without training: LogME, NCE, LEEP, prediction entropy.

Every score is finite or a one-line ``MedtuneError``: LogME is maximised in log space (no
overflow on rank-deficient, duplicate-heavy features), and probabilities that would give NaN
(NaN, negative, all-zero rows) are refused.

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
from scipy.optimize import minimize_scalar

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


def _profile_evidence(
    t: np.ndarray, s: np.ndarray, z2: np.ndarray, out_of_span: float, n: int
) -> np.ndarray:
    """Log evidence at ``lambda = alpha / beta = exp(t)`` with beta at its optimum, for each t.

    Bayesian linear model ``w ~ N(0, I/alpha)``, ``y ~ N(F w, I/beta)`` (You et al. 2021):
        log p(y) = n/2 log beta + D/2 log alpha - n/2 log 2pi - beta/2 |F m - y|^2
                   - alpha/2 |m|^2 - 1/2 log|alpha I + beta F^T F|.
    The D - r zero singular values cancel between ``D/2 log alpha`` and the determinant. With
    ``alpha = lambda beta``, ``|F m - y|^2 + lambda |m|^2 = R(lambda) = lambda sum z^2 / (lambda
    + s) + out_of_span``, which is free of beta, and the best beta is ``n / R``. So
        log p = n/2 (log n - 1 - log 2pi) - (n - r)/2 log lambda
                - n/2 log(sum z^2 / (lambda + s) + out_of_span / lambda)
                - 1/2 sum log(lambda + s),
    a function of log lambda alone in which no term can overflow: alpha and beta themselves
    (which run to 1e150 and beyond on rank-deficient features, the old OverflowError) are never
    formed. ``t`` is an array of log lambda values.
    """
    lam = np.exp(t)[:, None]
    fit = np.sum(z2 / (lam + s), axis=1) + out_of_span * np.exp(-t)
    return (
        n / 2 * (np.log(n) - 1.0 - np.log(2 * np.pi))
        - (n - len(s)) / 2 * t
        - n / 2 * np.log(fit)
        - 0.5 * np.sum(np.log(lam + s), axis=1)
    )


def _log_evidence(s: np.ndarray, z: np.ndarray, y_sq: float, n: int) -> float:
    """Maximised log evidence of one target, given the spectrum ``s`` (r,) and ``z = U^T y``.

    The evidence is maximised over ``log lambda`` (see :func:`_profile_evidence`): a grid over
    ``s`` +- 25 orders of magnitude finds the best bracket, ``scipy.optimize.minimize_scalar``
    (bounded Brent) refines it. This is the maximum the alpha/beta fixed point of the paper
    reaches (tests compare with a direct maximisation), found without the fixed point's
    overflow. Both ends of the range are flat limits (lambda -> inf: the noise-only model;
    lambda -> 0 with r = n: an exact fit), except when y lies exactly in the span of the
    features with r < n: then the evidence grows without bound (zero noise) and this raises.
    """
    z2 = z * z
    out_of_span = y_sq - float(z2.sum())
    out_of_span = out_of_span if out_of_span > 1e-10 * y_sq else 0.0  # round-off of an exact span
    if len(s) == 0:
        return float(_profile_evidence(np.zeros(1), s, z2, y_sq, n)[0])
    if out_of_span == 0.0 and len(s) < n:
        raise _Unbounded
    lo = float(np.log(s.min())) - 25 * np.log(10)
    hi = float(np.log(s.max())) + 25 * np.log(10)
    grid = np.linspace(lo, hi, 201)
    values = _profile_evidence(grid, s, z2, out_of_span, n)
    i = int(np.argmax(values))
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    best = minimize_scalar(
        lambda t: -float(_profile_evidence(np.array([t]), s, z2, out_of_span, n)[0]),
        bounds=(a, b),
        method="bounded",
        options={"xatol": 1e-10},
    )
    return float(max(values[i], -best.fun))


class _Unbounded(Exception):
    """A target lies exactly in the span of fewer features than samples (evidence -> inf)."""


def _distinct_rows(F: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``F`` and ``y`` with exact duplicate (feature row, label) pairs kept once."""
    _, keep = np.unique(np.column_stack([F, y.astype(np.float64)]), axis=0, return_index=True)
    keep.sort()
    return F[keep], y[keep]


def logme(features: np.ndarray, labels: np.ndarray, *, side: Side = "auto") -> float:
    """LogME: per-sample log evidence of a Bayesian linear model, averaged over one-hot classes.

    Parameters
    ----------
    features : ndarray, shape (N, D)
        One feature vector per image (any scale: the score is invariant to a global factor).
    labels : ndarray, shape (N,)
        Class label per image (at least two classes).
    side : {"auto", "features", "samples"}, default "auto"
        Gram matrix used for the SVD (``auto``: the smaller of D x D and N x N); all choices
        give the same value up to round-off.

    Returns
    -------
    float
        Mean over classes of the maximised log evidence per sample (nats); higher is better
        (more transferable). Exact duplicates (same feature row and label, e.g. a copied image)
        count once: a copy adds no evidence, and copies make the labels an exact linear
        function of the features, where the evidence has no maximum.

    Raises
    ------
    MedtuneError
        Non-finite features, a single class, or labels that are an exact linear function of
        rank-deficient features even after removing duplicates (the evidence is unbounded).
    """
    F = np.asarray(features, dtype=np.float64)
    y = np.asarray(labels).ravel()
    if F.ndim != 2 or len(F) != len(y):
        raise ValueError(f"features must be N x D with N labels, got {F.shape}, {y.shape}")
    if not np.all(np.isfinite(F)):
        raise MedtuneError("features contain NaN or inf; delete the feature cache and rerun")
    classes, y = np.unique(y, return_inverse=True)
    if len(classes) < 2:
        raise MedtuneError("LogME needs labels of at least two classes")
    scale = float(np.abs(F).max(initial=0.0))
    F = F / scale if scale > 0 else F  # LogME ignores a global scale; F^T F must not overflow
    F, y = _distinct_rows(F, y)
    targets = (y[:, None] == np.arange(len(classes))[None, :]).astype(np.float64)  # one-hot
    s, proj = _spectrum(F, targets, side)
    n = len(y)
    try:
        per_class = [
            _log_evidence(s, proj[:, k], float(targets[:, k].sum()), n) / n
            for k in range(len(classes))
        ]
    except _Unbounded:
        raise MedtuneError(
            f"LogME is unbounded here: the labels are an exact linear function of these "
            f"{F.shape[1]} features (rank {len(s)} < {n} distinct samples), so any score would "
            "be arbitrary; rank these features by the probe score instead"
        ) from None
    value = float(np.mean(per_class))
    if not np.isfinite(value):
        raise MedtuneError(f"LogME came out as {value} for {F.shape} features; check them")
    return value


# ------------------------------------------------------------------------------- NCE and LEEP


def _probabilities(source_probs: np.ndarray, min_classes: int = 1) -> np.ndarray:
    """``source_probs`` (N, C) as float64 rows summing to 1; a one-line error for anything that
    would turn a score into NaN (NaN/inf, negative values, an all-zero row, wrong shape)."""
    p = np.asarray(source_probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[1] < min_classes or len(p) == 0:
        raise ValueError(
            f"source_probs must be N x C with N >= 1, C >= {min_classes}, got {p.shape}"
        )
    if not np.all(np.isfinite(p)) or (p < 0).any():
        raise MedtuneError(
            "source classifier probabilities contain NaN, inf or negative values; delete the "
            "feature cache and rerun"
        )
    total = p.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise MedtuneError(
            f"{int((total <= 0).sum())} row(s) of source classifier probabilities are all zero; "
            "delete the feature cache and rerun"
        )
    return p / total


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
    theta = _probabilities(source_probs)
    y, ny = _index(target_labels)
    if len(theta) != len(y):
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
    p = _probabilities(source_probs, min_classes=2)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -np.sum(p * logs, axis=1)


def mean_prediction_entropy(source_probs: np.ndarray, *, normalise: bool = False) -> float:
    """Mean prediction entropy in nats, or divided by ``log(C)`` (0 confident .. 1 uniform)."""
    h = float(np.mean(prediction_entropies(source_probs)))
    return h / np.log(np.shape(source_probs)[1]) if normalise else h


def mean_max_probability(source_probs: np.ndarray) -> float:
    """Mean top-1 probability of the source classifier (low -> unlike its training images)."""
    return float(np.mean(_probabilities(source_probs).max(axis=1)))
