"""``medtune predict``: the screening output of every image, with a trained run or an exported
ONNX model.

Per image: the image-quality verdict, the decoded grade and its name, the calibrated probability
of every grade, P(referable) and the referral flag at an operating point chosen on validation
(``docs/screening.md``, "Referral output"). The run's own preprocessing (fundus crop, size,
normalisation), temperature and decoding are applied; with an exported ``model.onnx`` the ONNX
Runtime predictor is used instead (no PyTorch in the loop) and the rows are the same.

:func:`predict_images` makes rows (and Grad-CAM figures) from decoded images in memory: the web
page calls it; :func:`predict` runs the same steps over files, and :func:`to_csv` is the one CSV
writer.
"""

from __future__ import annotations

import csv
import glob
import io
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from medtune.config import TTA_MODES
from medtune.data.images import is_listed_image, iter_image_files
from medtune.data.laterality import image_eyes
from medtune.data.preprocess import decode_source, prepare_image
from medtune.errors import BadImageError, MedtuneError
from medtune.evaluation.card import ModelCard, OperatingPoints
from medtune.evaluation.patients import DEFAULT_PATIENT_RULE, PatientScreening, screen_patients
from medtune.evaluation.quality import working_side
from medtune.evaluation.referral import (
    DEFAULT_OPERATING_POINT,
    VALIDATION_COLUMNS,
    PredictionRow,
    ReferralRule,
    build_rows,
    format_figure,
    mark_referrals,
    predictions_meta,
    referral_rule,
)
from medtune.evaluation.scoring import Scorer, score
from medtune.io import write_json, write_text
from medtune.runs import RunFolder
from medtune.workflows.predict_journal import PredictJournal, fingerprint

if TYPE_CHECKING:
    from medtune.evaluation.shift import BatchShiftTest

log = logging.getLogger("medtune")

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
    """A loaded model (a PyTorch run or an ONNX export) and its description.

    Make one with :func:`load_predictor`; pass it to :func:`predict_images`. The model is used
    through the scorer protocol only (:mod:`medtune.evaluation.scoring`), and every fact about
    feeding and reading it comes from its card (``scorer.card``).

    Attributes
    ----------
    source : str
        The run folder or ``model.onnx``.
    scorer : Scorer
        :class:`~medtune.evaluation.inference.TorchScorer` (a run) or
        :class:`~medtune.deploy.onnx_predictor.OnnxPredictor` (an export).
    tta : str
        Test-time augmentation.
    operating_points : OperatingPoints or None
        Validated referral thresholds: the card's, or for a run trained before they were
        stored, chosen again from its ``val_logits.npz``.
    quality_model : Predictor or None
        A learned image-quality model (a run trained on quality grades) judged beside the gate.
    batch_shift : BatchShiftTest or None
        The batch shift test (:class:`medtune.evaluation.shift.BatchShiftTest`: a run's
        ``batch_shift.npz``, or the one an ONNX export carries), ``None`` without one.
    """

    source: str
    scorer: Scorer = field(repr=False)
    tta: str = "none"
    operating_points: OperatingPoints | None = None
    quality_model: Predictor | None = field(default=None, repr=False)
    run: RunFolder | None = field(default=None, repr=False)
    batch_shift: BatchShiftTest | None = field(default=None, repr=False)
    _torch: Any = field(default=None, init=False, repr=False)

    # views of the card (the web page shows them)
    @property
    def card(self) -> ModelCard:
        """How the model is fed and read."""
        return self.scorer.card

    @property
    def class_names(self) -> list[str]:
        return self.card.class_names

    @property
    def grade_names(self) -> list[str]:
        """Display names of the grades (DR grade names for a 5-grade DR model)."""
        return self.card.label_space.grade_names

    @property
    def backbone(self) -> str | None:
        return self.card.backbone

    @property
    def image_size(self) -> int:
        return self.card.input_spec.image_size

    @property
    def decoding(self) -> dict[str, Any]:
        return dict(self.card.decoding)

    @property
    def shift_threshold(self) -> float | None:
        """Site-shift score above which an image is outside the training distribution."""
        shift = self.scorer.site_shift
        return None if shift is None else float(shift.threshold)

    @property
    def torch_model(self) -> Any:
        """The PyTorch model of a run (Grad-CAM needs it; built on first use when the run is
        scored by the ONNX engine); ``None`` for an ONNX export."""
        if self._torch is None:
            model = getattr(self.scorer, "model", None)
            if model is None and self.run is not None:
                model = self.run.load_model()[0]
            self._torch = model
        return self._torch

    def probs(self, images: np.ndarray) -> np.ndarray:
        """Calibrated probabilities (N, K) of prepared uint8 images (N, S, S, 3)."""
        return self.card.probabilities(score(self.scorer, images, self.tta).logits)

    def referral(self, operating_point: str = DEFAULT_OPERATING_POINT) -> ReferralRule | None:
        """The referral rule at ``operating_point`` (None: the model has no referral task)."""
        return referral_rule(
            self.card.label_space, self.operating_points, operating_point, self.tta
        )


def load_predictor(
    *,
    run: str | Path | None = None,
    model_path: str | Path | None = None,
    tta: str = "none",
    num_threads: int | None = None,
    quality_model: str | Path | None = None,
    engine: str = "onnx",
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
    engine : {"onnx", "torch"}, default "onnx"
        What scores a run's images (:mod:`medtune.deploy.engine`): ONNX Runtime on the run's
        fp32 graph, or PyTorch eager fp32 (same probabilities to 1e-4, slower). An export is
        always run by ONNX Runtime.

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
        from medtune.deploy.onnx_predictor import OnnxPredictor

        onnx = OnnxPredictor(Path(model_path), num_threads=num_threads)
        predictor = Predictor(str(model_path), onnx, tta, onnx.card.operating_points)
        predictor.batch_shift = _export_batch_shift(onnx)
    else:
        predictor = _run_predictor(Path(run), tta, engine, num_threads)
    if quality_model is not None:
        predictor.quality_model = _run_predictor(Path(quality_model), "none", engine, num_threads)
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


def _run_predictor(run: Path, tta: str, engine: str, num_threads: int | None) -> Predictor:
    """A run's model on ``engine`` (fp32: the same probabilities as the exported ONNX model)
    and its batch shift test."""
    from medtune.deploy.engine import run_scorer

    folder = RunFolder(run)
    scorer = run_scorer(folder, engine=engine, batch_size=BATCH, num_threads=num_threads)
    points = scorer.card.operating_points or _points_from_val_logits(folder, scorer.card)
    points = _with_site_status(folder, points)
    return Predictor(
        str(run), scorer, tta, points, run=folder, batch_shift=folder.read_batch_shift()
    )


def _with_site_status(folder: RunFolder, points: OperatingPoints | None) -> OperatingPoints | None:
    """Points chosen again from the labelled sample of ``medtune adapt --labels`` (the card
    keeps none) carry the status ``adaptation.json`` recorded: calibrated at that site."""
    record = folder.read_adaptation()
    status = (record or {}).get("operating_point_status")
    if points is None or points.status or not status:
        return points
    return replace(points, validated=bool(status["validated"]), status=str(status["status"]))


def _export_batch_shift(onnx: Any) -> BatchShiftTest | None:
    """The batch shift test an ONNX export carries beside ``model.onnx`` (named in its card's
    ``export`` block, :func:`medtune.deploy.exporter.export_model`), else ``None``."""
    export = onnx.card.export
    name = None if export is None else export.batch_shift
    if not name:
        return None
    from medtune.evaluation.shift import BatchShiftTest  # numpy and scipy only

    return BatchShiftTest.load(Path(onnx.model_path).parent / name)


def _points_from_val_logits(folder: RunFolder, card: ModelCard) -> OperatingPoints | None:
    """Runs trained before the card stored operating points: choose them from
    ``val_logits.npz`` exactly as training now does."""
    from medtune.evaluation.operating_points import card_operating_points

    try:
        val = folder.read_val_logits()
    except MedtuneError:
        return None
    logits = {k[len("logits_") :]: v for k, v in val.items() if k.startswith("logits_")}
    return card_operating_points(val["labels"], logits, card.temperature, card.label_space, None)


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
    spec = predictor.card.input_spec
    arrays = [prepare_image(img, spec.image_size, spec.fundus) for img in images]
    side = working_side(spec.image_size)  # the model's input, or 224 px for a smaller one
    judged = (
        arrays
        if side == spec.image_size
        else [prepare_image(img, side, spec.fundus) for img in images]
    )
    quality = [assess_image_quality(arr) for arr in judged]
    if predictor.quality_model is not None and images:
        quality = _learned_quality(images, predictor.quality_model, quality)
    size = spec.image_size
    stacked = np.stack(arrays) if arrays else np.zeros((0, size, size, 3), np.uint8)
    return PreparedBatch(list(names), stacked, quality)


def _learned_quality(
    images: Sequence[Image.Image], model: Predictor, gate: list[tuple[bool, str | None]]
) -> list[tuple[bool, str | None]]:
    """The gate's verdicts, with images the learned quality model rejects made ungradable."""
    reject = reject_class(model.class_names, model.source)
    spec = model.card.input_spec
    arrays = np.stack([prepare_image(img, spec.image_size, spec.fundus) for img in images])
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
) -> tuple[list[PredictionRow], np.ndarray, np.ndarray, dict[str, np.ndarray] | None]:
    """Rows, probabilities and grades of a batch, and what the batch shift test reads of it
    (:func:`batch_evidence`)."""
    test = predictor.batch_shift
    # NumPy's BLAS on one thread (site-shift score, projection): its idle threads spin and starve
    # the engine's and the decoding thread on a small CPU (733 APTOS images 11.2 -> 8.3 s on the
    # loaded 2-core machine)
    with threadpool_limits(limits=1, user_api="blas"):
        scored = score(predictor.scorer, batch.images, predictor.tta, features=test is not None)
        features = None
        if test is not None and len(batch.names):
            features = test.project(scored.features)
    card, scores = predictor.card, scored.shift_scores
    probs = card.probabilities(scored.logits)
    labels = card.decode(probs)
    shift = None if scores is None else (scores, float(predictor.shift_threshold))
    rows = build_rows(
        batch.names, probs, labels, card.label_space, card.decoding, rule, batch.quality, shift
    )
    evidence = None
    if features is not None:
        evidence = {
            "features": features,
            "probs": card.probabilities(scored.plain),  # the test was fitted without TTA
        }
    return rows, probs, labels, evidence


def batch_evidence(parts: Sequence[Mapping[str, Any] | None]) -> dict[str, np.ndarray] | None:
    """The projected features and plain probabilities of several parts of one batch (parts of
    several images, ``(n, d)``, or of one, ``(d,)``), stacked, with the images' ``patients``
    (a part's ``patients`` list or its one ``patient``; ``""`` when unknown); ``None`` when a
    part lacks them (e.g. a journal written before the test)."""
    if not parts or any(p is None for p in parts):
        return None
    stacked = {
        key: np.vstack([np.asarray(p[key], dtype=np.float64) for p in parts])  # type: ignore[index]
        for key in ("features", "probs")
    }
    ids = [i for p in parts for i in _part_patients(p)]  # type: ignore[union-attr]
    stacked["patients"] = np.asarray(ids, dtype=object)
    return stacked


def _part_patients(part: Mapping[str, Any]) -> list[Any]:
    """One patient id per image of an evidence part (``None``: unknown, counts as its own)."""
    ids = part.get("patients")
    if ids is None:
        ids = [part.get("patient")] * np.atleast_2d(np.asarray(part["features"])).shape[0]
    return list(ids)


def batch_check(
    predictor: Predictor, evidence: Mapping[str, np.ndarray] | None, n_images: int
) -> tuple[dict[str, Any] | None, dict[str, str] | None]:
    """The batch shift test's verdict on a batch (``None`` below
    :data:`~medtune.evaluation.shift.MIN_BATCH` patients, an image of an unknown patient
    counting as one, or without a test), and whether its
    referrals are at a validated operating point
    (:func:`medtune.evaluation.label_free.referral_validation`).

    Parameters
    ----------
    predictor : Predictor
    evidence : mapping or None
        :func:`batch_evidence` of the batch (``features`` (N, d), ``probs`` (N, K), optional
        ``patients`` (N,): fellow eyes count as one patient in the test's sample sizes).
    n_images : int
        Images in the batch.

    Returns
    -------
    verdict : dict or None
    validation : dict or None
    """
    from medtune.evaluation.label_free import referral_validation
    from medtune.evaluation.shift import MIN_BATCH, count_patients

    test = predictor.batch_shift
    verdict = None
    patients = None if evidence is None else evidence.get("patients")
    n_patients = n_images if patients is None else count_patients(patients)
    if test is not None and evidence is not None and n_patients >= MIN_BATCH:
        verdict = test.test_projected(evidence["features"], evidence["probs"], patients)
    validation = referral_validation(
        predictor.operating_points,
        verdict,
        n_images=n_images,
        testable=test is not None and evidence is not None,
        min_batch=MIN_BATCH,
    )
    return verdict, validation


def predict_images(
    names: Sequence[str],
    images: Sequence[Image.Image],
    predictor: Predictor,
    *,
    operating_point: str = DEFAULT_OPERATING_POINT,
    explain: bool = False,
    evidence_out: dict[str, np.ndarray] | None = None,
) -> tuple[list[PredictionRow], list[bytes]]:
    """Screening rows for decoded images, in memory (the web page's entry point; :func:`predict`
    uses the same steps for files).

    Parameters
    ----------
    names : sequence of str
        One name per image (shown in the ``image`` column and the Grad-CAM title).
    images : sequence of PIL.Image.Image
        Decoded images, e.g. ``medtune.data.preprocess.decode_source(path)`` or an upload
        opened with Pillow.
    predictor : Predictor
        From :func:`load_predictor`.
    operating_point : {"sens90", "sens97.5", "youden"}, default "sens90"
        The validated threshold the ``refer`` flag uses.
    explain : bool, default False
        Also make each image's captioned Grad-CAM figure (Selvaraju et al. 2017, ``grad-cam``
        package; a run's PyTorch model only).
    evidence_out : dict, optional
        Receives what the batch shift test reads of these images (``features``: (N, d)
        projected features, ``probs``: (N, K) plain probabilities) when the model has a test;
        the page gathers them into its running batch (:func:`batch_check`).

    Returns
    -------
    rows : list of PredictionRow
        In input order.
    gradcam : list of bytes
        One PNG per row with ``explain``, else empty.

    Raises
    ------
    MedtuneError
        For an unknown operating point, or ``explain`` with an ONNX model.
    """
    if explain and predictor.torch_model is None:
        raise MedtuneError("explain needs run (Grad-CAM needs the PyTorch model, not model.onnx)")
    batch = prepare_batch(names, images, predictor)
    rows, _, labels, evidence = _predict_batch(
        batch, predictor, predictor.referral(operating_point)
    )
    pngs = _gradcam_pngs(predictor, batch, rows, labels) if explain and rows else []
    if evidence_out is not None and evidence is not None:
        evidence_out.update(evidence)
    return rows, pngs


def prediction_meta(predictor: Predictor, operating_point: str) -> dict[str, Any]:
    """The sidecar that explains a predictions file (:func:`predictions_meta`)."""
    card = predictor.card.replace(operating_points=predictor.operating_points)
    return predictions_meta(
        model=predictor.source,
        card=card,
        rule=predictor.referral(operating_point),
        tta=predictor.tta,
        quality=QUALITY_RULE,
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
    engine: str = "onnx",
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
        ``P1_OD.jpg`` are used (:mod:`medtune.data.laterality`); the batch shift test counts
        a patient's images as one patient. When any image's patient is known, ``out`` also
        gets ``<out stem>.eyes.csv`` (one row per eye: the highest grade
        of its gradable images, or ungradable) and ``<out stem>.patients.csv`` (one row per
        patient: refer / no / insufficient quality), and the JSON ``eyes`` and ``patients``
        (:func:`medtune.evaluation.patients.screen_patients`).
    patient_rule : {"either-eye", "both-eyes"}, default "either-eye"
        How eyes make a patient's answer (:data:`medtune.evaluation.patients.PATIENT_RULES`).
    engine : {"onnx", "torch"}, default "onnx"
        What scores a run's images (:func:`load_predictor`).

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
        thresholds), then ``operating_point_validated`` (``yes``/``no``/``unknown``) and
        ``operating_point_status`` for each yes/no referral: every image of the call is tested
        as one batch against the validation images when there are at least 20 and the model
        has a batch shift test (:func:`batch_check`); the verdict goes to the sidecar
        (``batch_shift``) and a shifted batch is logged as a warning (one line on the terminal).

    Raises
    ------
    MedtuneError
        For no or both model sources, no images found, an unknown operating point, explain with
        an ONNX model, or an unreadable image (naming the file) without ``skip_bad``.
    """
    if predictor is None:
        predictor = load_predictor(
            run=run, model_path=model_path, tta=tta, quality_model=quality_model, engine=engine
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
        evidence = None
        if batch.names:
            new, _, labels, evidence = _predict_batch(batch, predictor, rule)
            if explain:
                _write_gradcam(predictor, batch, new, labels, Path(explain), written)
        journal.record(new, skipped, evidence)  # a killed run continues from here with --resume
    rows, skipped = journal.results()
    eyes = image_eyes([_image_of(r) for r in rows], manifest=manifest)
    patients = [eye.patient_id for eye in eyes]  # fellow eyes count once in the batch test
    rows = judge_batch(predictor, rows, journal.evidence(), meta, patients)[0]
    grouped = screen_patients(rows, manifest=manifest, rule=patient_rule, eyes=eyes)
    if grouped is not None:
        meta["patients"] = grouped.meta()
    if out:
        write_text(out, to_csv(rows))
        write_json(Path(out).with_suffix(".meta.json"), meta)
        if skipped:
            write_text(
                Path(out).with_suffix(".skipped.csv"), _csv_text(["image", "reason"], skipped)
            )
        _write_patient_files(Path(out), grouped)
    if json_path:
        write_text(json_path, to_json(rows, meta, _patient_sections(grouped)))
    journal.close()
    return [_as_dict(row) for row in rows]


def _image_of(row: PredictionRow | Mapping[str, Any]) -> str:
    """A row's image (a resumed journal gives dicts)."""
    return str(row["image"] if isinstance(row, Mapping) else row.image)


def judge_batch(
    predictor: Predictor,
    rows: Sequence[PredictionRow | Mapping[str, Any]],
    parts: Sequence[Mapping[str, Any] | None],
    meta: dict[str, Any],
    patients: Sequence[str | None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None, dict[str, str] | None]:
    """Test a batch as one (:func:`batch_check` on the stacked ``parts``) and mark ``rows``:
    the verdict goes to ``meta`` (``batch_shift``, as the sidecar carries it), so does whether
    the referrals are at a validated point (``operating_point_validated``, with the columns
    explained), and a shifted batch is said in one line (a logged warning: the terminal).

    Parameters
    ----------
    predictor : Predictor
    rows : sequence of PredictionRow or dict
        The rows to mark (all of the batch's, or, on the page, the latest request's).
    parts : sequence of dict or None
        The evidence of every image of the batch (:func:`batch_evidence`'s parts).
    meta : dict
        :func:`prediction_meta`'s sidecar, updated in place.
    patients : sequence of str or None, optional
        Each image's patient, in the order of ``parts``' images (``None``: unknown); default
        those the parts carry.

    Returns
    -------
    rows : list of dict
        Marked (:func:`~medtune.evaluation.referral.mark_referrals`).
    verdict, validation : dict or None
        As :func:`batch_check`.
    """
    evidence = batch_evidence(parts)
    n_images = 0 if evidence is None else len(evidence["probs"])
    if evidence is not None and patients is not None:
        evidence["patients"] = np.asarray(list(patients), dtype=object)
    verdict, validation = batch_check(predictor, evidence, n_images or len(rows))
    if verdict is not None:
        meta["batch_shift"] = verdict
        if verdict["shifted"]:
            log.warning("%s", verdict["message"])
    if validation is not None:
        meta["operating_point_validated"] = validation
        if meta.get("referral") is not None:
            meta["columns"].update(VALIDATION_COLUMNS)
    return mark_referrals(rows, validation), verdict, validation


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
            images.append(decode_source(str(path), min_side=working_side(predictor.image_size)))
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


def _write_patient_files(out: Path, grouped: PatientScreening | None) -> None:
    """``OUT.eyes.csv`` and ``OUT.patients.csv``; without patients, earlier ones are removed so
    they never sit beside predictions they do not describe."""
    sections = _patient_sections(grouped)
    for name in ("eyes", "patients"):
        target = out.with_suffix(f".{name}.csv")
        if name in sections:
            write_text(target, to_csv(sections[name]))
        else:
            target.unlink(missing_ok=True)


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


def _gradcam_pngs(
    predictor: Predictor, batch: PreparedBatch, rows: list[PredictionRow], labels: np.ndarray
) -> list[bytes]:
    """One captioned Grad-CAM figure (PNG bytes) per image of ``batch``."""
    from medtune.evaluation.gradcam import gradcam_maps
    from medtune.evaluation.plots import GradcamExample, gradcam_png, prediction_caption
    from medtune.workflows.evaluate import target_layer

    model, spec = predictor.torch_model, predictor.card.input_spec
    maps = gradcam_maps(model, target_layer(model), batch.images, spec, [int(k) for k in labels])
    pngs = []
    for name, image, cam, row in zip(batch.names, batch.images, maps, rows, strict=True):
        caption = prediction_caption(row.grade_name, row.probabilities[row.grade_name])
        if row.p_referable is not None:
            caption += f"\nP(referable) = {row.p_referable:.2f}" + (
                f", refer: {row.refer}" if row.refer else ""
            )
        pngs.append(gradcam_png([GradcamExample(image, cam, caption)], title=Path(name).name))
    return pngs


def _write_gradcam(
    predictor: Predictor,
    batch: PreparedBatch,
    rows: list[PredictionRow],
    labels: np.ndarray,
    folder: Path,
    written: set,
) -> None:
    """One captioned Grad-CAM figure per image, named after the image, always inside ``folder``."""
    pngs = _gradcam_pngs(predictor, batch, rows, labels)
    for name, png in zip(batch.names, pngs, strict=True):
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
