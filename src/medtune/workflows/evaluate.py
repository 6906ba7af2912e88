"""``medtune evaluate``: metrics with intervals, operating points from validation, and the report.

Thresholds, the temperature and the decoding all come from the run's VALIDATION data and are
applied unchanged to the evaluated data. The model is scored through the scorer protocol
(:func:`medtune.evaluation.scoring.score` with the run's
:class:`~medtune.evaluation.inference.TorchScorer`).
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from torch import nn

from medtune.config import TTA_MODES, TrainConfig
from medtune.data import Part
from medtune.deploy.engine import run_scorer
from medtune.errors import MedtuneError
from medtune.evaluation.card import ModelCard
from medtune.evaluation.label_free import score_label_free_points
from medtune.evaluation.metrics import compute_metrics, per_site_metrics
from medtune.evaluation.patients import DEFAULT_PATIENT_RULE, evaluation_patients
from medtune.evaluation.scoring import Scorer, score
from medtune.models.stage_classifier import StageProbeClassifier
from medtune.runs import RunFolder, prepare_run_data, prepare_source
from medtune.runs.data import part_eyes

GRADCAM_PER_CLASS = 1


@dataclass
class EvalResult:
    """Where the evaluation was written and what it measured."""

    dir: Path
    metrics: dict[str, Any]
    report: Path
    #: The evaluation's ``metrics.json`` (:meth:`RunFolder.write_eval_metrics`).
    metrics_path: Path


def evaluate(
    run: str | Path,
    data: str | None = None,
    *,
    tta: str = "none",
    name: str | None = None,
    n_boot: int = 1000,
    gradcam: bool = True,
    quality: bool = True,
    skip_bad: bool = False,
    progress: bool = True,
    patient_rule: str = DEFAULT_PATIENT_RULE,
    engine: str = "onnx",
) -> EvalResult:
    """Evaluate a run's model on labelled images, with intervals and a report.

    Thresholds (operating points), the temperature and the decoding all come from the run's
    VALIDATION data and are applied unchanged to the evaluated data.

    Parameters
    ----------
    run : str or pathlib.Path
        A run folder written by :func:`medtune.train`.
    data : str or None, default None
        A labelled image set, every image of which is evaluated, prepared exactly like the
        training data; ``None`` evaluates the run's own test split.
    tta : {"none", "rot90"}, default "none"
        Test-time augmentation: average the logits of the four 90-degree rotations.
    name : str or None, default None
        Folder under ``RUN/eval/`` (default: from ``data`` and ``tta``, e.g. ``test-tta-rot90``).
    n_boot : int, default 1000
        Bootstrap resamples for the 95% intervals (clustered by patient when groups exist).
    gradcam : bool, default True
        Add Grad-CAM overlays (Selvaraju et al. 2017, through the ``grad-cam`` package) of the
        most confident right and wrong image per class to the report.
    quality : bool, default True
        Run the image-quality gate (:func:`medtune.evaluation.quality.assess_quality`) on every
        evaluated image as prepared for the model: the report shows the share ungradable and
        the metrics on gradable images beside all images (also in ``quality.json``).
    skip_bad : bool, default False
        Leave unreadable images out (listed) instead of failing.
    progress : bool, default True
    patient_rule : {"either-eye", "both-eyes"}, default "either-eye"
        How eyes make a patient's answer (:mod:`medtune.evaluation.patients`). When the data
        names each image's patient (a ``patient_id`` column, DICOM ``PatientID`` or names such
        as ``17_left.jpeg``; :mod:`medtune.data.laterality`), ``metrics["patients"]`` gives
        patient-level sensitivity and specificity (95% Wilson intervals) at each operating
        point and the share of patients with insufficient quality, and the report shows them.
    engine : {"onnx", "torch"}, default "onnx"
        What scores the images (:func:`medtune.deploy.engine.run_scorer`): ONNX Runtime on the
        run's fp32 graph, or PyTorch eager fp32 (the same probabilities to 1e-4, slower).

    Returns
    -------
    EvalResult
        ``RUN/eval/<name>/`` with ``metrics.json``, ``report.html``, ``summary.md`` and
        ``MODEL_CARD.md``; the metrics (keys in ``docs/metrics.md``).

    Raises
    ------
    MedtuneError
        For a folder that is not a finished run, unreadable data, classes the model does not
        know, or an unknown ``tta``.
    """
    folder = RunFolder(Path(run))
    if tta not in TTA_MODES:
        raise MedtuneError(f"tta {tta!r} is unknown; use one of {', '.join(TTA_MODES)}")
    # fp32, the precision the temperature, decoding and operating points were fitted in
    scorer = run_scorer(folder, engine=engine, progress=progress)
    card = scorer.card
    config = dataclasses.replace(folder.read_config(), skip_bad=skip_bad, progress=progress)
    run = folder.dir
    part = _evaluation_part(config, run, data, card.class_names)
    logits, site_shift = _logits_and_site_shift(scorer, part, tta, folder)
    probs = card.probabilities(logits)
    val = folder.read_val_logits()
    val_probs = card.probabilities(val[f"logits_{tta}"])
    settings = {
        "labels": card.label_space,
        "val": (val["labels"], val_probs),
        "decoding": card.decoding,
        "n_boot": n_boot,
        "val_sites": val.get("sites"),  # the worst-site rule, as at training
    }
    metrics = compute_metrics(part.labels, probs, groups=part.groups, **settings)
    per_site = per_site_metrics(part, probs, **settings)  # sites (issue 13)
    if per_site is not None:
        metrics["per_site"] = per_site
    if site_shift is not None:
        metrics["site_shift"] = site_shift
    verdicts = _verdicts(part) if quality else None
    patients = _patients(data, config, part, probs, metrics, verdicts, card, patient_rule)
    if patients is not None:
        metrics["patients"] = patients
    moved = score_label_free_points(part.labels, probs, card.operating_points, tta, part.groups)
    if moved is not None:  # a run adapted without labels (medtune adapt --recalibrate)
        metrics["label_free_operating_points"] = moved
    metrics["tta"] = tta
    metrics["data"] = data or f"{config.data} (test split)"
    name = name or _default_name(data, tta)
    metrics_path = folder.write_eval_metrics(name, metrics)
    out = metrics_path.parent
    summary = _quality_summary(part, probs, settings, verdicts) if quality else None
    if summary is not None:
        folder.write_eval_quality(name, summary)
    examples = _gradcam_examples(folder.load_model()[0], card, part, probs) if gradcam else None
    report = _write_report(out, folder, card, config, metrics, part, probs, examples, summary)
    return EvalResult(out, metrics, report, metrics_path)


def _verdicts(part: Part) -> list[Any]:
    """The image-quality gate on each evaluated image, as prepared for the model."""
    from PIL import Image

    from medtune.evaluation.quality import assess_quality

    return [assess_quality(Image.fromarray(np.asarray(img))) for img in _images(part)]


def _patients(
    data: str | None, config: TrainConfig, part: Part, probs: np.ndarray, metrics: dict,
    verdicts: list[Any] | None, card: ModelCard, rule: str,
) -> dict[str, Any] | None:  # fmt: skip
    """Patient-level figures (:func:`evaluation_patients`) when the data names patients."""
    source = data or config.test_data or config.data
    eyes = part_eyes(source, config, part, card.class_names)
    return evaluation_patients(
        eyes,
        part.labels,
        probs,
        metrics,
        label_space=card.label_space,
        gradable=None if verdicts is None else [v.gradable for v in verdicts],
        decoding=card.decoding,
        rule=rule,
    )


def _quality_summary(
    part: Part, probs: np.ndarray, settings: dict[str, Any], verdicts: list[Any]
) -> dict[str, Any]:
    """The share of ``verdicts`` ungradable with reasons, and the metrics on the gradable images
    alone."""
    from collections import Counter

    ok = np.array([v.gradable for v in verdicts], dtype=bool)
    reasons = Counter(str(v.reason) for v in verdicts if not v.gradable)
    gradable_metrics = None
    if 0 < ok.sum() < len(ok) and len(np.unique(part.labels[ok])) > 1:
        groups = (
            None if part.groups is None else [g for g, k in zip(part.groups, ok, strict=True) if k]
        )
        gradable_metrics = compute_metrics(part.labels[ok], probs[ok], groups=groups, **settings)
    return {
        "n": len(ok),
        "n_ungradable": int((~ok).sum()),
        "reasons": dict(reasons.most_common()),
        "judged_on": "the images as prepared for the model (fundus crop, image size)",
        "gradable_metrics": gradable_metrics,
    }


def _images(part: Part, batch: int = 64):
    """The part's prepared images one by one, read from the cache in batches."""
    for start in range(0, len(part.indices), batch):
        yield from np.asarray(part.cache.images[part.indices[start : start + batch]])


def _logits_and_site_shift(
    scorer: Scorer, part: Part, tta: str, folder: RunFolder
) -> tuple[np.ndarray, dict[str, Any] | None]:
    """The logits with ``tta``, and the share of images outside the training distribution
    (:func:`medtune.evaluation.shift.shift_summary`; ``None`` for a run without
    ``site_shift.npz``) with the batch shift test's verdict on the whole set (``batch``,
    :class:`medtune.evaluation.shift.BatchShiftTest`, counting the part's patient groups). Both
    were fitted on plain (no TTA) features (:func:`medtune.evaluation.scoring.score`)."""
    from medtune.evaluation.shift import shift_summary

    shift, batch = scorer.site_shift, folder.read_batch_shift()
    scored = score(scorer, part.images, tta, features=batch is not None)
    if shift is None and batch is None:
        return scored.logits, None
    summary: dict[str, Any] = {}
    if shift is not None:
        scores = scored.shift_scores
        summary = shift_summary(scores > shift.threshold, shift.percentile)
        summary.update(threshold=shift.threshold, median_score=float(np.median(scores)))
    if batch is not None:
        probs = scorer.card.probabilities(scored.plain)
        summary["batch"] = batch.test(scored.features, probs, part.groups)  # patients count once
    return scored.logits, summary


def _evaluation_part(
    config: TrainConfig, run: Path, data: str | None, class_names: list[str]
) -> Part:
    """The run's test split, or every image of another data set, prepared like the training."""
    if data is None:
        run_data = prepare_run_data(config, run)
        if run_data.test is None:
            raise MedtuneError(
                f"{run}: the run has no test split; evaluate a labelled test set "
                "(data=PATH, --data PATH)"
            )
        return run_data.test
    cache = prepare_source(data, config, run, classes=class_names, progress=config.progress)
    return Part(cache, np.arange(len(cache)))


def _default_name(data: str | None, tta: str) -> str:
    base = "test" if data is None else Path(data.rstrip("/")).stem or "data"
    base = re.sub(r"[^A-Za-z0-9_.-]+", "_", base)
    return base if tta == "none" else f"{base}-tta-{tta}"


def target_layer(model: nn.Module) -> nn.Module:
    """The module whose activations Grad-CAM explains: the last stage used by the classifier."""
    if isinstance(model, StageProbeClassifier):
        spec = model.backbone_info
        name = model.stage or spec.stages[-1].name
        stage = next(s for s in spec.stages if s.name == name)
        return model.body.get_submodule(stage.tap)
    return model.backbone.get_submodule(model.stages[-1].tap)


def _gradcam_examples(model: nn.Module, card: ModelCard, part: Any, probs: np.ndarray) -> list:
    """The most confident right and wrong prediction per true grade, as captioned Grad-CAM
    panels (map, image, "predicted: ..., P = ...; true: ...")."""
    from medtune.evaluation.gradcam import gradcam_maps, select_gradcam_examples
    from medtune.evaluation.plots import GradcamExample

    pred = card.decode(probs)
    picks = select_gradcam_examples(
        part.labels,
        probs,
        card.label_space.grade_names,
        pred=pred,
        n_correct=GRADCAM_PER_CLASS,
        n_wrong=GRADCAM_PER_CLASS,
    )
    if not picks:
        return []
    rows = [i for i, _ in picks]
    images = np.array(part.cache.images[part.indices[rows]])
    maps = gradcam_maps(
        model, target_layer(model), images, card.input_spec, targets=[int(pred[i]) for i in rows]
    )
    return [
        GradcamExample(image, cam, caption)
        for image, cam, (_, caption) in zip(images, maps, picks, strict=True)
    ]


def _header(folder: RunFolder, card: ModelCard, config: TrainConfig, data: str) -> dict:
    """Header facts of the report: model, training data, evaluated data."""
    kind = "linear probe" if card.kind == "probe" else "fine-tuned"
    stage = f", stage {card.stage}" if card.stage else ""
    return {
        "Model": f"{card.backbone} ({kind}{stage}), run folder {folder.dir.name}",
        "Training data": str(config.data),
        "Evaluated data": data,
        "Decoding": (card.decoding or {}).get("method", "argmax"),
    }


#: Card fields left out of the report's model details (long, or told elsewhere in the report).
_NOT_IN_REPORT = ("operating_points", "site_shift", "export")


def _curves_note(card: ModelCard) -> str:
    if card.kind == "probe":
        return (
            "A linear probe is fitted on frozen features in one step, so it has no training "
            "epochs to plot; its layer and L2 choice are in probe.json."
        )
    return "The run has no training log (logs/metrics.csv)."


def _write_report(
    out, folder: RunFolder, card: ModelCard, config, metrics, part, probs, examples, quality
) -> Path:
    from medtune.evaluation.report import write_report

    curves = folder.training_log
    return write_report(
        out,
        metrics={"test": metrics},
        config=config.to_dict(),
        y_true=part.labels,
        probs=probs,
        class_names=card.class_names,
        curves_csv=curves if curves.is_file() else None,
        gradcam_examples=examples,
        title=f"medtune evaluation: {folder.dir.name}",
        synthetic=card.synthetic,
        split="test",
        model_info={k: v for k, v in card.to_dict().items() if k not in _NOT_IN_REPORT},
        header=_header(folder, card, config, str(metrics.get("data"))),
        curves_note=_curves_note(card),
        quality=quality,
        sites=metrics.get("per_site"),
        site_shift=metrics.get("site_shift"),
    )
