"""Agreement scores from a confusion matrix: the one home of QWK and balanced accuracy.

Both are written out from the confusion matrix (rather than calling scikit-learn each time)
because the decoding's threshold search and the bootstrap call them thousands of times; they
equal scikit-learn's ``cohen_kappa_score(weights="quadratic", labels=range(K))`` and
``balanced_accuracy_score`` (``tests/evaluation/test_metrics.py`` checks it).

When a score is undefined (no images; kappa's chance agreement is zero, e.g. every true and every
predicted grade the same) it is ``NaN``. Callers that rank candidates treat ``NaN`` as the worst
value (:func:`rank_value`).
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "balanced_accuracy",
    "balanced_accuracy_from_confusion",
    "confusion",
    "finite_or_none",
    "qwk",
    "qwk_from_confusion",
    "rank_value",
]


def confusion(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """K x K confusion matrix, rows = true class, columns = predicted class.

    Parameters
    ----------
    y, pred : array of int, shape (N,)
        True and predicted class indices in ``[0, num_classes)``.
    num_classes : int
        K.

    Returns
    -------
    numpy.ndarray
        int64, shape (K, K).
    """
    y = np.asarray(y, dtype=np.int64)
    pred = np.asarray(pred, dtype=np.int64)
    K = int(num_classes)
    return np.bincount(y * K + pred, minlength=K * K).reshape(K, K)


def qwk_from_confusion(cm: np.ndarray) -> float:
    """Quadratic weighted kappa (Cohen 1968) of a K x K confusion matrix (counts or weights).

    Parameters
    ----------
    cm : array, shape (K, K)
        Rows = true class, columns = predicted class; non-negative counts or weights.

    Returns
    -------
    float
        ``1 - sum(W * cm) / sum(W * E)`` with ``W_ij = (i - j)^2`` and ``E`` the outer product of
        the marginals divided by the total; ``NaN`` when undefined.
    """
    cm = np.asarray(cm, dtype=np.float64)
    K = cm.shape[0]
    W = (np.arange(K)[:, None] - np.arange(K)[None, :]) ** 2.0
    total = cm.sum()
    if total <= 0:
        return float("nan")
    expected = np.outer(cm.sum(axis=1), cm.sum(axis=0)) / total
    den = float(np.sum(W * expected))
    return 1.0 - float(np.sum(W * cm)) / den if den > 0 else float("nan")


def qwk(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Quadratic weighted kappa of graded labels (the DR grading metric of Kaggle 2015 / APTOS).

    Parameters
    ----------
    y, pred : array of int, shape (N,)
        True and predicted grades in ``[0, num_classes)``.
    num_classes : int
        K; the weights are ``(i - j)^2`` over grade indices, whichever grades occur.

    Returns
    -------
    float
        In ``[-1, 1]``; ``NaN`` when undefined.
    """
    return qwk_from_confusion(confusion(y, pred, num_classes))


def balanced_accuracy_from_confusion(cm: np.ndarray) -> float:
    """Mean recall over the classes present (rows with a positive total); ``NaN`` when none."""
    cm = np.asarray(cm, dtype=np.float64)
    rows = cm.sum(axis=1)
    ok = rows > 0
    return float(np.mean(np.diag(cm)[ok] / rows[ok])) if ok.any() else float("nan")


def balanced_accuracy(y: np.ndarray, pred: np.ndarray, num_classes: int) -> float:
    """Balanced accuracy (Brodersen et al. 2010): the mean per-class recall over true classes.

    Parameters
    ----------
    y, pred : array of int, shape (N,)
    num_classes : int

    Returns
    -------
    float
        In ``[0, 1]``; ``NaN`` for no images.
    """
    return balanced_accuracy_from_confusion(confusion(y, pred, num_classes))


def rank_value(score: float) -> float:
    """``score`` for ranking candidates: an undefined (``NaN``) score ranks below every defined
    one (``-inf``)."""
    return float(score) if np.isfinite(score) else float("-inf")


def finite_or_none(v: float | None) -> float | None:
    """A score as JSON can hold it: ``float(v)``, or ``None`` for NaN, infinity and ``None``."""
    return float(v) if v is not None and np.isfinite(v) else None
