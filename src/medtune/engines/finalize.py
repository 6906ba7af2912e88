"""The last step of every engine: calibrate and decode on validation, measure val and test (pooled
and per site), fit the site-shift model, save the deployable model and the metrics into the run
folder."""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any

import numpy as np
from torch import nn

from medtune.config import TTA_MODES
from medtune.data import Part
from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature, fit_temperature
from medtune.evaluation.decoding import choose_decoding
from medtune.evaluation.metrics import compute_metrics
from medtune.evaluation.shift import BatchShiftTest, SiteShiftModel
from medtune.runs import ModelMeta, RunData, RunFolder

log = logging.getLogger("medtune")

#: Training images whose features fit the site-shift model (a seeded subsample above this).
SITE_SHIFT_MAX_TRAIN = 2000


def uint8_batches(part: Part, batch_size: int):
    """The part's cached images as uint8 (B, 3, H, W) tensors, in order."""
    import torch

    for start in range(0, len(part.indices), batch_size):
        batch = part.cache.images[part.indices[start : start + batch_size]]
        yield torch.from_numpy(np.array(batch)).permute(0, 3, 1, 2)


class ImageEvaluator:
    """Logits of a model on a part of the data in fp32, the deployment precision, optionally
    with rot90 test-time augmentation (``predict --run`` and the exported ONNX model compute the
    same logits)."""

    def __init__(
        self, model: nn.Module, mean, std, *, batch_size: int = 32, progress: bool = True
    ) -> None:
        self.model = model.eval()
        self.mean, self.std = list(mean), list(std)
        self.batch_size, self.progress = batch_size, progress

    def logits(self, part: Part, tta: str = "none") -> np.ndarray:
        """Logits (N, K) float32 of ``part``'s images, in order."""
        from medtune.evaluation.inference import predict_logits

        return predict_logits(
            self.model,
            uint8_batches(part, self.batch_size),
            mean=self.mean,
            std=self.std,
            tta=tta,
            progress=self.progress,
        )

    def logits_and_features(self, part: Part, tta: str = "none") -> tuple[np.ndarray, np.ndarray]:
        """Logits (N, K) and the pooled features the head sees (N, D), float32, in one pass."""
        from medtune.evaluation.inference import predict_logits_and_features

        return predict_logits_and_features(
            self.model,
            uint8_batches(part, self.batch_size),
            mean=self.mean,
            std=self.std,
            tta=tta,
            progress=self.progress,
        )


def fit_site_shift(
    evaluator: ImageEvaluator,
    train: Part,
    val_features: np.ndarray,
    *,
    max_train: int = SITE_SHIFT_MAX_TRAIN,
    seed: int = 0,
) -> SiteShiftModel:
    """Fit the site-shift model on the trained model's fp32 features of the training images.

    Parameters
    ----------
    evaluator : ImageEvaluator
        The trained model, fed like in deployment.
    train : Part
        The training images; at most ``max_train`` of them (a seeded random subsample) are used.
    val_features : ndarray, shape (M, D)
        Features of the validation images (:meth:`ImageEvaluator.logits_and_features`), which
        set the threshold at their 99th percentile.
    max_train : int, default :data:`SITE_SHIFT_MAX_TRAIN` (2000)
    seed : int, default 0

    Returns
    -------
    SiteShiftModel
        Mahalanobis distance with a Ledoit-Wolf covariance (Lee et al. 2018; Ledoit & Wolf
        2004; :mod:`medtune.evaluation.shift`).

    Raises
    ------
    MedtuneError
        With fewer than 2 training images or non-finite features.
    """
    rows = train.indices
    if len(rows) > max_train:
        rng = np.random.default_rng(seed)
        rows = np.sort(rng.choice(rows, size=max_train, replace=False))
    _, train_features = evaluator.logits_and_features(Part(train.cache, rows))
    return SiteShiftModel.fit(train_features, val_features)


def per_site_metrics(
    part: Part, probs: np.ndarray, **kwargs: Any
) -> dict[str, dict[str, Any]] | None:
    """:func:`compute_metrics` of every site's images (``None`` when the part has no sites).

    ``kwargs`` go to :func:`compute_metrics` unchanged (e.g. ``val=`` the POOLED validation
    labels and probabilities, so every site is scored at the same operating points).
    """
    sites = part.sites
    if sites is None:
        return None
    sites = np.asarray(sites, dtype=object)
    groups = part.groups
    out = {}
    for site in sorted(set(sites.tolist())):
        rows = np.flatnonzero(sites == site)
        try:
            out[site] = compute_metrics(
                part.labels[rows],
                probs[rows],
                groups=None if groups is None else [groups[i] for i in rows],
                **kwargs,
            )
        except (MedtuneError, ValueError) as err:
            out[site] = {"n": len(rows), "error": str(err)}
    return out


def finalize_run(
    model: nn.Module,
    meta: ModelMeta,
    data: RunData,
    run: RunFolder,
    strategy: str,
    *,
    batch_size: int = 32,
    progress: bool = True,
) -> dict[str, Any]:
    """Calibrate, decode, measure and save a trained model.

    Parameters
    ----------
    model : torch.nn.Module
        The trained image-level model.
    meta : ModelMeta
        Its description; ``temperature``, ``decoding`` and ``stage`` are filled in here.
    data : RunData
        Validation (and test) parts.
    run : RunFolder
        Receives ``val_logits.npz``, ``model.safetensors`` + ``model.json`` and ``metrics.json``.
    strategy : str
        Recorded in ``metrics.json``.
    batch_size : int, default 32
    progress : bool, default True

    Returns
    -------
    dict
        ``{"val": ..., "test": ..., "model": ...}`` as written to ``metrics.json``.

    Notes
    -----
    The temperature is fitted by minimising validation negative log-likelihood (Guo et al.
    2017); graded labels choose between argmax and expected-grade thresholds by cross-fitted
    validation QWK (:func:`medtune.evaluation.decoding.choose_decoding`).
    """
    # Deployment precision is fp32 for every run: the temperature, the decoding and the
    # operating points are fitted on the logits that `predict --run` and the exported ONNX model
    # compute (issue: one model, one answer), not on bf16 training-time logits.
    evaluator = ImageEvaluator(model, meta.mean, meta.std, batch_size=batch_size, progress=progress)
    y_val = data.val.labels
    plain, val_features = evaluator.logits_and_features(data.val)
    val_logits = {
        tta: plain if tta == "none" else evaluator.logits(data.val, tta) for tta in TTA_MODES
    }
    run.write_val_logits(y_val, val_logits, data.val.sites)
    temperature = fit_temperature(val_logits["none"], y_val)
    val_probs = apply_temperature(val_logits["none"], temperature)
    decoding = (
        choose_decoding(y_val, val_probs, meta.num_classes)
        if meta.ordinal
        else {"method": "argmax"}
    )
    common = {
        "class_names": meta.class_names,
        "ordinal": meta.ordinal,
        "decoding": decoding,
        "positive_class": meta.positive_class,
        "val_sites": data.val.sites,  # sensitivity points hold at the worst validation site
    }
    metrics = {
        "val": compute_metrics(y_val, val_probs, groups=data.val.groups, **common),
    }
    meta = dataclasses.replace(
        meta,
        temperature=float(temperature),
        decoding=decoding,
        stage=getattr(model, "stage", None),
        operating_points=validated_operating_points(
            y_val, val_logits, temperature, metrics["val"], data.val.groups, common
        ),
    )
    run.write_model(model, meta)
    # the batch shift test's references (evaluate, adapt): validation features and probabilities
    try:
        run.write_batch_shift(BatchShiftTest.fit(val_features, val_probs, data.val.sites))
    except MedtuneError as err:
        log.warning("no batch shift test for this run: %s", err)
    _add_per_site(metrics["val"], data.val, val_probs, val=(y_val, val_probs), **common)
    if data.test is not None:
        test_probs = apply_temperature(evaluator.logits(data.test, "none"), temperature)
        metrics["test"] = compute_metrics(
            data.test.labels,
            test_probs,
            groups=data.test.groups,
            val=(y_val, val_probs),
            **common,
        )
        _add_per_site(metrics["test"], data.test, test_probs, val=(y_val, val_probs), **common)
    metrics["model"] = {
        "temperature": float(temperature),
        "decoding": decoding,
        "strategy": strategy,
        "stage": meta.stage,
        "site_shift": _site_shift(evaluator, data, val_features, run),
    }
    run.write_metrics(metrics)
    return metrics


def validated_operating_points(
    y_val: np.ndarray,
    val_logits: dict[str, np.ndarray],
    temperature: float,
    val_metrics: dict[str, Any],
    groups: Any,
    common: dict[str, Any],
) -> dict[str, Any] | None:
    """The referral thresholds chosen on validation, per TTA mode, for ``ModelMeta``.

    Parameters
    ----------
    y_val : ndarray of int, shape (N,)
        Validation labels.
    val_logits : dict of str to ndarray, shape (N, K)
        Validation logits per TTA mode (``"none"``, ``"rot90"``).
    temperature : float
        The fitted temperature.
    val_metrics : dict
        :func:`compute_metrics` of the plain (``"none"``) validation probabilities, reused.
    groups : sequence or None
        Patient ids (cluster bootstrap of the intervals).
    common : dict
        ``class_names``, ``ordinal`` and ``decoding`` for :func:`compute_metrics`.

    Returns
    -------
    dict or None
        ``None`` when the model has no referral task or validation lacks positives or
        negatives; else the ``ModelMeta.operating_points`` mapping. Sensitivity and
        specificity are those on validation, where the thresholds were chosen (in-sample), with
        95% bootstrap intervals.
    """
    if not val_metrics.get("operating_points"):
        return None
    task = val_metrics["binary_task"]
    points = {}
    for tta, logits in val_logits.items():
        m = val_metrics
        if tta != "none":
            probs = apply_temperature(logits, temperature)
            m = compute_metrics(y_val, probs, groups=groups, **common)
        keys = ("threshold", "rule", "sensitivity", "sensitivity_ci", "specificity", "val_sites")
        points[tta] = {
            name: {k: d.get(k) for k in (*keys, "specificity_ci")}
            for name, d in (m.get("operating_points") or {}).items()
        }
    return {
        "name": task["name"],
        "positive_classes": list(task["positive_class_indices"]),
        "score": task["score"],
        "n_val": int(val_metrics["n"]),
        "n_val_positive": int(task["n_positive"]),
        "points": points,
    }


def _add_per_site(metrics: dict[str, Any], part: Part, probs: np.ndarray, **kwargs: Any) -> None:
    per_site = per_site_metrics(part, probs, **kwargs)
    if per_site is not None:
        metrics["per_site"] = per_site


def _site_shift(
    evaluator: ImageEvaluator, data: RunData, val_features: np.ndarray, run: RunFolder
) -> dict[str, Any] | None:
    """Fit and save ``site_shift.npz``; its scalar description for ``metrics.json`` (``None``
    with a logged warning when it cannot be fitted, e.g. a single training image)."""
    started = time.perf_counter()
    try:
        shift = fit_site_shift(evaluator, data.train, val_features)
    except MedtuneError as err:
        log.warning("no site-shift model for this run: %s", err)
        return None
    run.write_site_shift(shift)
    return {**shift.to_dict(arrays=False), "seconds": round(time.perf_counter() - started, 2)}
