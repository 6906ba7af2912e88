"""The screening service behind ``medtune serve``: uploads in, rows, eyes, a patient-level
referral and a stored screening out.

Each upload is recognised by its first bytes (:func:`sniff_type`), decoded by the data layer's
one decoder (:func:`medtune.data.preprocess.decode_source`: bit depth, EXIF orientation, DICOM)
from a private temporary file removed at once, and screened IN MEMORY by
:func:`medtune.workflows.predict.predict_images`, the same steps as ``medtune predict``: no CSV,
no sidecar and no Grad-CAM file is written or read back. One rule for every kind of bad file, on
the page and the JSON API alike: the readable photographs are screened and the unreadable ones
are listed with their reason; only a request with no readable photograph is refused.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import re
import shutil
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medtune.data.laterality import parse_file_name
from medtune.data.preprocess import decode_source
from medtune.errors import BadImageError, MedtuneError
from medtune.evaluation.patients import (
    DEFAULT_PATIENT_RULE,
    INSUFFICIENT,
    UNGRADABLE,
    aggregate_eyes,
    aggregate_patient,
)
from medtune.evaluation.quality import working_side
from medtune.evaluation.referral import DEFAULT_OPERATING_POINT
from medtune.workflows.predict import (
    judge_batch,
    load_predictor,
    predict_images,
    prediction_meta,
    to_csv,
)
from medtune.workflows.serve import card as model_card
from medtune.worklist.store import NewImage, NewScreening

log = logging.getLogger("medtune.serve")

#: Content types accepted, by their magic bytes (Pillow/pydicom decode them afterwards).
ACCEPTED_TYPES = ("JPEG", "PNG", "TIFF", "DICOM")
#: Photographs in the page's running batch: the last ones screened with the model, this
#: request's included, tested as one batch (:meth:`Screener.judge`). 100 is the batch size at
#: which the batch shift test was measured to detect every held-out development site
#: (``docs/generalisation.md``); a smaller window reacts sooner but sees only gross shifts.
RUNNING_BATCH = 100


@dataclass(frozen=True)
class UploadLimits:
    """What one request may send.

    Attributes
    ----------
    max_files : int, default 50
        Photographs per request.
    max_file_mb : float, default 25
        Size of one photograph, in MiB.
    max_request_mb : float, default 200
        Size of the whole request body, in MiB (checked before and while it is read).
    max_pending : int, default 64
        Requests waiting for a worker before new ones get ``503`` (retry later).
    """

    max_files: int = 50
    max_file_mb: float = 25.0
    max_request_mb: float = 200.0
    max_pending: int = 64

    @property
    def max_file_bytes(self) -> int:
        return int(self.max_file_mb * 2**20)

    @property
    def max_request_bytes(self) -> int:
        return int(self.max_request_mb * 2**20)


class UploadRefused(MedtuneError):
    """A request the server will not process; ``status`` is the HTTP status to answer with."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


def sniff_type(head: bytes) -> str | None:
    """The image type from a file's first 132 bytes, or ``None`` if it is none of the accepted.

    Written by hand because the accepted set is four fixed signatures (JPEG SOI marker, PNG
    signature, TIFF byte-order header, DICOM Part 10 ``DICM`` after the 128-byte preamble);
    decoding the file to learn its type would parse untrusted data before it is even accepted.

    Parameters
    ----------
    head : bytes
        At least the first 132 bytes of the file (fewer for a short file).

    Returns
    -------
    str or None
        One of :data:`ACCEPTED_TYPES`.
    """
    if head[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if head[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):  # TIFF, BigTIFF
        return "TIFF"
    if head[128:132] == b"DICM":
        return "DICOM"
    return None


def display_name(name: str | None, index: int) -> str:
    """The file name a browser sent, without any folder part (``C:\\a\\b.jpg`` -> ``b.jpg``,
    ``../../etc/passwd`` -> ``passwd``) and without control characters."""
    base = re.split(r"[\\/]", name or "")[-1]
    base = "".join(c for c in base if c.isprintable()).strip()
    return base[:200] or f"image_{index + 1}"


@dataclass
class ScreeningResult:
    """What one batch of photographs gave.

    Attributes
    ----------
    rows : list of dict
        :func:`~medtune.workflows.predict.predict_images`'s rows (as dicts), in upload order,
        with ``image`` the uploaded file's name.
    skipped : list of dict
        ``{"image": name, "reason": one line}`` for each photograph that could not be read.
    gradcam : dict of int to bytes
        PNG Grad-CAM figures by row index (``run`` models with ``explain`` only).
    meta : dict
        What the columns mean (grades, decoding, the referral rule with its validated
        sensitivity and specificity), as ``medtune predict --out`` writes it beside its CSV.
    seconds : float
        Wall time of the prediction.
    uploads : list of int
        For each row, the index of its upload in the request.
    kinds : list of str
        For each row, its sniffed type (:data:`ACCEPTED_TYPES`).
    evidence : list of dict or None
        For each row, what the batch shift test reads of it (``features``, ``probs`` as lists);
        ``None`` when the model has no batch shift test.
    batch : dict or None
        The running batch's verdict after this request (:meth:`Screener.judge`): ``n_images``,
        ``verdict`` (the batch shift test's, ``None`` below its minimum) and ``validation``
        (whether the referrals are at a validated operating point); ``None`` before judging.
    """

    rows: list[dict[str, Any]]
    skipped: list[dict[str, str]] = field(default_factory=list)
    gradcam: dict[int, bytes] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    uploads: list[int] = field(default_factory=list)
    kinds: list[str] = field(default_factory=list)
    evidence: list[dict[str, Any]] | None = None
    batch: dict[str, Any] | None = None

    @property
    def csv(self) -> str:
        """The rows as ``medtune predict --out`` writes them (same function)."""
        return to_csv(self.rows)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready mapping: ``rows``, ``columns``, ``skipped``, ``csv``, ``meta``,
        ``gradcam`` (PNG data URLs keyed by row index as a string) and ``seconds``."""
        return {
            "rows": self.rows,
            "columns": list(self.rows[0]) if self.rows else [],
            "skipped": self.skipped,
            "csv": self.csv,
            "meta": self.meta,
            "gradcam": {
                str(i): "data:image/png;base64," + base64.b64encode(png).decode("ascii")
                for i, png in self.gradcam.items()
            },
            "seconds": round(self.seconds, 4),
            "batch": self.batch,
        }


class Screener:
    """The model behind the page, loaded once, as a Python API.

    Parameters
    ----------
    run : str or pathlib.Path, optional
        A run folder (scored by the ONNX engine, ``RUN/model.onnx``; Grad-CAM by PyTorch).
    model_path : str or pathlib.Path, optional
        An exported ``model.onnx`` with its ``model.json`` (ONNX Runtime). Exactly one of
        ``run`` and ``model_path``.
    tta : {"none", "rot90"}, default "none"
        Test-time augmentation, as for :func:`~medtune.workflows.predict.predict`.
    operating_point : {"sens90", "sens97.5", "youden"}, default "sens90"
        The validated threshold that sets ``refer`` (as ``medtune predict --operating-point``).
    temp_dir : str or pathlib.Path, optional
        Where the private temporary folder for decoding is made (default: the system's).
    num_threads : int, optional
        ONNX Runtime threads per batch (:func:`~medtune.workflows.serve.app.create_app` gives
        each worker its share of the cores).

    Raises
    ------
    MedtuneError
        For no or both model sources, an unknown ``tta`` or operating point, or a model that
        cannot be loaded.

    Examples
    --------
    >>> screener = Screener(model_path="runs/dr/export/model.onnx")  # doctest: +SKIP
    >>> result = screener.screen([("eye.jpg", open("eye.jpg", "rb").read())])  # doctest: +SKIP
    >>> result.rows[0]["grade_name"], result.rows[0]["refer"]  # doctest: +SKIP
    """

    def __init__(
        self,
        *,
        run: str | Path | None = None,
        model_path: str | Path | None = None,
        tta: str = "none",
        operating_point: str = DEFAULT_OPERATING_POINT,
        temp_dir: str | Path | None = None,
        num_threads: int | None = None,
    ) -> None:
        self.run = Path(run) if run is not None else None
        self.model_path = Path(model_path) if model_path is not None else None
        self.predictor = load_predictor(
            run=run, model_path=model_path, tta=tta, num_threads=num_threads
        )
        self.rule = self.predictor.referral(operating_point)  # an unknown point fails now
        self.operating_point = operating_point
        self.model_id, self.model_version = model_card.identity(self.run, self.model_path)
        self.temp_root = Path(tempfile.mkdtemp(prefix="medtune-serve-", dir=temp_dir))
        self._cleanup = weakref.finalize(self, shutil.rmtree, self.temp_root, True)
        # Grad-CAM hooks the shared PyTorch model: one batch at a time on a run.
        self._lock = threading.Lock() if self.can_explain else None

    @property
    def can_explain(self) -> bool:
        """Grad-CAM needs the PyTorch model (``run``), not ``model.onnx``."""
        return self.predictor.torch_model is not None

    def close(self) -> None:
        """Remove the temporary folder."""
        self._cleanup()

    def screen(
        self, files: Sequence[tuple[str, bytes]], *, explain: bool = False
    ) -> ScreeningResult:
        """Screen uploaded photographs in memory with ``medtune predict``'s steps.

        Parameters
        ----------
        files : sequence of (str, bytes)
            ``(file name as uploaded, content)`` pairs; names are shown back, folder parts
            removed.
        explain : bool, default False
            Also make the captioned Grad-CAM figure of each photograph (``run`` only; ignored
            otherwise).

        Returns
        -------
        ScreeningResult
            Rows for the readable photographs; the others in ``skipped`` with their reason.

        Raises
        ------
        UploadRefused
            When no file is given (400) or none of them is a readable image (415, naming each
            with its reason).
        """
        if not files:
            raise UploadRefused("no photograph received; send one or more images", 400)
        names = [display_name(name, i) for i, (name, _) in enumerate(files)]
        decoded, skipped = self._decode_all(names, [data for _, data in files])
        if not decoded:
            listed = "; ".join(f"{s['reason']}" for s in skipped)
            raise UploadRefused(f"no readable photograph: {listed}", 415)
        started = time.perf_counter()
        explain = explain and self.can_explain
        uploads = [i for i, _, _ in decoded]
        evidence: dict[str, Any] = {}
        with self._lock or contextlib.nullcontext():
            rows, pngs = predict_images(
                [names[i] for i in uploads],
                [img for _, img, _ in decoded],
                self.predictor,
                operating_point=self.operating_point,
                explain=explain,
                evidence_out=evidence,
            )
        seconds = time.perf_counter() - started
        meta = prediction_meta(self.predictor, self.operating_point)
        meta.pop("model", None)  # a server path; the model card says what the model is
        log.info("screened %d image(s), %d unreadable, in %.2f s", len(rows), len(skipped), seconds)
        return ScreeningResult(
            [row.as_dict() for row in rows],
            skipped,
            dict(enumerate(pngs)),
            meta,
            seconds,
            uploads,
            [kind for _, _, kind in decoded],
            _per_row(evidence),
        )

    def judge(self, result: ScreeningResult, history: Sequence[dict[str, Any]]) -> None:
        """Test the running batch (``result``'s photographs and the ``history`` before them)
        and mark ``result``'s referrals: sets ``result.batch``, and every yes/no referral row
        gets ``operating_point_validated`` / ``operating_point_status``
        (:func:`medtune.evaluation.referral.mark_referrals`); the referrals themselves stay.

        Parameters
        ----------
        result : ScreeningResult
            From :meth:`screen`.
        history : sequence of dict
            The evidence of the photographs screened before with this model, newest first
            (:meth:`medtune.worklist.store.Worklist.recent_evidence`); at most
            ``RUNNING_BATCH - len(result.rows)`` of them are used.
        """
        if result.evidence is None:
            return
        older = list(history)[: max(0, RUNNING_BATCH - len(result.evidence))]
        # one request is one patient's visit: its photographs count as one patient in the test
        window = [*({**e, "patient": "this request"} for e in result.evidence), *older]
        result.rows, verdict, validation = judge_batch(
            self.predictor, result.rows, window, result.meta
        )
        result.batch = {"n_images": len(window), "verdict": verdict, "validation": validation}

    def _decode_all(self, names: list[str], contents: list[bytes]) -> tuple[list, list]:
        """``[(upload index, PIL image, type)]`` of the readable uploads and the skipped list."""
        decoded, skipped = [], []
        side = working_side(self.predictor.image_size)  # as predict decodes files
        work = Path(tempfile.mkdtemp(dir=self.temp_root))
        try:
            for i, (name, data) in enumerate(zip(names, contents, strict=True)):
                kind = sniff_type(data[:132])
                if kind is None:
                    skipped.append(_skip(name, "not a JPEG, PNG, TIFF or DICOM image"))
                    continue
                path = work / f"{i}{_SUFFIX[kind]}"  # never the uploaded name: no traversal
                path.write_bytes(data)
                try:
                    decoded.append((i, decode_source(str(path), min_side=side), kind))
                except BadImageError as err:
                    reason = getattr(err, "reason", None) or "unreadable"
                    skipped.append(_skip(name, f"cannot read image ({reason})"))
                finally:
                    path.unlink(missing_ok=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        return decoded, skipped

    def model_card(self) -> dict[str, Any]:
        """What the page's model-card panel shows (:func:`medtune.workflows.serve.card.card`)."""
        return model_card.card(self)


_SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "DICOM": ".dcm"}


def _per_row(evidence: dict[str, Any]) -> list[dict[str, Any]] | None:
    """``{"features": (N, d), "probs": (N, K)}`` as one JSON-ready dict per row."""
    if not evidence:
        return None
    return [
        {"features": f.tolist(), "probs": p.tolist()}
        for f, p in zip(evidence["features"], evidence["probs"], strict=True)
    ]


def _skip(name: str, reason: str) -> dict[str, str]:
    return {"image": name, "reason": f"{name}: {reason}"}


#: The stored patient-level answers, by :func:`medtune.evaluation.patients.aggregate_patient`'s.
REFERRALS = {"yes": "refer", "no": "no_refer", INSUFFICIENT: "insufficient_quality"}


def resolve_sides(names: Sequence[str], chosen: Sequence[str | None]) -> list[str]:
    """Each photograph's eye: the user's choice when it names one, else the file name's
    (:func:`medtune.data.laterality.parse_file_name`: ``12_left.jpeg``, ``p3_OD_2.png``, ...),
    else ``unknown``."""
    out = []
    for i, name in enumerate(names):
        pick = str((chosen[i] if i < len(chosen) else None) or "").strip().lower()
        parsed = parse_file_name(name)
        out.append(pick if pick in ("right", "left") else (parsed[1] if parsed else "unknown"))
    return out


def patient_answer(
    sides: Sequence[str], rows: Sequence[dict[str, Any]]
) -> tuple[str, str, list[dict[str, Any]]]:
    """The patient's referral and quality and each eye, by the screening programmes' rules
    (:func:`medtune.evaluation.patients.aggregate_eyes` / ``aggregate_patient``, either-eye).

    Returns
    -------
    referral : {"refer", "no_refer", "insufficient_quality", ""}
        ``""`` when the model has no validated referral.
    quality : {"gradable", "partial", "ungradable"}
        All eyes gradable, some, or none.
    eyes : list of dict
        ``side``, ``quality`` (``gradable``/``ungradable``), ``grade``, ``grade_name``,
        ``p_referable``, ``refer``; right eye first.
    """
    results = aggregate_eyes(rows, [("patient", side) for side in sides])
    patient = aggregate_patient(results, DEFAULT_PATIENT_RULE)
    eyes = [
        {
            "side": e.eye,
            "quality": UNGRADABLE if e.quality == UNGRADABLE else "gradable",
            "grade": e.grade,
            "grade_name": e.grade_name,
            "p_referable": e.p_referable,
            "refer": e.refer or "",
        }
        for e in patient.eyes
    ]
    gradable = [e for e in eyes if e["quality"] != UNGRADABLE]
    quality = "gradable" if len(gradable) == len(eyes) else ("partial" if gradable else UNGRADABLE)
    return REFERRALS.get(patient.refer or "", ""), quality, eyes


def patient_screening(
    screener: Screener,
    result: ScreeningResult,
    files: Sequence[tuple[str, bytes]],
    patient: str,
    chosen_sides: Sequence[str | None],
) -> tuple[NewScreening, dict[str, Any]]:
    """Group a screened batch into eyes and a patient-level answer.

    Parameters
    ----------
    screener : Screener
    result : ScreeningResult
        From :meth:`Screener.screen` on ``files``.
    files : sequence of (str, bytes)
        The uploads, in request order.
    patient : str
        The patient's pseudonym as typed.
    chosen_sides : sequence of str or None
        The eye chosen for each upload (``right``/``left``; anything else: from the file name).

    Returns
    -------
    new : medtune.worklist.store.NewScreening
        What the worklist stores.
    summary : dict
        ``patient``, ``referral``, ``quality``, ``eyes`` and each row's ``side``, JSON-ready.
    """
    names = [display_name(files[i][0], i) for i in result.uploads]
    chosen = [chosen_sides[i] if i < len(chosen_sides) else None for i in result.uploads]
    sides = resolve_sides(names, chosen)
    referral, quality, eyes = patient_answer(sides, result.rows)
    evidence = result.evidence or [None] * len(result.rows)
    images = [
        NewImage(side, row["image"], files[i][1], kind, row, e)
        for side, row, i, kind, e in zip(
            sides, result.rows, result.uploads, result.kinds, evidence, strict=True
        )
    ]
    p = screener.predictor
    new = NewScreening(
        patient=patient,
        images=images,
        eyes=eyes,
        referral=referral,
        quality=quality,
        operating_point=screener.operating_point,
        threshold=None if screener.rule is None else screener.rule.threshold,
        model_id=screener.model_id,
        model_version=screener.model_version,
        class_names=[str(c) for c in p.class_names],
        grade_names=list(p.grade_names),
        site_shift=any(r.get("outside_training") == "yes" for r in result.rows),
        batch_shift=result.batch,
    )
    summary = {"patient": patient, "referral": referral, "quality": quality, "eyes": eyes,
               "sides": sides}  # fmt: skip
    return new, summary
