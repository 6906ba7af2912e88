"""Linear probes on cached backbone features (transfer scenarios 1 and 3).

A probe is an L2-regularised multinomial logistic regression on standardised features. The
regularisation strength ``C`` is chosen on a validation set (warm-started path over a log grid).
The fitted probe is exposed as a linear layer over the RAW features (``to_linear_weights``): the
standardisation is folded into the weights so the lead can load it straight into an ``nn.Linear``
head on top of the backbone.

Rotation-augmented training: ``X_train`` may hold several rows per image (e.g. 4 rows, one per
rotation by 0/90/180/270 degrees); pass ``y_train`` repeated to match (``np.tile(y, 4)`` for
rotation-major stacking). Class counts used elsewhere (advisor) should count images, not rows. At
prediction time the probe is the model's linear head (``to_linear_weights``); ``tta="rot90"``
averages the logits of the four rotations (:mod:`medtune.evaluation.inference`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedGroupKFold

from medtune.errors import MedtuneError, offer
from medtune.evaluation.scores import balanced_accuracy, qwk, rank_value

DEFAULT_CS: tuple[float, ...] = tuple(float(c) for c in np.logspace(-4, 2, 13))
"""Half-decade grid 1e-4 .. 1e2 (13 values); walked from strong to weak regularisation."""

_TIE_TOL = 1e-9


@dataclass
class ProbeResult:
    """A fitted probe: the chosen ``C``, its validation score and the model (train-fit only)."""

    C: float
    val_score: float
    metric: str
    scores_by_C: dict[float, float]
    val_log_loss: float
    log_loss_by_C: dict[float, float]
    classes: np.ndarray
    mean_: np.ndarray
    scale_: np.ndarray
    model: LogisticRegression = field(repr=False)

    def _standardise(self, X: np.ndarray) -> np.ndarray:
        return (np.asarray(X, dtype=np.float64) - self.mean_) / self.scale_

    def _std_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """Weights in the standardised space, always with one row per class (K, D), (K,)."""
        w = np.asarray(self.model.coef_, dtype=np.float64)
        b = np.asarray(self.model.intercept_, dtype=np.float64)
        if len(self.classes) == 2 and w.shape[0] == 1:
            # sklearn's binary model has one logit z; softmax([-z/2, z/2]) == [1 - s(z), s(z)].
            w = np.vstack([-w[0] / 2, w[0] / 2])
            b = np.array([-b[0] / 2, b[0] / 2])
        return w, b

    @property
    def coef_(self) -> np.ndarray:
        """(K, D) weights over the ORIGINAL (unstandardised) features."""
        return self.to_linear_weights()[0]

    @property
    def intercept_(self) -> np.ndarray:
        """(K,) biases over the ORIGINAL (unstandardised) features."""
        return self.to_linear_weights()[1]

    def to_linear_weights(self) -> tuple[np.ndarray, np.ndarray]:
        """``(W (K, D), b (K,))`` with ``softmax(X @ W.T + b) == predict_proba(X)`` on raw X.

        Rows follow ``classes`` (sorted labels seen in training). Float64; cast for ``nn.Linear``.
        """
        w_std, b_std = self._std_weights()
        w = w_std / self.scale_
        b = b_std - w @ self.mean_
        return w, b

    def decision_function(self, X: np.ndarray) -> np.ndarray:
        w, b = self.to_linear_weights()
        return np.asarray(X, dtype=np.float64) @ w.T + b

    def predict_proba(self, X: np.ndarray) -> np.ndarray:
        """(N, K) class probabilities; columns follow ``classes``."""
        return self.model.predict_proba(self._standardise(X))

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes[np.argmax(self.predict_proba(X), axis=1)]


def _standardiser(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the training features; constant features get scale 1."""
    mean = X.mean(axis=0, dtype=np.float64)
    scale = X.std(axis=0, dtype=np.float64)
    scale[~(scale > 1e-12)] = 1.0
    return mean, scale


def _score(y: np.ndarray, pred: np.ndarray, metric: str) -> float:
    """The selection metric for ranking candidates; an undefined score ranks lowest."""
    K = int(max(y.max(initial=0), pred.max(initial=0))) + 1
    value = qwk(y, pred, K) if metric == "qwk" else balanced_accuracy(y, pred, K)
    return rank_value(value)


def _log_loss(y: np.ndarray, probs: np.ndarray, classes: np.ndarray) -> float:
    col = np.searchsorted(classes, y)
    known = (col < len(classes)) & (classes[np.minimum(col, len(classes) - 1)] == y)
    p = np.full(len(y), 1e-15)
    p[known] = probs[np.flatnonzero(known), col[known]]
    return float(-np.mean(np.log(np.clip(p, 1e-15, 1.0))))


def _check_xy(X: np.ndarray, y: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    X = np.asarray(X)
    y = np.asarray(y).ravel()
    if X.ndim != 2 or len(X) != len(y):
        raise ValueError(f"{what}: X must be N x D, one label per row; got {X.shape}, {y.shape}")
    if not np.all(np.isfinite(X)):
        raise MedtuneError(f"{what} features contain NaN or inf; delete the feature cache, rerun")
    return X, y


def fit_probe(
    X_train: np.ndarray,
    y_train: np.ndarray,
    X_val: np.ndarray,
    y_val: np.ndarray,
    *,
    Cs: Sequence[float] | None = None,
    ordinal: bool | None = None,
    class_weight: str | Mapping[int, float] | None = None,
    seed: int = 0,
    max_iter: int = 500,
) -> ProbeResult:
    """Fit a standardised L2 multinomial logistic probe, choosing ``C`` on the validation set.

    The score is quadratic weighted kappa when ``ordinal`` is true, else balanced accuracy
    (``None`` means not ordinal); ties go to the lower validation log-loss. The model fitted on the
    training rows at the chosen ``C`` is kept (no refit on train+val).
    """
    X_train, y_train = _check_xy(X_train, y_train, "training")
    X_val, y_val = _check_xy(X_val, y_val, "validation")
    if X_val.shape[1] != X_train.shape[1]:
        raise ValueError(f"feature width differs: train {X_train.shape[1]}, val {X_val.shape[1]}")
    classes = np.unique(y_train)
    if len(classes) < 2:
        raise MedtuneError("the training split has a single class; a probe needs at least two")
    if len(y_val) == 0:
        raise MedtuneError(
            "the validation split is empty; give more images"
            + offer(" or a larger {}", "--val-fraction")
            + offer(" or {}", "--val-data")
        )
    metric = "qwk" if ordinal else "balanced_accuracy"
    grid = sorted(float(c) for c in (DEFAULT_CS if Cs is None else Cs))
    mean, scale = _standardiser(X_train)
    dtype = np.float32 if X_train.dtype == np.float32 else np.float64
    z_train = ((X_train - mean) / scale).astype(dtype, copy=False)
    z_val = (X_val - mean) / scale
    clf = LogisticRegression(
        C=grid[0],
        warm_start=True,
        max_iter=max_iter,
        class_weight=class_weight,
        random_state=seed,
    )
    scores: dict[float, float] = {}
    losses: dict[float, float] = {}
    best: tuple[float, float, float, LogisticRegression] | None = None
    for c in grid:
        clf.set_params(C=c)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(z_train, y_train)
        probs = clf.predict_proba(z_val)
        scores[c] = _score(y_val, classes[np.argmax(probs, axis=1)], metric)
        losses[c] = _log_loss(y_val, probs, classes)
        if best is None or _better(scores[c], losses[c], best[1], best[2]):
            best = (c, scores[c], losses[c], copy.deepcopy(clf))
    assert best is not None
    return ProbeResult(
        C=best[0],
        val_score=best[1],
        metric=metric,
        scores_by_C=scores,
        val_log_loss=best[2],
        log_loss_by_C=losses,
        classes=classes,
        mean_=mean,
        scale_=scale,
        model=best[3],
    )


def _better(score: float, loss: float, best_score: float, best_loss: float) -> bool:
    if score > best_score + _TIE_TOL:
        return True
    return abs(score - best_score) <= _TIE_TOL and loss < best_loss


def probe_all_stages(
    features_by_stage: Mapping[str, tuple[np.ndarray, np.ndarray]],
    y_train: np.ndarray,
    y_val: np.ndarray,
    **kw: object,
) -> list[tuple[str, ProbeResult]]:
    """Probe every stage (``{stage: (X_train, X_val)}``); best first by val score, then log-loss."""
    results = [
        (stage, fit_probe(xtr, y_train, xval, y_val, **kw))  # type: ignore[arg-type]
        for stage, (xtr, xval) in features_by_stage.items()
    ]
    return sorted(results, key=lambda r: (-r[1].val_score, r[1].val_log_loss))


def _group_splits(
    y: np.ndarray, groups: np.ndarray, folds: int, seed: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    n_splits = min(
        folds, int(np.bincount(np.unique(y, return_inverse=True)[1]).min()), len(np.unique(groups))
    )
    if n_splits < 2:
        raise MedtuneError(
            "too few images per class (or groups) for cross-validation; need at least 2 per class"
        )
    cv = StratifiedGroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
    return list(cv.split(np.zeros(len(y)), y, groups))


def cv_probe_score(
    X: np.ndarray,
    y: np.ndarray,
    groups: Sequence[object] | np.ndarray | None = None,
    folds: int = 5,
    seed: int = 0,
    *,
    ordinal: bool | None = None,
    Cs: Sequence[float] | None = None,
    max_iter: int = 500,
) -> float:
    """Mean held-out probe score over group-aware stratified folds.

    Honest (nested) estimate: inside each outer training fold, ``C`` is picked on an inner
    group-aware split, and the resulting probe is scored on the untouched outer fold.
    """
    X, y = _check_xy(X, y, "cross-validation")
    g = np.arange(len(y)) if groups is None else np.asarray(groups)
    metric = "qwk" if ordinal else "balanced_accuracy"
    fold_scores = []
    for k, (tr, te) in enumerate(_group_splits(y, g, folds, seed)):
        inner_tr, inner_val = _group_splits(y[tr], g[tr], 4, seed + k + 1)[0]
        fit = fit_probe(
            X[tr][inner_tr],
            y[tr][inner_tr],
            X[tr][inner_val],
            y[tr][inner_val],
            Cs=Cs,
            ordinal=ordinal,
            seed=seed,
            max_iter=max_iter,
        )
        fold_scores.append(_score(y[te], fit.predict(X[te]), metric))
    return float(np.mean(fold_scores))
