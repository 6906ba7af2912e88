"""``medtune predict``: the screening output of every image, with a trained run or an exported
ONNX model.

Per image: the image-quality verdict, the decoded grade and its name, the calibrated probability
of every grade, P(referable) and the referral flag at an operating point chosen on validation
(``docs/screening.md``, "Referral output"). The run's own preprocessing (fundus crop, size,
normalisation), temperature and decoding are applied; with an exported ``model.onnx`` the ONNX
Runtime predictor is used instead (no PyTorch in the loop) and the rows are the same.

:func:`predict_images` is the one place rows are made from decoded images; :func:`predict`
(files) and the web page call it, and :func:`to_csv` is the one CSV writer.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medtune.config import TTA_MODES
from medtune.data.images import is_listed_image, iter_image_files
from medtune.data.preprocess import decode_source, prepare_image
from medtune.errors import BadImageError, MedtuneError
from medtune.evaluation.decoding import decode
from medtune.evaluation.grades import grade_names
from medtune.evaluation.patients import DEFAULT_PATIENT_RULE, PatientScreening, screen_patients
from medtune.evaluation.referral import (
    DEFAULT_OPERATING_POINT,
    PredictionRow,
    ReferralRule,
    build_rows,
    format_figure,
    predictions_meta,
    referral_rule,
)
from medtune.io import write_json, write_text
from medtune.runs import RunFolder
from medtune.workflows.predict_journal import PredictJournal, fingerprint

BATCH = 32
QUALITY_RULE = (
    "medtune.evaluation.quality.assess_quality on the network input (field of view cropped, "
    "at the model's image size; docs/screening.md, Image-quality gate)"
)


def expand_inputs(inputs: Sequence[str]) -> list[Path]:
    """Files, folders (searched recursively for images) and glob patterns, in a stable order."""
    found: list[Path] = []
    for item in inputs:
        matches = sorted(glob.glob(item, recursive=True)) if glob.has_magic(item) else [item]
        if not matches:
            raise MedtuneError(f"{item}: no file matches this pattern; check the path")
        for match in matches:
            path = Path(match)
            if path.is_dir():
                found.extend(iter_image_files(path))
            elif path.is_file():
                if glob.has_magic(item) and not is_listed_image(path):  # walker's rule
                    continue
                found.append(path)
            else:
                raise MedtuneError(f"{path}: no such file or folder; check the path")
    if not found:
        raise MedtuneError(f"{', '.join(inputs)}: no images found; give image files or folders")
    return found


# ---------------------------------------------------------------------------- the model


@dataclass
class Predictor:
    """A loaded model (a PyTorch run or an ONNX export) and what reading its outputs needs.

    Make one with :func:`load_predictor`; pass it to :func:`predict_images`.

    Attributes
    ----------
    source : str
        The run folder or ``model.onnx``.
    class_names : list of str
        Class names in logit order.
    ordinal : bool
        Graded labels.
    decoding : dict
        How probabilities become a grade (:func:`medtune.evaluation.decoding.decode`).
    operating_points : dict or None
        Validated referral thresholds (``ModelMeta.operating_points``).
    image_size : int
        Network input side, pixels.
    fundus : dict
        Fundus preprocessing options.
    tta : str
        Test-time augmentation.
    backbone : str or None
        The network.
    positive_class : str or None
        The positive class of a two-class model.
    """

    source: str
    class_names: list[str]
    ordinal: bool
    decoding: dict[str, Any]
    operating_points: dict[str, Any] | None
    image_size: int
    fundus: dict[str, Any]
    tta: str
    backbone: str | None
    positive_class: str | None
    #: prepared uint8 images (N, S, S, 3) -> calibrated probabilities (N, K) and, for a run
    #: with a site-shift model, the images' site-shift scores (N,) (else None)
    infer: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray | None]] = field(repr=False)
    #: site-shift score above which an image is outside the training distribution
    shift_threshold: float | None = None
    #: a learned image-quality model (a run trained on quality grades) judged beside the gate
    quality_model: Predictor | None = field(default=None, repr=False)
    torch_model: Any = field(default=None, repr=False)
    torch_meta: Any = field(default=None, repr=False)

    def probs(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, K) of prepared uint8 images (N, S, S, 3)."""
        return self.infer(images)[0]

    @property
    def grade_names(self) -> list[str]:
        """Display names of the grades (DR grade names for a 5-grade DR model)."""
        return grade_names(self.class_names, self.ordinal)

    def referral(self, operating_point: str = DEFAULT_OPERATING_POINT) -> ReferralRule | None:
        """The referral rule at ``operating_point`` (None: the model has no referral task)."""
        return referral_rule(
            self.class_names,
            self.ordinal,
            self.operating_points,
            operating_point,
            self.tta,
            self.positive_class,
        )


def load_predictor(
    *,
    run: str | Path | None = None,
    model_path: str | Path | None = None,
    tta: str = "none",
    num_threads: int | None = None,
    quality_model: str | Path | None = None,
) -> Predictor:
    """Load a run (PyTorch) or an exported ``model.onnx`` (ONNX Runtime) for prediction.

    Parameters
    ----------
    run : str or pathlib.Path, optional
        A run folder.
    model_path : str or pathlib.Path, optional
        An exported ``model.onnx`` (or its folder) with its ``model.json``. Exactly one of
        ``run`` and ``model_path`` is given.
    tta : {"none", "rot90"}, default "none"
        Average the logits of the four 90-degree rotations.
    num_threads : int, optional
        ONNX Runtime's intra-op threads (default: its own, one per core). A server running
        several batches at once gives each a share of the cores (``medtune serve``).
    quality_model : str or pathlib.Path, optional
        A run trained on image-quality grades (e.g. EyeQ's Good / Usable / Reject folders) whose
        classes include one named like Reject / Ungradable / Bad / Poor: an image it assigns to
        that class is ungradable too, beside the rule-based gate (``docs/screening.md``).

    Returns
    -------
    Predictor

    Raises
    ------
    MedtuneError
        For no or both model sources, an unknown ``tta``, or a folder without a model.
    """
    if (run is None) == (model_path is None):
        raise MedtuneError("give either run (a run folder) or model_path (an exported model.onnx)")
    if tta not in TTA_MODES:
        raise MedtuneError(f"tta {tta!r} is unknown; use one of {', '.join(TTA_MODES)}")
    if model_path is not None:
        predictor = _onnx_predictor(Path(model_path), tta, num_threads)
    else:
        predictor = _run_predictor(Path(run), tta)
    if quality_model is not None:
        predictor.quality_model = _run_predictor(Path(quality_model), "none")
        reject_class(predictor.quality_model.class_names, quality_model)  # fails early
    return predictor


#: Class names of a learned quality model that mean "ungradable" (compared lowercased).
REJECT_NAMES = ("reject", "rejected", "ungradable", "bad", "poor", "insufficient")


def reject_class(class_names: Sequence[str], source: object = "quality model") -> int:
    """Index of the quality model's class meaning "ungradable".

    Raises
    ------
    MedtuneError
        When no class is named like one of :data:`REJECT_NAMES`.
    """
    for i, name in enumerate(class_names):
        if str(name).strip().lower() in REJECT_NAMES:
            return i
    raise MedtuneError(
        f"{source}: a quality model needs a class named like {'/'.join(REJECT_NAMES)} "
        f"(its classes are {list(class_names)}); train it on folders such as Good/Usable/Reject"
    )


def _onnx_predictor(model_path: Path, tta: str, num_threads: int | None = None) -> Predictor:
    from medtune.deploy.onnx_predictor import OnnxPredictor
    from medtune.evaluation.calibration import apply_temperature

    onnx = OnnxPredictor(model_path, num_threads=num_threads)
    sidecar = onnx.sidecar

    def infer(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """Scores from the plain images' features, as for a run (the site-shift fit had no TTA)."""
        logits, scores = onnx.site_shift_scores(images)
        if tta != "none":
            logits = onnx.logits(images, tta=tta)
        return apply_temperature(logits, onnx.temperature), scores

    return Predictor(
        source=str(model_path),
        class_names=onnx.class_names,
        ordinal=bool(sidecar.get("ordinal", False)),
        decoding=onnx.decoding,
        operating_points=sidecar.get("operating_points"),
        image_size=onnx.image_size,
        fundus=sidecar.get("fundus") or {"crop": False},
        tta=tta,
        backbone=sidecar.get("backbone"),
        positive_class=sidecar.get("positive_class"),
        infer=infer,
        shift_threshold=None if onnx.site_shift is None else float(onnx.site_shift.threshold),
    )


def _run_predictor(run: Path, tta: str) -> Predictor:
    import torch

    from medtune.evaluation.calibration import apply_temperature
    from medtune.evaluation.inference import predict_logits, predict_logits_and_features

    folder = RunFolder(run)
    model, meta = folder.load_model()

    shift_model = folder.read_site_shift()
    norm = {"mean": meta.mean, "std": meta.std}

    def infer(images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """fp32: the same probabilities as the exported ONNX model."""
        batch = torch.from_numpy(images).permute(0, 3, 1, 2)
        scores = None
        if shift_model is None or tta != "none":
            logits = predict_logits(model, [batch], tta=tta, **norm)
        if shift_model is not None:  # the features the site-shift model was fitted on (no TTA)
            plain, feats = predict_logits_and_features(model, [batch], **norm)
            logits = plain if tta == "none" else logits
            scores = shift_model.score(feats)
        return apply_temperature(logits, meta.temperature), scores

    return Predictor(
        source=str(run),
        class_names=list(meta.class_names),
        ordinal=meta.ordinal,
        decoding=dict(meta.decoding),
        operating_points=meta.operating_points or _points_from_val_logits(folder, meta),
        image_size=meta.image_size,
        fundus=dict(meta.fundus),
        tta=tta,
        backbone=meta.backbone,
        positive_class=meta.positive_class,
        infer=infer,
        shift_threshold=None if shift_model is None else float(shift_model.threshold),
        torch_model=model,
        torch_meta=meta,
    )


def _points_from_val_logits(folder: RunFolder, meta: Any) -> dict[str, Any] | None:
    """Runs trained before ``ModelMeta.operating_points``: choose them from ``val_logits.npz``
    exactly as training now does."""
    from medtune.engines.finalize import validated_operating_points
    from medtune.evaluation.calibration import apply_temperature
    from medtune.evaluation.metrics import compute_metrics

    try:
        val = folder.read_val_logits()
    except MedtuneError:
        return None
    logits = {k[len("logits_") :]: v for k, v in val.items() if k.startswith("logits_")}
    common = {
        "class_names": meta.class_names,
        "ordinal": meta.ordinal,
        "decoding": meta.decoding,
        "positive_class": meta.positive_class,
    }
    probs = apply_temperature(logits["none"], meta.temperature)
    metrics = compute_metrics(val["labels"], probs, **common)
    return validated_operating_points(
        val["labels"], logits, meta.temperature, metrics, None, common
    )


# ---------------------------------------------------------------------------- rows


def assess_image_quality(img: np.ndarray) -> tuple[bool, str | None]:
    """``(gradable, reason)`` of a network input (:func:`medtune.evaluation.quality.assess_quality`
    on the uint8 working-size image of :func:`medtune.data.preprocess.prepare_image`)."""
    from medtune.evaluation.quality import assess_quality

    verdict = assess_quality(img)
    return bool(verdict.gradable), verdict.reason


@dataclass
class PreparedBatch:
    """Decoded images ready for the model: names, network inputs and quality verdicts."""

    names: list[str]
    images: np.ndarray  # uint8 N x S x S x 3
    quality: list[tuple[bool, str | None] | None]


def prepare_batch(
    names: Sequence[str], images: Sequence[Image.Image], predictor: Predictor
) -> PreparedBatch:
    """Preprocess each decoded image as training did, then judge its quality on that input.

    Parameters
    ----------
    names : sequence of str
        One name per image.
    images : sequence of PIL.Image.Image
        Decoded images (any size; :func:`medtune.data.preprocess.decode_source`).
    predictor : Predictor
        Supplies the input size and fundus options.

    Returns
    -------
    PreparedBatch
    """
    arrays = [prepare_image(img, predictor.image_size, predictor.fundus) for img in images]
    quality = [assess_image_quality(arr) for arr in arrays]
    if predictor.quality_model is not None and images:
        quality = _learned_quality(images, predictor.quality_model, quality)
    size = predictor.image_size
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return PreparedBatch(list(names), stacked, quality)


def _learned_quality(
    images: Sequence[Image.Image], model: Predictor, gate: list[tuple[bool, str | None]]
) -> list[tuple[bool, str | None]]:
    """The gate's verdicts, with images the learned quality model rejects made ungradable."""
    reject = reject_class(model.class_names, model.source)
    arrays = np.stack([prepare_image(img, model.image_size, model.fundus) for img in images])
    probs = model.probs(arrays)
    out = []
    for (ok, reason), p in zip(gate, probs, strict=True):
        if ok and int(np.argmax(p)) == reject:
            name = model.class_names[reject]
            ok, reason = False, f"quality model: {name} (P = {p[reject]:.2f})"
        out.append((ok, reason))
    return out


def _predict_batch(
    batch: PreparedBatch, predictor: Predictor, rule: ReferralRule | None
) -> tuple[list[PredictionRow], np.ndarray, np.ndarray]:
    probs, scores = predictor.infer(batch.images)
    labels = decode(probs, predictor.decoding)
    shift = None if scores is None else (scores, float(predictor.shift_threshold))
    rows = build_rows(
        batch.names,
        probs,
        labels,
        predictor.class_names,
        predictor.ordinal,
        predictor.decoding,
        rule,
        batch.quality,
        shift,
    )
    return rows, probs, labels


def predict_images(
    names: Sequence[str],
    images: Sequence[Image.Image],
    predictor: Predictor,
    *,
    operating_point: str = DEFAULT_OPERATING_POINT,
) -> list[PredictionRow]:
    """Screening rows for decoded images (the web page's entry point; :func:`predict` uses the
    same steps for files).

    Parameters
    ----------
    names : sequence of str
        One name per image (shown in the ``image`` column).
    images : sequence of PIL.Image.Image
        Decoded images, e.g. ``medtune.data.preprocess.decode_source(path)`` or an upload
        opened with Pillow.
    predictor : Predictor
        From :func:`load_predictor`.
    operating_point : {"sens90", "sens97.5", "youden"}, default "sens90"
        The validated threshold the ``refer`` flag uses.

    Returns
    -------
    list of PredictionRow
        In input order.
    """
    rows, _, _ = _predict_batch(
        prepare_batch(names, images, predictor), predictor, predictor.referral(operating_point)
    )
    return rows


def prediction_meta(predictor: Predictor, operating_point: str) -> dict[str, Any]:
    """The sidecar that explains a predictions file (:func:`predictions_meta`)."""
    return predictions_meta(
        model=predictor.source,
        class_names=predictor.class_names,
        ordinal=predictor.ordinal,
        decoding=predictor.decoding,
        rule=predictor.referral(operating_point),
        operating_points=predictor.operating_points,
        tta=predictor.tta,
        quality=QUALITY_RULE,
        backbone=predictor.backbone,
    )


# ---------------------------------------------------------------------------- files


def predict(
    inputs: Sequence[str | Path],
    *,
    run: str | Path | None = None,
    model_path: str | Path | None = None,
    out: str | Path | None = None,
    json_path: str | Path | None = None,
    explain: str | Path | None = None,
    operating_point: str = DEFAULT_OPERATING_POINT,
    tta: str = "none",
    skip_bad: bool = False,
    progress: bool = True,
    predictor: Predictor | None = None,
    quality_model: str | Path | None = None,
    resume: bool = False,
    manifest: str | Path | None = None,
    patient_rule: str = DEFAULT_PATIENT_RULE,
) -> list[dict[str, Any]]:
    """Screen every image with a trained run or an exported ONNX model.

    Each image is decoded once; its quality is judged on the decoded image, then the model's own
    preprocessing (field-of-view crop, image size, normalisation), temperature and decoding are
    applied, and the referral flag is set at a threshold chosen on the run's VALIDATION data.

    Parameters
    ----------
    inputs : sequence of str or pathlib.Path
        Image files, folders (searched recursively, hidden and system files skipped) and glob
        patterns.
    run : str or pathlib.Path, optional
        A run folder (PyTorch, fp32: the same probabilities as the exported ONNX model).
    model_path : str or pathlib.Path, optional
        An exported ``model.onnx`` with its ``model.json`` (ONNX Runtime, no PyTorch).
        Exactly one of ``run`` and ``model_path`` is given; both give the same columns.
    out : str or pathlib.Path, optional
        Write the rows as CSV here (atomically) and what they mean to ``<out stem>.meta.json``;
        skipped images go to ``<out stem>.skipped.csv``.
    json_path : str or pathlib.Path, optional
        Write ``{"meta": ..., "predictions": [row, ...]}`` as JSON here.
    explain : str or pathlib.Path, optional
        Folder for Grad-CAM figures (Selvaraju et al. 2017, ``grad-cam`` package), one PNG per
        image named after it: the map over the field of view, a colour bar and a caption with
        the predicted grade and its probability (``run`` only).
    operating_point : {"sens90", "sens97.5", "youden"}, default "sens90"
        The validated threshold on ``p_referable`` that sets ``refer``. ``sens90`` (the most
        specific threshold that reached 90% sensitivity on validation) suits screening, where a
        missed referable case costs more than an extra referral; see ``docs/screening.md``.
    tta : {"none", "rot90"}, default "none"
        Average the logits of the four 90-degree rotations (thresholds validated with it).
    skip_bad : bool, default False
        Leave unreadable images out (listed) instead of failing.
    progress : bool, default True
    predictor : Predictor, optional
        A model already loaded with :func:`load_predictor` (instead of ``run``, ``model_path``
        and ``tta``): ``medtune serve`` loads it once and predicts every request with it.
    quality_model : str or pathlib.Path, optional
        A run trained on quality grades (Good/Usable/Reject): images it calls Reject are
        ungradable too (:func:`load_predictor`).
    resume : bool, default False
        Continue a killed call with the same images, model and settings: the batches it
        finished (kept in ``<out stem>.journal.jsonl``, or beside ``json_path``) are not
        predicted again, and the output has exactly the rows of an uninterrupted call.
    manifest : str or pathlib.Path, optional
        A CSV ``image,patient_id,eye`` naming each image's patient and eye; without it DICOM
        ``PatientID`` + ``ImageLaterality`` and file names such as ``17_left.jpeg`` or
        ``P1_OD.jpg`` are used (:mod:`medtune.data.laterality`). When any image's patient is
        known, ``out`` also gets ``<out stem>.eyes.csv`` (one row per eye: the highest grade
        of its gradable images, or ungradable) and ``<out stem>.patients.csv`` (one row per
        patient: refer / no / insufficient quality), and the JSON ``eyes`` and ``patients``
        (:func:`medtune.evaluation.patients.screen_patients`).
    patient_rule : {"either-eye", "both-eyes"}, default "either-eye"
        How eyes make a patient's answer (:data:`medtune.evaluation.patients.PATIENT_RULES`).

    Returns
    -------
    list of dict
        One per image, in column order: ``image``, ``quality`` (``gradable``/``ungradable``,
        by :func:`medtune.evaluation.quality.assess_quality` on the network input the model
        sees, at its image size), ``quality_reason`` (its reason),
        ``grade`` (decoded grade index), ``grade_name`` (``"No DR"`` ... ``"Proliferative
        DR"`` for 5-grade DR models, else the class name), ``p_<grade name>`` (calibrated
        probability of each grade), ``expected_grade`` (only with expected-grade decoding),
        and, for DR grading and binary models, ``p_referable`` (sum of the probabilities of
        grades >= 2, or of the positive class) and ``refer`` (``yes``/``no`` at the operating
        point, ``ungradable`` for ungradable images, empty when the model has no validated
        thresholds).

    Raises
    ------
    MedtuneError
        For no or both model sources, no images found, an unknown operating point, explain with
        an ONNX model, or an unreadable image (naming the file) without ``skip_bad``.
    """
    if predictor is None:
        predictor = load_predictor(
            run=run, model_path=model_path, tta=tta, quality_model=quality_model
        )
    rule = predictor.referral(operating_point)  # fails early on an unknown point
    if explain and predictor.torch_model is None:
        raise MedtuneError("explain needs run (Grad-CAM needs the PyTorch model, not model.onnx)")
    paths = expand_inputs([str(item) for item in inputs])
    skipped: list[tuple[str, str]] = []
    written: set[str] = set()
    meta = prediction_meta(predictor, operating_point)
    journal = _journal(out or json_path, meta, predictor, paths, skip_bad, resume)

    def load(chunk: list[Path]) -> PreparedBatch:
        return _prepare_files(chunk, predictor, skip_bad, skipped)

    for batch in _prefetched(journal.pending(_batches(paths, progress)), load):
        new: list[PredictionRow] = []
        if batch.names:
            new, probs, labels = _predict_batch(batch, predictor, rule)
            if explain:
                _write_gradcam(predictor, batch, new, labels, Path(explain), written)
        journal.record(new, skipped)  # a killed run continues from here with --resume
    rows, skipped = journal.results()
    grouped = screen_patients(rows, manifest=manifest, rule=patient_rule)
    if grouped is not None:
        meta["patients"] = grouped.meta()
    if out:
        write_text(out, to_csv(rows))
        write_json(Path(out).with_suffix(".meta.json"), meta)
        if skipped:
            write_text(
                Path(out).with_suffix(".skipped.csv"), _csv_text(["image", "reason"], skipped)
            )
        for name, items in _patient_sections(grouped).items():
            write_text(Path(out).with_suffix(f".{name}.csv"), to_csv(items))
    if json_path:
        write_text(json_path, to_json(rows, meta, _patient_sections(grouped)))
    journal.close()
    return [_as_dict(row) for row in rows]


def _journal(
    output: str | Path | None,
    meta: dict[str, Any],
    predictor: Predictor,
    paths: list[Path],
    skip_bad: bool,
    resume: bool,
) -> PredictJournal:
    """The journal of finished batches beside the output (:mod:`.predict_journal`)."""
    quality = predictor.quality_model.source if predictor.quality_model else None
    request = {"meta": {k: v for k, v in meta.items() if k != "created"}, "skip_bad": skip_bad}
    models = [predictor.source] + ([quality] if quality else [])
    key = fingerprint(request, [str(p) for p in paths], BATCH, models)
    return PredictJournal.start(output, key, resume=resume)


def _prepare_files(
    paths: list[Path], predictor: Predictor, skip_bad: bool, skipped: list
) -> PreparedBatch:
    """Decode each file once (as training did), skipping unreadable ones when asked."""
    names, images = [], []
    for path in paths:
        try:  # only as large as the network input needs (JPEG DCT scaling)
            images.append(decode_source(str(path), min_side=predictor.image_size))
            names.append(str(path))
        except BadImageError as err:
            if not skip_bad:
                raise
            skipped.append((str(path), str(err)))
    return prepare_batch(names, images, predictor)


def _cell(value: Any) -> Any:
    if isinstance(value, float):
        return format_figure(value)  # never "1.000000" for 0.99999999999998
    return "" if value is None else value


def _csv_text(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")  # RFC 4180 quoting of any name or value
    writer.writerow(header)
    writer.writerows([_cell(v) for v in row] for row in rows)
    return buf.getvalue()


def _as_dict(row: PredictionRow | Mapping[str, Any]) -> dict[str, Any]:
    return row.as_dict() if isinstance(row, PredictionRow) else dict(row)


def to_csv(rows: Iterable[PredictionRow | Mapping[str, Any]]) -> str:
    """The predictions as CSV text (the one CSV writer of predictions).

    Parameters
    ----------
    rows : iterable of PredictionRow or dict
        As returned by :func:`predict` or :func:`predict_images`; the first row's keys are the
        header.

    Returns
    -------
    str
        CSV with a header line (``csv`` module quoting: names with commas or quotes are safe);
        figures with six decimals, more where six would round one to a whole number it is
        not (:func:`~medtune.evaluation.referral.format_figure`); empty text for no rows.
    """
    dicts = [_as_dict(r) for r in rows]
    if not dicts:
        return ""
    header = list(dicts[0])
    return _csv_text(header, ([d.get(k) for k in header] for d in dicts))


def to_json(
    rows: Iterable[PredictionRow | Mapping[str, Any]],
    meta: Mapping[str, Any],
    sections: Mapping[str, list[dict[str, Any]]] | None = None,
) -> str:
    """``{"meta": meta, "predictions": [row, ...], **sections}`` as indented JSON text (same
    fields as the CSV and its ``.meta.json``; ``sections`` e.g. ``eyes`` and ``patients``)."""
    doc = {"meta": meta, "predictions": [_as_dict(r) for r in rows], **(sections or {})}
    return json.dumps(doc, indent=2) + "\n"


def _patient_sections(grouped: PatientScreening | None) -> dict[str, list[dict[str, Any]]]:
    """The eye and patient rows (``.eyes.csv``, ``.patients.csv``), empty when ungrouped."""
    if grouped is None:
        return {}
    return {
        "eyes": [e.to_dict() for e in grouped.eyes],
        "patients": [p.to_dict() for p in grouped.patients],
    }


def _batches(paths: list[Path], progress: bool):
    starts = range(0, len(paths), BATCH)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not progress):
        yield paths[start : start + BATCH]


def _prefetched(chunks: Iterable[list[Path]], load):  # noqa: ANN001, ANN202
    """``load(chunk)`` for each chunk, the next one decoded in a thread while the caller runs the
    model on the current one (Pillow's decoders and most NumPy/SciPy work release the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for chunk in chunks:
            ahead = pool.submit(load, chunk)
            if pending is not None:
                yield pending.result()
            pending = ahead
        if pending is not None:
            yield pending.result()


def _write_gradcam(
    predictor: Predictor,
    batch: PreparedBatch,
    rows: list[PredictionRow],
    labels: np.ndarray,
    folder: Path,
    written: set,
) -> None:
    """One captioned Grad-CAM figure per image, named after the image, always inside ``folder``."""
    from medtune.evaluation.gradcam import gradcam_maps
    from medtune.evaluation.plots import GradcamExample, gradcam_png, prediction_caption
    from medtune.workflows.evaluate import target_layer

    model, meta = predictor.torch_model, predictor.torch_meta
    maps = gradcam_maps(
        model, target_layer(model), batch.images, meta.mean, meta.std, [int(k) for k in labels]
    )
    for name, image, cam, row in zip(batch.names, batch.images, maps, rows, strict=True):
        caption = prediction_caption(row.grade_name, row.probabilities[row.grade_name])
        if row.p_referable is not None:
            caption += f"\nP(referable) = {row.p_referable:.2f}" + (
                f", refer: {row.refer}" if row.refer else ""
            )
        png = gradcam_png([GradcamExample(image, cam, caption)], title=Path(name).name)
        target = safe_output_path(folder, f"{Path(name).stem}_gradcam.png")
        n = 1
        while target.exists() and target.name in written:  # a/x.png and b/x.png: x_gradcam_2
            n += 1
            target = safe_output_path(folder, f"{Path(name).stem}_gradcam_{n}.png")
        written.add(target.name)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_bytes(png)
        os.replace(tmp, target)


def safe_output_path(folder: Path, name: str) -> Path:
    """``folder/name`` with ``name`` reduced to safe characters: never a path outside ``folder``."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(name).name).lstrip(".") or "image"
    folder.mkdir(parents=True, exist_ok=True)
    target = (folder / clean).resolve()
    if target.parent != folder.resolve():
        raise MedtuneError(f"{name}: refusing to write outside {folder}")
    return target
