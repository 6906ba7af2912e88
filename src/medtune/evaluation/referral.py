"""From a model's probabilities to the rows a screening programme reads: grade, grade name,
P(referable), and the referral flag at an operating point chosen on validation.

The same rows come out of ``medtune predict`` (CSV or JSON), the Python API and the web page, so
they are built here once. Imports numpy and the standard library only (the ONNX path has no
torch or scikit-learn).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from medtune.config import DEFAULT_OPERATING_POINT, OPERATING_POINTS
from medtune.errors import MedtuneError
from medtune.evaluation.card import ModelCard, OperatingPoints
from medtune.evaluation.decoding import expected_grade
from medtune.evaluation.labels import LabelSpace

__all__ = [
    "DEFAULT_OPERATING_POINT",
    "OPERATING_POINT_CHOICES",
    "PredictionRow",
    "ReferralRule",
    "build_rows",
    "decoding_rule",
    "format_figure",
    "mark_referrals",
    "predictions_meta",
    "referral_rule",
]

#: The operating points' names (their home: ``medtune.config.OPERATING_POINTS``). The screening
#: default, :data:`DEFAULT_OPERATING_POINT`, is the highest-specificity threshold that reached
#: >= 90% sensitivity for referable DR on validation (docs/screening.md, "Referral output").
OPERATING_POINT_CHOICES = tuple(OPERATING_POINTS)
UNGRADABLE = "ungradable"


@dataclass(frozen=True)
class ReferralRule:
    """How a model refers: which classes are referable, and the threshold on their summed
    probability chosen on validation.

    Attributes
    ----------
    name : str
        What a referral means, e.g. ``"referable DR (grade >= 2)"``.
    positive : tuple of int
        Class indices whose probabilities sum to ``p_referable``.
    operating_point : str
        ``sens90``, ``sens97.5`` or ``youden``.
    threshold : float or None
        Refer when ``p_referable >= threshold``; ``None`` when the model carries no validated
        thresholds (``refer`` is then left empty).
    validated : dict
        The point as stored (``rule``, validation ``sensitivity``/``specificity`` with
        ``*_ci``), empty without thresholds.
    """

    name: str
    positive: tuple[int, ...]
    operating_point: str
    threshold: float | None
    validated: dict[str, Any] = field(default_factory=dict)


def referral_rule(
    label_space: LabelSpace,
    operating_points: OperatingPoints | None,
    operating_point: str = DEFAULT_OPERATING_POINT,
    tta: str = "none",
) -> ReferralRule | None:
    """The referral rule of a model at ``operating_point``.

    Parameters
    ----------
    label_space : LabelSpace
        The model's classes (which ones are referable: :attr:`LabelSpace.referral_classes`).
    operating_points : OperatingPoints or None
        ``ModelCard.operating_points`` (``model.json`` or the export's card).
    operating_point : {"sens90", "sens97.5", "youden"}, default "sens90"
        Which validated threshold to refer at.
    tta : {"none", "rot90"}, default "none"
        The test-time augmentation predictions use (its own validated thresholds).

    Returns
    -------
    ReferralRule or None
        ``None`` when the model has no referral task (not DR grades, not binary). The classes
        stored with the thresholds take precedence over the label space's.

    Raises
    ------
    MedtuneError
        For an unknown operating point.
    """
    if operating_point not in OPERATING_POINT_CHOICES:
        raise MedtuneError(
            f"operating point {operating_point!r} is unknown; use one of "
            f"{', '.join(OPERATING_POINT_CHOICES)}"
        )
    positive = label_space.referral_classes
    if positive is None:
        return None
    name = str(label_space.referral_name)
    point = None
    if operating_points is not None:
        positive = operating_points.positive_classes or positive  # what they were chosen for
        name = operating_points.name or name
        point = operating_points.at(tta, operating_point)
    if point is None:
        return ReferralRule(name, positive, operating_point, None, {})
    return ReferralRule(name, positive, operating_point, float(point.threshold), point.to_dict())


@dataclass(frozen=True)
class PredictionRow:
    """One image's screening output (one CSV row, one JSON object, one web-page result).

    Attributes
    ----------
    image : str
        The image as given (path or upload name).
    quality : str
        ``"gradable"``, ``"ungradable"``, or ``""`` when the image was not assessed.
    quality_reason : str
        Why an image is ungradable (empty when gradable).
    grade : int
        The decoded class index (``ModelCard.decoding``: argmax or expected-grade thresholds).
    grade_name : str
        Its name (DR grade names for 5-grade DR models, else the class name).
    probabilities : dict of str to float
        Calibrated probability of each grade, keyed by grade name, in grade order.
    expected_grade : float or None
        ``sum_k k * p_k`` when the decoding cuts it at thresholds (explains a grade that is
        not the most probable one); ``None`` otherwise.
    p_referable : float or None
        Summed probability of the referable grades (``None``: no referral task).
    refer : str or None
        ``"yes"``, ``"no"``, ``"ungradable"`` (refer for re-imaging or in-person examination),
        ``""`` (no validated threshold), or ``None`` (no referral task).
    site_shift : float or None
        Mahalanobis distance of the image's features to the training images'
        (:mod:`medtune.evaluation.shift`); ``None`` when the model has no site-shift model
        (an exported ONNX model, or a run adapted to a new site).
    outside_training : str or None
        ``"yes"`` when ``site_shift`` is above the validation images' 99th percentile: the image
        lies outside the training distribution and the validated operating point may not hold.
    """

    image: str
    quality: str
    quality_reason: str
    grade: int
    grade_name: str
    probabilities: dict[str, float]
    expected_grade: float | None = None
    p_referable: float | None = None
    refer: str | None = None
    site_shift: float | None = None
    outside_training: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The row as a flat mapping in column order (``p_<grade name>`` columns)."""
        out: dict[str, Any] = {
            "image": self.image,
            "quality": self.quality,
            "quality_reason": self.quality_reason,
            "grade": self.grade,
            "grade_name": self.grade_name,
        }
        out.update({f"p_{name}": p for name, p in self.probabilities.items()})
        if self.expected_grade is not None:
            out["expected_grade"] = self.expected_grade
        if self.p_referable is not None:
            out["p_referable"] = self.p_referable
            out["refer"] = self.refer
        if self.site_shift is not None:
            out["site_shift"] = self.site_shift
            out["outside_training"] = self.outside_training
        return out


#: Decimals a figure in a prediction CSV gets unless that would round it to a whole number it is
#: not (:func:`format_figure`).
FIGURE_DECIMALS = 6


def format_figure(value: float, decimals: int = FIGURE_DECIMALS) -> str:
    """A probability or score as CSV text that never rounds to a whole number it is not.

    Six decimals read well, but ``0.99999999999998`` printed as ``1.000000`` beside
    ``refer = no`` looks like a certain case the model failed to refer. So a value that would
    round to a whole number (0, 1, 2, ...) without being one gets more decimals, up to the 17
    significant digits that identify any float64 exactly (IEEE 754); Python's ``format`` has no
    such "round but never to an integer" mode, hence this loop.

    Parameters
    ----------
    value : float
        The figure (a probability 0-1, an expected grade, a site-shift distance, ...).
    decimals : int, default 6
        Decimals used when they do not round the value onto a whole number.

    Returns
    -------
    str
        E.g. ``"0.250000"``, ``"1.000000"`` (exactly 1), ``"0.99999999999998"``, ``"1e-20"``;
        ``"nan"`` / ``"inf"`` as Python prints them.
    """
    value = float(value)
    if not np.isfinite(value) or value == round(value):
        return f"{value:.{decimals}f}" if np.isfinite(value) else repr(value)
    for d in range(decimals, 18):
        text = f"{value:.{d}f}"
        if float(text) != round(float(text)):
            return text
    return repr(value)  # e.g. 1e-20: shortest text that reads back as the same float


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def _refer(p: float, gradable: bool, rule: ReferralRule) -> str:
    if not gradable:
        return UNGRADABLE
    if rule.threshold is None:
        return ""
    return "yes" if p >= rule.threshold else "no"


def build_rows(
    images: Sequence[str],
    probs: np.ndarray,
    labels: np.ndarray,
    label_space: LabelSpace,
    decoding: Mapping[str, Any] | None,
    rule: ReferralRule | None,
    quality: Sequence[tuple[bool, str | None] | None] | None = None,
    shift: tuple[np.ndarray, float] | None = None,
) -> list[PredictionRow]:
    """One :class:`PredictionRow` per image.

    Parameters
    ----------
    images : sequence of str
        Image names, length N.
    probs : ndarray, shape (N, K)
        Calibrated probabilities.
    labels : ndarray of int, shape (N,)
        Decoded grades (:func:`medtune.evaluation.decoding.decode`).
    label_space : LabelSpace
        The model's K classes (their display names head the probability columns).
    decoding : mapping or None
        The decoding used (an ``expected_grade`` decoding adds the ``expected_grade`` column).
    rule : ReferralRule or None
        From :func:`referral_rule`; ``None`` leaves out ``p_referable`` and ``refer``.
    quality : sequence of (gradable, reason) or None, optional
        The image-quality verdict of each image; ``None`` (or a ``None`` entry) means not
        assessed.
    shift : (ndarray of shape (N,), float) or None, optional
        Site-shift scores and the threshold above which an image is outside the training
        distribution.

    Returns
    -------
    list of PredictionRow
    """
    probs = np.asarray(probs, dtype=np.float64)
    names = label_space.grade_names
    eg = (decoding or {}).get("method") == "expected_grade"
    scores = expected_grade(probs) if eg else None
    rows = []
    for i, image in enumerate(images):
        verdict = quality[i] if quality is not None else None
        gradable = True if verdict is None else bool(verdict[0])
        q = "" if verdict is None else ("gradable" if gradable else UNGRADABLE)
        reason = "" if verdict is None or gradable else str(verdict[1] or "")
        k = int(labels[i])
        p_ref = float(probs[i, list(rule.positive)].sum()) if rule is not None else None
        rows.append(
            PredictionRow(
                image=str(image),
                quality=q,
                quality_reason=reason,
                grade=k,
                grade_name=names[k],
                probabilities={n: float(v) for n, v in zip(names, probs[i], strict=True)},
                expected_grade=float(scores[i]) if scores is not None else None,
                p_referable=p_ref,
                refer=None if rule is None else _refer(p_ref, gradable, rule),
                site_shift=None if shift is None else float(shift[0][i]),
                outside_training=None if shift is None else _yes_no(shift[0][i] > shift[1]),
            )
        )
    return rows


#: The columns :func:`mark_referrals` adds after ``refer``, and what they mean.
VALIDATION_COLUMNS = {
    "operating_point_validated": (
        "yes / no / unknown: whether the refer threshold is validated where this batch of "
        "images comes from (the batch shift test against the validation images, or the site "
        "calibration of medtune adapt); 'no' means the validated sensitivity may not hold here "
        "(the referral still follows the threshold); empty for rows without a yes/no referral"
    ),
    "operating_point_status": "why (one line, the same for every row of the batch)",
}


def mark_referrals(
    rows: Iterable[PredictionRow | Mapping[str, Any]], validation: Mapping[str, str] | None
) -> list[dict[str, Any]]:
    """The rows as dicts, each referral marked with whether its operating point is validated.

    Parameters
    ----------
    rows : iterable of PredictionRow or mapping
        Prediction rows of ONE batch (:func:`build_rows`, or their dicts).
    validation : mapping or None
        ``validated`` and ``status`` of the batch
        (:func:`medtune.evaluation.label_free.referral_validation`); ``None`` leaves the rows
        as they are.

    Returns
    -------
    list of dict
        Rows with ``operating_point_validated`` and ``operating_point_status`` right after
        ``refer`` (:data:`VALIDATION_COLUMNS`), filled for rows referred ``yes`` or ``no`` and
        empty for the others (ungradable, no threshold); rows without a ``refer`` column (no
        referral task) are unchanged. The ``refer`` value itself is never changed.
    """
    out = []
    for row in rows:
        d = row.as_dict() if isinstance(row, PredictionRow) else dict(row)
        if validation is None or "refer" not in d:
            out.append(d)
            continue
        marked = d.get("refer") in ("yes", "no")
        new: dict[str, Any] = {}
        for key, value in d.items():
            if key in VALIDATION_COLUMNS:
                continue
            new[key] = value
            if key == "refer":
                new["operating_point_validated"] = validation["validated"] if marked else ""
                new["operating_point_status"] = validation["status"] if marked else ""
        out.append(new)
    return out


def decoding_rule(decoding: Mapping[str, Any] | None, names: Sequence[str]) -> str:
    """The decoding in words (for the sidecar JSON and the docs)."""
    method = (decoding or {}).get("method", "argmax")
    if method == "expected_grade":
        cuts = ", ".join(f"{t:.3f}" for t in decoding["thresholds"])  # type: ignore[index]
        return (
            "expected grade E = sum_k k * p_k, cut at thresholds fitted on validation to "
            f"maximise quadratic weighted kappa: grade = number of thresholds <= E "
            f"(thresholds {cuts}); the grade can differ from the most probable grade"
        )
    return f"the most probable of {len(names)} classes (argmax of the probabilities)"


def predictions_meta(
    *,
    model: str,
    card: ModelCard,
    rule: ReferralRule | None,
    tta: str,
    quality: str,
) -> dict[str, Any]:
    """What the columns of a predictions file mean (the ``<out>.meta.json`` sidecar).

    Parameters
    ----------
    model : str
        The run folder or ``model.onnx`` used.
    card : ModelCard
        The model's description (classes, decoding, validation sample size, backbone).
    rule : ReferralRule or None
        The referral rule used.
    tta : str
        Test-time augmentation used.
    quality : str
        How image quality was judged (a sentence).

    Returns
    -------
    dict
        ``medtune_version``, ``created`` (UTC, ISO 8601), ``model``, ``backbone``, ``tta``,
        ``grades`` (index -> name), ``decoding`` (the stored rule and a sentence),
        ``referral`` (name, positive grades, operating point, threshold, validated
        sensitivity/specificity with 95% CIs and the validation size; ``None`` without a
        referral task), ``quality`` and ``columns`` (each column explained).
    """
    from medtune.version import __version__

    names = card.label_space.grade_names
    decoding = card.decoding
    ops = card.operating_points
    referral = None
    if rule is not None:
        v = rule.validated
        referral = {
            "name": rule.name,
            "positive_grades": [names[k] for k in rule.positive],
            "score": "p_referable = " + " + ".join(f"p_{names[k]}" for k in rule.positive),
            "operating_point": rule.operating_point,
            "threshold": rule.threshold,
            "rule": v.get("rule"),
            "validation_sensitivity": v.get("sensitivity"),
            "validation_sensitivity_ci": v.get("sensitivity_ci"),
            "validation_specificity": v.get("specificity"),
            "validation_specificity_ci": v.get("specificity_ci"),
            "validation_images": None if ops is None else ops.n_val,
            "validation_positives": None if ops is None else ops.n_val_positive,
            "note": (
                "thresholds and their sensitivity/specificity come from the validation split "
                "they were chosen on; ungradable images are flagged 'ungradable' (refer for "
                "re-imaging or examination)"
                if rule.threshold is not None
                else "the model carries no validated thresholds (trained before medtune 0.2); "
                "retrain or re-export to get the refer column"
            ),
        }
    columns = {
        "image": "the image as given",
        "quality": "gradable / ungradable (image-quality gate), empty when not assessed",
        "quality_reason": "why an image is ungradable",
        "grade": "decoded grade index (see decoding)",
        "grade_name": "name of that grade",
        **{f"p_{n}": f"calibrated probability of {n}" for n in names},
    }
    if (decoding or {}).get("method") == "expected_grade":
        columns["expected_grade"] = "sum_k k * p_k, the value the decoding thresholds cut"
    if rule is not None:
        columns["p_referable"] = "probability of " + rule.name
        columns["refer"] = (
            f"yes when p_referable >= the {rule.operating_point} threshold, else no; "
            "'ungradable' for ungradable images"
        )
    return {
        "medtune_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "model": model,
        "backbone": card.backbone,
        "tta": tta,
        "grades": dict(enumerate(names)),
        "decoding": {
            **dict(decoding or {"method": "argmax"}),
            "rule": decoding_rule(decoding, names),
        },
        "referral": referral,
        "quality": quality,
        "columns": columns,
    }
