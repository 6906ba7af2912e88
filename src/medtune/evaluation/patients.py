"""From image rows to eyes and patients: the results a screening programme acts on.

Cleared DR screening systems answer per eye and per patient, not per photograph:

* IDx-DR (LumineticsCore; Abràmoff et al., "Pivotal trial of an autonomous AI-based diagnostic
  system for detection of diabetic retinopathy in primary care offices", npj Digital Medicine
  1:39, 2018; FDA De Novo DEN180001) takes two photographs of each eye and answers per patient:
  "more than mild DR (mtmDR) detected" when mtmDR is found in at least one eye, "negative for
  mtmDR", or "insufficient quality". Its pivotal trial reports the *imageability* rate, the
  share of participants who got a disease-level answer (96.1%), beside sensitivity and
  specificity measured on those participants.
* EyeArt (Eyenuk; Ipp et al., "Pivotal evaluation of an artificial intelligence system for
  autonomous detection of referrable and vision-threatening diabetic retinopathy", JAMA Network
  Open 4(11):e2134254, 2021; FDA 510(k) K200667) answers per eye (mtmDR, vision-threatening DR,
  negative, or "ungradable" when the photographs have poor quality or retinal coverage) and
  combines the eyes into a patient-level answer that is positive when either eye is.

medtune applies these rules to its per-image rows (:class:`~medtune.evaluation.referral.
PredictionRow` or their dicts):

**Per eye** (:func:`aggregate_eyes`): the images of one eye that pass the quality gate are its
gradable images; the eye's grade is the highest grade among them and its ``p_referable`` the
highest P(referable) among them, so the eye is referred (``refer == "yes"``) exactly when one of
its gradable images is. An eye without a gradable image is ``"ungradable"``: no grade, no
probability (the images' grades stay in the image rows). The grades of ungradable images never
count, as IDx-DR and EyeArt give no grade for an eye of insufficient quality.

**Per patient** (:func:`aggregate_patient`), under one of two rules (:data:`PATIENT_RULES`):

* ``"either-eye"`` (default): refer when either eye is referable; "insufficient quality" when no
  eye can be graded (an ungradable eye is never referable); otherwise no referral. This is the
  rule of the task this module was written for (medtune issue 22) and the reading of "mtmDR in at
  least one eye" that keeps a patient with one gradable, negative eye out of the
  insufficient-quality group.
* ``"both-eyes"``: refer when either eye is referable; otherwise "insufficient quality" unless
  both the right and the left eye were graded: a complete examination, as IDx-DR's protocol of
  two photographs per eye demands. A negative answer then means both eyes were seen.

The rules are written out here because no library implements screening-programme logic. Images
whose patient is unknown (:class:`medtune.data.laterality.ImageEye` ``patient_id is None``) are
left out of eyes and patients; images of a known patient whose eye is unknown form one eye named
``"unknown"`` (under ``"both-eyes"`` it never counts as the right or the left eye).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medtune.config import DEFAULT_OPERATING_POINT
from medtune.errors import MedtuneError
from medtune.evaluation.labels import LabelSpace
from medtune.evaluation.referral import UNGRADABLE

__all__ = [
    "DEFAULT_PATIENT_RULE",
    "EyeResult",
    "INSUFFICIENT",
    "PATIENT_RULES",
    "PatientResult",
    "PatientScreening",
    "UNKNOWN_EYE",
    "aggregate_eyes",
    "aggregate_patient",
    "aggregate_patients",
    "evaluation_patients",
    "patient_metrics",
    "screen_patients",
]

#: The patient-level answer when no decision could be made from the photographs.
INSUFFICIENT = "insufficient quality"
#: An eye whose laterality is unknown (its images still belong to the patient).
UNKNOWN_EYE = "unknown"
GRADED = "graded"
_EYE_ORDER = ("right", "left", UNKNOWN_EYE)

#: Patient-level rules: name -> the rule in words (for outputs and reports).
PATIENT_RULES = {
    "either-eye": (
        "refer when either eye is referable; insufficient quality when no eye can be graded; "
        "otherwise no referral"
    ),
    "both-eyes": (
        "refer when either eye is referable; otherwise insufficient quality unless both the "
        "right and the left eye were graded, then no referral"
    ),
}
DEFAULT_PATIENT_RULE = "either-eye"


@dataclass(frozen=True)
class EyeResult:
    """One eye of one patient, from its images (:func:`aggregate_eyes`).

    Attributes
    ----------
    patient_id : str
    eye : {"right", "left", "unknown"}
    images : tuple of str
        The eye's images, in input order.
    n_gradable : int
        How many of them passed the quality gate.
    quality : {"graded", "ungradable"}
        ``"ungradable"`` when no image of the eye is gradable.
    grade : int or None
        The highest decoded grade among the gradable images (``None`` when ungradable).
    grade_name : str or None
        Its name.
    p_referable : float or None
        The highest P(referable) among the gradable images (``None``: ungradable, or no
        referral task).
    refer : str or None
        ``"yes"`` when a gradable image is referred, ``"no"`` when none is, ``"ungradable"``,
        ``""`` when the model has no validated threshold, ``None`` without a referral task.
    quality_reasons : tuple of str
        The distinct reasons its ungradable images were rejected.
    """

    patient_id: str
    eye: str
    images: tuple[str, ...]
    n_gradable: int
    quality: str
    grade: int | None
    grade_name: str | None
    p_referable: float | None
    refer: str | None
    quality_reasons: tuple[str, ...] = ()

    @property
    def graded(self) -> bool:
        """Whether the eye has a gradable image."""
        return self.quality == GRADED

    def to_dict(self) -> dict[str, Any]:
        """One eye row (the ``.eyes.csv`` columns of ``medtune predict``)."""
        return {
            "patient_id": self.patient_id,
            "eye": self.eye,
            "quality": self.quality,
            "quality_reasons": "; ".join(self.quality_reasons),
            "grade": self.grade,
            "grade_name": self.grade_name,
            "p_referable": self.p_referable,
            "refer": self.refer,
            "n_images": len(self.images),
            "n_gradable": self.n_gradable,
            "images": "; ".join(self.images),
        }


@dataclass(frozen=True)
class PatientResult:
    """One patient, from their eyes (:func:`aggregate_patient`).

    Attributes
    ----------
    patient_id : str
    eyes : tuple of EyeResult
        Right, left, then an eye of unknown laterality.
    refer : str or None
        ``"yes"``, ``"no"``, ``"insufficient quality"``, ``""`` (no validated threshold) or
        ``None`` (no referral task: only ``"insufficient quality"`` is then decided).
    grade : int or None
        The highest grade of the graded eyes.
    grade_name : str or None
        Its name.
    rule : str
        The patient rule applied (a key of :data:`PATIENT_RULES`).
    reason : str
        The answer in words, e.g. ``"referable in the left eye"``.
    """

    patient_id: str
    eyes: tuple[EyeResult, ...]
    refer: str | None
    grade: int | None
    grade_name: str | None
    rule: str
    reason: str = field(default="")

    @property
    def insufficient(self) -> bool:
        """Whether the patient's answer is "insufficient quality"."""
        return self.refer == INSUFFICIENT

    def eye(self, name: str) -> EyeResult | None:
        """The eye named ``"right"``, ``"left"`` or ``"unknown"``, if photographed."""
        return next((e for e in self.eyes if e.eye == name), None)

    def to_dict(self) -> dict[str, Any]:
        """One patient row (the ``.patients.csv`` columns of ``medtune predict``)."""
        out: dict[str, Any] = {
            "patient_id": self.patient_id,
            "refer": self.refer,
            "reason": self.reason,
            "grade": self.grade,
            "grade_name": self.grade_name,
        }
        for name in _EYE_ORDER[:2]:
            eye = self.eye(name)
            out[f"{name}_eye"] = "" if eye is None else (eye.grade_name or eye.quality)
            out[f"{name}_refer"] = "" if eye is None else eye.refer
        out["n_eyes"] = len(self.eyes)
        out["n_images"] = sum(len(e.images) for e in self.eyes)
        out["rule"] = self.rule
        return out


def _field(row: Any, name: str) -> Any:
    if isinstance(row, Mapping):
        return row.get(name)
    return getattr(row, name, None)


def _eye_of(row: Any, eye: Any | None) -> tuple[str | None, str | None]:
    """``(patient, eye)`` from an ImageEye / ``(patient, eye)`` pair, else from the row."""
    if eye is None:
        return _field(row, "patient_id"), _field(row, "eye")
    if isinstance(eye, tuple):
        return eye[0], eye[1]
    return eye.patient_id, eye.eye


def _side(eye: Any) -> str:
    """``"right"``, ``"left"`` or ``"unknown"`` from any spelling (``OD``, ``L``, ...)."""
    from medtune.data.laterality import normalise_eye

    try:
        return normalise_eye(eye) or UNKNOWN_EYE
    except ValueError:
        return UNKNOWN_EYE


def _one_eye(patient: str, eye: str, rows: list[Any]) -> EyeResult:
    """The per-eye rule: the highest grade and P(referable) of the gradable images."""
    gradable = [r for r in rows if _field(r, "quality") != UNGRADABLE]
    reasons = tuple(
        dict.fromkeys(
            str(_field(r, "quality_reason") or UNGRADABLE)
            for r in rows
            if _field(r, "quality") == UNGRADABLE
        )
    )
    images = tuple(str(_field(r, "image")) for r in rows)
    has_task = any(_field(r, "refer") is not None for r in rows)
    if not gradable:
        return EyeResult(
            patient, eye, images, 0, UNGRADABLE, None, None, None,
            UNGRADABLE if has_task else None, reasons,
        )  # fmt: skip
    worst = max(gradable, key=lambda r: int(_field(r, "grade")))
    probs = [_field(r, "p_referable") for r in gradable]
    flags = [_field(r, "refer") for r in gradable]
    if not has_task:
        refer = None
    elif "yes" in flags:
        refer = "yes"
    elif all(f == "no" for f in flags):
        refer = "no"
    else:
        refer = ""  # no validated threshold
    p_ref = max(float(p) for p in probs) if all(p is not None for p in probs) else None
    return EyeResult(
        patient, eye, images, len(gradable), GRADED, int(_field(worst, "grade")),
        _field(worst, "grade_name"), p_ref, refer, reasons,
    )  # fmt: skip


def aggregate_eyes(rows: Iterable[Any], eyes: Sequence[Any] | None = None) -> list[EyeResult]:
    """Group image rows by patient and eye and apply the per-eye rule.

    Parameters
    ----------
    rows : iterable of PredictionRow or mapping
        Image rows (``medtune.predict``'s dicts or :class:`~medtune.evaluation.referral.
        PredictionRow`): ``image``, ``quality`` (``"ungradable"`` or anything else for
        gradable), ``quality_reason``, ``grade``, ``grade_name``, ``p_referable`` and ``refer``
        are read; with ``eyes`` omitted, also ``patient_id`` and ``eye``.
    eyes : sequence of ImageEye or (patient, eye) tuples, optional
        The patient and eye of each row (:func:`medtune.data.laterality.image_eyes`), same
        length and order as ``rows``. Eyes may be spelled ``right``/``left``, ``OD``/``OS``,
        ``R``/``L`` ...; anything else is the ``"unknown"`` eye.

    Returns
    -------
    list of EyeResult
        Patients in order of first appearance, their eyes right, left, unknown. Rows without a
        patient are left out.

    Raises
    ------
    ValueError
        When ``eyes`` and ``rows`` differ in length.
    """
    rows = list(rows)
    if eyes is not None and len(eyes) != len(rows):
        raise ValueError(f"{len(eyes)} eyes for {len(rows)} rows")
    groups: dict[str, dict[str, list[Any]]] = {}
    for i, row in enumerate(rows):
        patient, eye = _eye_of(row, None if eyes is None else eyes[i])
        if patient is None or patient == "":
            continue
        side = _side(eye)
        groups.setdefault(str(patient), {}).setdefault(side, []).append(row)
    out = []
    for patient, by_eye in groups.items():
        for side in _EYE_ORDER:
            if side in by_eye:
                out.append(_one_eye(patient, side, by_eye[side]))
    return out


def _reason(eyes: Sequence[EyeResult], refer: str | None) -> str:
    referred = [e.eye for e in eyes if e.refer == "yes"]
    if referred:
        return "referable in the " + " and ".join(f"{s} eye" for s in referred)
    if refer == INSUFFICIENT:
        missing = [s for s in _EYE_ORDER[:2] if s not in {e.eye for e in eyes}]
        bad = [f"{e.eye} eye ungradable" for e in eyes if not e.graded]
        return "; ".join(bad + [f"no {s} eye photograph" for s in missing]) or INSUFFICIENT
    graded = [f"{e.eye} eye" for e in eyes if e.graded]
    return f"not referable ({' and '.join(graded)} graded)" if graded else ""


def aggregate_patient(eyes: Sequence[EyeResult], rule: str = DEFAULT_PATIENT_RULE) -> PatientResult:
    """Apply the patient rule to one patient's eyes.

    Parameters
    ----------
    eyes : sequence of EyeResult
        The eyes of one patient (from :func:`aggregate_eyes`).
    rule : {"either-eye", "both-eyes"}, default "either-eye"
        The patient rule (:data:`PATIENT_RULES`, the module docstring).

    Returns
    -------
    PatientResult

    Raises
    ------
    MedtuneError
        For an unknown rule, no eyes, or eyes of more than one patient.
    """
    if rule not in PATIENT_RULES:
        raise MedtuneError(
            f"patient rule {rule!r} is unknown; use one of {', '.join(PATIENT_RULES)}"
        )
    if not eyes:
        raise MedtuneError("aggregate_patient: no eyes given")
    patients = {e.patient_id for e in eyes}
    if len(patients) > 1:
        raise MedtuneError(f"aggregate_patient: eyes of {len(patients)} patients given; pass one")
    eyes = sorted(eyes, key=lambda e: _EYE_ORDER.index(e.eye))
    graded = [e for e in eyes if e.graded]
    has_task = any(e.refer is not None for e in eyes)
    complete = {"right", "left"} <= {e.eye for e in graded} if rule == "both-eyes" else graded
    if any(e.refer == "yes" for e in graded):
        refer: str | None = "yes"
    elif not complete:
        refer = INSUFFICIENT
    elif not has_task:
        refer = None
    else:
        refer = "no" if all(e.refer == "no" for e in graded) else ""
    worst = max(graded, key=lambda e: int(e.grade), default=None)  # type: ignore[arg-type]
    return PatientResult(
        patient_id=eyes[0].patient_id,
        eyes=tuple(eyes),
        refer=refer,
        grade=None if worst is None else worst.grade,
        grade_name=None if worst is None else worst.grade_name,
        rule=rule,
        reason=_reason(eyes, refer),
    )


def aggregate_patients(
    rows: Iterable[Any],
    eyes: Sequence[Any] | None = None,
    *,
    rule: str = DEFAULT_PATIENT_RULE,
) -> list[PatientResult]:
    """:func:`aggregate_eyes` then :func:`aggregate_patient` for every patient.

    Parameters
    ----------
    rows, eyes
        As in :func:`aggregate_eyes`.
    rule : {"either-eye", "both-eyes"}, default "either-eye"

    Returns
    -------
    list of PatientResult
        In order of first appearance.
    """
    return _patients_of(aggregate_eyes(rows, eyes), rule)


def _patients_of(eyes: Sequence[EyeResult], rule: str) -> list[PatientResult]:
    """:func:`aggregate_patient` per patient of ``eyes``, in order of first appearance."""
    by_patient: dict[str, list[EyeResult]] = {}
    for eye in eyes:
        by_patient.setdefault(eye.patient_id, []).append(eye)
    return [aggregate_patient(e, rule) for e in by_patient.values()]


# ---------------------------------------------------------------------------- evaluation


def _rows_at(
    p_referable: np.ndarray, gradable: np.ndarray, grades: np.ndarray, threshold: float
) -> list[dict[str, Any]]:
    """Image rows as ``medtune predict`` makes them, at one threshold (the rows' own rule)."""
    return [
        {
            "image": str(i),
            "quality": "gradable" if ok else UNGRADABLE,
            "grade": int(g),
            "p_referable": float(p),
            "refer": UNGRADABLE if not ok else ("yes" if p >= threshold else "no"),
        }
        for i, (p, ok, g) in enumerate(zip(p_referable, gradable, grades, strict=True))
    ]


def _proportion(success: np.ndarray) -> tuple[float | None, list[float] | None]:
    """A proportion and its Wilson interval (patients are independent: no clustering)."""
    from medtune.evaluation.intervals import proportion_ci

    success = np.asarray(success, dtype=bool)
    if success.size == 0:
        return None, None
    return float(success.mean()), proportion_ci(success)


def _point_block(
    results: Sequence[PatientResult], truth: Mapping[str, bool], threshold: float
) -> dict[str, Any]:
    """Patient-level sensitivity, specificity and imageability at one operating point."""
    pos = np.array([truth[r.patient_id] for r in results], dtype=bool)
    decided = np.array([not r.insufficient for r in results], dtype=bool)
    yes = np.array([r.refer == "yes" for r in results], dtype=bool)
    sens, sens_ci = _proportion(yes[pos & decided])
    spec, spec_ci = _proportion(~yes[~pos & decided])
    imageable, imageable_ci = _proportion(decided)
    referred_sens, referred_sens_ci = _proportion((yes | ~decided)[pos])
    referred_spec, referred_spec_ci = _proportion(~(yes | ~decided)[~pos])
    return {
        "threshold": float(threshold),
        "sensitivity": sens,
        "sensitivity_ci": sens_ci,
        "specificity": spec,
        "specificity_ci": spec_ci,
        "tp": int((yes & pos & decided).sum()),
        "fn": int((~yes & pos & decided).sum()),
        "tn": int((~yes & ~pos & decided).sum()),
        "fp": int((yes & ~pos & decided).sum()),
        "n_insufficient": int((~decided).sum()),
        "n_insufficient_positive": int((~decided & pos).sum()),
        "imageability": imageable,
        "imageability_ci": imageable_ci,
        "insufficient_share": None if imageable is None else 1.0 - imageable,
        "insufficient_share_ci": None if imageable_ci is None else [
            1.0 - imageable_ci[1], 1.0 - imageable_ci[0]
        ],
        "sensitivity_insufficient_referred": referred_sens,
        "sensitivity_insufficient_referred_ci": referred_sens_ci,
        "specificity_insufficient_referred": referred_spec,
        "specificity_insufficient_referred_ci": referred_spec_ci,
    }  # fmt: skip


def patient_metrics(
    eyes: Sequence[Any],
    positive: Any,
    p_referable: Any,
    gradable: Any,
    thresholds: Mapping[str, float],
    *,
    grades: Any = None,
    rule: str = DEFAULT_PATIENT_RULE,
    headline: str = DEFAULT_OPERATING_POINT,
) -> dict[str, Any] | None:
    """Patient-level sensitivity, specificity and imageability with 95% Wilson intervals.

    A patient's truth is referable when any of their images is labelled referable (the worst eye,
    as "mtmDR in at least one eye" in the IDx-DR trial); the answer is the patient rule applied
    to the images' referral flags at each operating point's threshold (chosen on validation).
    Sensitivity and specificity are measured on the patients with a disease-level answer, as the
    pivotal trials do; the share with "insufficient quality" is reported beside them
    (imageability = 1 - that share), and so are the sensitivity and specificity when an
    insufficient-quality answer counts as a referral (what a programme does with it). Patients
    are independent units, so every interval is a Wilson score interval
    (:func:`medtune.evaluation.intervals.proportion_ci` without groups).

    Parameters
    ----------
    eyes : sequence of ImageEye or (patient, eye) tuples, length N
        Each image's patient and eye (:func:`medtune.data.laterality.image_eyes`).
    positive : array-like of bool, shape (N,)
        Whether each image is labelled referable.
    p_referable : array-like of float, shape (N,)
        P(referable) of each image.
    gradable : array-like of bool, shape (N,)
        The quality gate's verdict per image (ungradable images never decide an eye).
    thresholds : mapping of str to float
        Operating point name -> threshold on ``p_referable``.
    grades : array-like of int, shape (N,), optional
        Decoded grades (for the eyes' grades; default 0).
    rule : {"either-eye", "both-eyes"}, default "either-eye"
    headline : str, default ``config.DEFAULT_OPERATING_POINT`` ("sens90")
        The operating point whose figures are also given at the top level (``medtune
        predict``'s default point); the first point when absent.

    Returns
    -------
    dict or None
        ``None`` when no image has a patient. Otherwise ``rule``, ``rule_text``,
        ``n_patients``, ``n_eyes``, ``n_ungradable_eyes``, ``n_images``,
        ``n_images_without_patient``, ``n_positive``, ``n_negative``,
        ``headline_operating_point``, the headline point's ``sensitivity``, ``specificity``,
        ``imageability``, ``insufficient_share`` (each with ``_ci``), ``n_insufficient``, and
        ``operating_points`` (per point: those figures, ``tp``/``fn``/``tn``/``fp``,
        ``n_insufficient_positive`` and the ``*_insufficient_referred`` figures).
    """
    p = np.asarray(p_referable, dtype=np.float64).ravel()
    ok = np.asarray(gradable, dtype=bool).ravel()
    pos = np.asarray(positive, dtype=bool).ravel()
    g = np.zeros(len(p), np.int64) if grades is None else np.asarray(grades).astype(np.int64)
    if not (len(eyes) == len(p) == len(ok) == len(pos) == len(g)):
        raise ValueError(
            "patient_metrics: eyes, positive, p_referable and gradable differ in length"
        )
    truth: dict[str, bool] = {}
    for i, e in enumerate(eyes):
        patient = _eye_of({}, e)[0] if e is not None else None
        if patient:
            truth[str(patient)] = truth.get(str(patient), False) or bool(pos[i])
    if not truth or not thresholds:
        return None
    eye_list = [e if e is not None else (None, None) for e in eyes]
    points = {}
    n_eyes = n_bad = 0
    for name, threshold in thresholds.items():
        eye_results = aggregate_eyes(_rows_at(p, ok, g, threshold), eye_list)
        n_eyes, n_bad = len(eye_results), sum(not e.graded for e in eye_results)
        points[name] = _point_block(_patients_of(eye_results, rule), truth, threshold)
    head = headline if headline in points else next(iter(points))
    n_pos = sum(truth.values())
    out: dict[str, Any] = {
        "rule": rule,
        "rule_text": PATIENT_RULES[rule],
        "truth": "a patient is referable when any of their images is labelled referable",
        "intervals": "Wilson score (95%), patients as independent units",
        "n_patients": len(truth),
        "n_eyes": n_eyes,
        "n_ungradable_eyes": n_bad,
        "n_images": int(sum(1 for e in eye_list if _eye_of({}, e)[0])),
        "n_images_without_patient": int(sum(1 for e in eye_list if not _eye_of({}, e)[0])),
        "n_positive": int(n_pos),
        "n_negative": int(len(truth) - n_pos),
        "headline_operating_point": head,
    }
    for key in ("sensitivity", "specificity", "imageability", "insufficient_share"):
        out[key] = points[head][key]
        out[f"{key}_ci"] = points[head][f"{key}_ci"]
    out["n_insufficient"] = points[head]["n_insufficient"]
    out["operating_points"] = points
    return out


def evaluation_patients(
    eyes: Sequence[Any],
    y_true: Any,
    probs: Any,
    metrics: Mapping[str, Any],
    *,
    label_space: LabelSpace,
    gradable: Any = None,
    decoding: Mapping[str, Any] | None = None,
    rule: str = DEFAULT_PATIENT_RULE,
) -> dict[str, Any] | None:
    """:func:`patient_metrics` at the operating points an image-level evaluation chose.

    Parameters
    ----------
    eyes : sequence of ImageEye or None, length N
        Each image's patient and eye.
    y_true : array-like of int, shape (N,)
        True grades.
    probs : array-like, shape (N, K)
        Calibrated probabilities.
    metrics : mapping
        The image-level :func:`medtune.evaluation.metrics.compute_metrics` result: its
        ``operating_points`` thresholds (chosen on validation) are applied per image.
    label_space : LabelSpace
        The model's classes (its referral task is what patients are referred for).
    decoding : mapping, optional
        As for :func:`~medtune.evaluation.metrics.compute_metrics`.
    gradable : array-like of bool, shape (N,), optional
        The quality gate's verdicts (default: every image gradable).
    rule : {"either-eye", "both-eyes"}, default "either-eye"

    Returns
    -------
    dict or None
        :func:`patient_metrics`'s dict plus ``patient_from`` / ``eye_from`` (how many images got
        their patient / eye from the manifest, DICOM or the file name); ``None`` without a
        referral task, without operating points, or when no image has a patient.
    """
    from collections import Counter

    from medtune.evaluation.decoding import decode

    task = label_space.binary_task
    points = metrics.get("operating_points") or {}
    if task is None or not points:
        return None
    y = np.asarray(y_true).astype(np.int64)
    p = np.asarray(probs, dtype=np.float64)
    ok = np.ones(len(y), bool) if gradable is None else np.asarray(gradable, dtype=bool)
    out = patient_metrics(
        eyes,
        task.labels(y) == 1,
        task.score(p),
        ok,
        {name: float(d["threshold"]) for name, d in points.items()},
        grades=decode(p, dict(decoding) if decoding else None),
        rule=rule,
    )
    if out is not None:
        known = [e for e in eyes if e is not None and getattr(e, "patient_id", None)]
        out["patient_from"] = dict(Counter(e.patient_source for e in known))
        out["eye_from"] = dict(Counter(e.eye_source or "unknown" for e in known))
    return out


# ---------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class PatientScreening:
    """Image rows grouped into eyes and patients (:func:`screen_patients`).

    Attributes
    ----------
    eyes : tuple of EyeResult
    patients : tuple of PatientResult
    image_eyes : tuple of ImageEye
        Each image row's patient and eye, in row order.
    rule : str
        The patient rule applied.
    """

    eyes: tuple[EyeResult, ...]
    patients: tuple[PatientResult, ...]
    image_eyes: tuple[Any, ...]
    rule: str

    def meta(self) -> dict[str, Any]:
        """What the patient and eye files mean (the ``patients`` key of the sidecar)."""
        from collections import Counter

        known = [e for e in self.image_eyes if e.patient_id is not None]
        return {
            "rule": self.rule,
            "rule_text": PATIENT_RULES[self.rule],
            "eye_rule": (
                "the highest grade and P(referable) of the eye's gradable images; ungradable "
                "when it has none"
            ),
            "n_patients": len(self.patients),
            "n_eyes": len(self.eyes),
            "n_images_without_patient": len(self.image_eyes) - len(known),
            "patient_from": dict(Counter(e.patient_source for e in known)),
            "eye_from": dict(Counter(e.eye_source or "unknown" for e in known)),
            "source": "docs/screening.md, Patients and eyes (IDx-DR and EyeArt output definitions)",
        }


def screen_patients(
    rows: Sequence[Any],
    *,
    manifest: Any = None,
    rule: str = DEFAULT_PATIENT_RULE,
    eyes: Sequence[Any] | None = None,
) -> PatientScreening | None:
    """Group ``medtune predict`` rows by patient and eye and apply the eye and patient rules.

    Parameters
    ----------
    rows : sequence of PredictionRow or mapping
        Image rows whose ``image`` is the file path (``medtune.predict``'s rows).
    manifest : path-like or Manifest, optional
        A CSV ``image,patient_id,eye`` (:func:`medtune.data.laterality.read_manifest`);
        without it DICOM tags and file names (``17_left.jpeg``, ``P1_OD.jpg``) are used.
    rule : {"either-eye", "both-eyes"}, default "either-eye"
        The patient rule (:data:`PATIENT_RULES`).
    eyes : sequence of ImageEye, optional
        The rows' patients and eyes when the caller has found them already
        (:func:`medtune.data.laterality.image_eyes` of the rows' images with ``manifest``);
        default found here.

    Returns
    -------
    PatientScreening or None
        ``None`` when no image's patient is known.

    Raises
    ------
    MedtuneError
        For an unknown rule or a bad manifest.

    Examples
    --------
    >>> rows = medtune.predict(["clinic/"], run="runs/dr")  # doctest: +SKIP
    >>> screening = screen_patients(rows)  # doctest: +SKIP
    >>> [(p.patient_id, p.refer) for p in screening.patients]  # doctest: +SKIP
    [('17', 'no'), ('19', 'yes')]
    """
    from medtune.data.laterality import image_eyes

    if rule not in PATIENT_RULES:
        raise MedtuneError(
            f"patient rule {rule!r} is unknown; use one of {', '.join(PATIENT_RULES)}"
        )
    if eyes is None:
        eyes = image_eyes([str(_field(r, "image")) for r in rows], manifest=manifest)
    elif len(eyes) != len(rows):
        raise ValueError(f"{len(eyes)} eyes for {len(rows)} rows")
    if not any(e.grouped for e in eyes):
        return None
    eye_results = aggregate_eyes(rows, eyes)
    patients = tuple(_patients_of(eye_results, rule))
    return PatientScreening(tuple(eye_results), patients, tuple(eyes), rule)
