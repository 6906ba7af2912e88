"""The last step of every engine: calibrate and decode on validation, measure val and test (pooled
and per site), fit the site-shift model, save the deployable model and the metrics into the run
folder.

The model is scored through the scorer protocol by the one inference engine
(:func:`medtune.deploy.engine.model_scorer`: ONNX Runtime on the model's fp32 graph, saved as
``RUN/model.onnx`` for every later answer), and described by the run's
:class:`~medtune.evaluation.card.ModelCard`, whose label space says which task the metrics and the
operating points are for."""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
from torch import nn

from medtune.data import Part
from medtune.deploy.engine import describe, model_scorer, write_run_engine
from medtune.errors import MedtuneError
from medtune.evaluation.calibration import apply_temperature, fit_temperature
from medtune.evaluation.card import ModelCard, SiteShiftRef
from medtune.evaluation.decoding import choose_decoding
from medtune.evaluation.metrics import compute_metrics, per_site_metrics
from medtune.evaluation.operating_points import card_operating_points
from medtune.evaluation.scoring import Scorer, logits_per_tta
from medtune.evaluation.shift import BatchShiftTest, SiteShiftModel
from medtune.runs import RunData, RunFolder

log = logging.getLogger("medtune")

#: Training images whose features fit the site-shift model (a seeded subsample above this).
SITE_SHIFT_MAX_TRAIN = 2000


def fit_batch_shift(val_features: np.ndarray, val_probs: np.ndarray, val: Part) -> BatchShiftTest:
    """The batch shift test's references (what ``evaluate``, ``adapt``, ``predict`` and the page
    compare a batch with): the validation images' features and plain calibrated probabilities,
    with their sites and patient groups (fellow eyes count as one patient).

    Parameters
    ----------
    val_features : ndarray, shape (M, D)
        Pooled fp32 features of the validation images (no TTA).
    val_probs : ndarray, shape (M, K)
        Their calibrated class probabilities (no TTA).
    val : Part
        The validation split (its ``sites`` and ``groups``).

    Returns
    -------
    BatchShiftTest
        Rabanser et al. 2019 (:class:`medtune.evaluation.shift.BatchShiftTest`).

    Raises
    ------
    MedtuneError
        From :meth:`BatchShiftTest.fit` (e.g. fewer than 2 validation images).
    """
    return BatchShiftTest.fit(val_features, val_probs, val.sites, patients=val.groups)


def fit_site_shift(
    scorer: Scorer,
    train: Part,
    val_features: np.ndarray,
    *,
    max_train: int = SITE_SHIFT_MAX_TRAIN,
    seed: int = 0,
) -> SiteShiftModel:
    """Fit the site-shift model on the trained model's fp32 features of the training images.

    Parameters
    ----------
    scorer : Scorer
        The trained model, fed like in deployment.
    train : Part
        The training images; at most ``max_train`` of them (a seeded random subsample) are used.
    val_features : ndarray, shape (M, D)
        Features of the validation images (:meth:`Scorer.logits_and_features`), which
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
    _, train_features = scorer.logits_and_features(Part(train.cache, rows).images)
    return SiteShiftModel.fit(train_features, val_features)


def finalize_run(
    model: nn.Module,
    card: ModelCard,
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
    card : ModelCard
        Its description; ``temperature``, ``decoding``, ``stage``, ``operating_points`` and
        ``site_shift`` are filled in here.
    data : RunData
        Validation (and test) parts.
    run : RunFolder
        Receives ``val_logits.npz``, ``model.safetensors`` + ``model.json``, ``site_shift.npz``
        and ``metrics.json``.
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
    # ... computed by the one inference engine (medtune.deploy.engine), like every later answer
    scorer = model_scorer(
        model, card, batch_size=batch_size, progress=progress, parity_images=data.val.images[:4]
    )
    labels = card.label_space
    y_val = data.val.labels
    plain, val_features = scorer.logits_and_features(data.val.images)
    val_logits = logits_per_tta(scorer, data.val.images, plain)
    run.write_val_logits(y_val, val_logits, data.val.sites)
    temperature = fit_temperature(val_logits["none"], y_val)
    val_probs = apply_temperature(val_logits["none"], temperature)
    decoding = (
        choose_decoding(y_val, val_probs, card.num_classes)
        if labels.ordinal
        else {"method": "argmax"}
    )
    # sensitivity points hold at the worst validation site
    common = {"labels": labels, "decoding": decoding, "val_sites": data.val.sites}
    metrics = {"val": compute_metrics(y_val, val_probs, groups=data.val.groups, **common)}
    card = card.replace(
        temperature=float(temperature),
        decoding=decoding,
        stage=getattr(model, "stage", None),
        operating_points=card_operating_points(
            y_val, val_logits, float(temperature), labels, data.val.groups, data.val.sites
        ),
    )
    run.write_model(model, card)
    if describe(scorer) == "onnx":  # RUN/model.onnx: what predict, evaluate and serve run
        write_run_engine(run, scorer)
    try:
        run.write_batch_shift(fit_batch_shift(val_features, val_probs, data.val))
    except MedtuneError as err:
        log.warning("no batch shift test for this run: %s", err)
    _add_per_site(metrics["val"], data.val, val_probs, val=(y_val, val_probs), **common)
    if data.test is not None:
        test_probs = apply_temperature(scorer.logits(data.test.images, "none"), temperature)
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
        "stage": card.stage,
        "engine": describe(scorer),
        "site_shift": _site_shift(scorer, data, val_features, run),
    }
    run.write_metrics(metrics)
    return metrics


def _add_per_site(metrics: dict[str, Any], part: Part, probs: np.ndarray, **kwargs: Any) -> None:
    per_site = per_site_metrics(part, probs, **kwargs)
    if per_site is not None:
        metrics["per_site"] = per_site


def _site_shift(
    scorer: Scorer, data: RunData, val_features: np.ndarray, run: RunFolder
) -> dict[str, Any] | None:
    """Fit and save ``site_shift.npz`` and name it in the model card; its scalar description for
    ``metrics.json`` (``None`` with a logged warning when it cannot be fitted, e.g. a single
    training image)."""
    started = time.perf_counter()
    try:
        shift = fit_site_shift(scorer, data.train, val_features)
    except MedtuneError as err:
        log.warning("no site-shift model for this run: %s", err)
        return None
    run.write_site_shift(shift)
    run.update_card(site_shift=SiteShiftRef(RunFolder.SITE_SHIFT, shift.to_dict(arrays=False)))
    return {**shift.to_dict(arrays=False), "seconds": round(time.perf_counter() - started, 2)}
