"""The worklist: screenings stored, listed, opened, reviewed and exported, and the audit log.

Every write is one transaction (:meth:`Worklist.add_screening` writes the screening, its eyes,
its images and the audit entry together). Photographs are kept only when the operator asks
(``images_dir``): in a content-addressed folder (``<sha256[:2]>/<sha256>``), never in the
database. Queries go through SQLAlchemy's expression language with bound parameters only, so no
text a user typed is ever spliced into SQL.
"""

from __future__ import annotations

import csv
import datetime as dt
import hashlib
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import selectinload

from medtune.errors import MedtuneError
from medtune.io import write_bytes, write_text
from medtune.worklist.db import Database
from medtune.worklist.models import EYES, AuditEntry, Eye, ImageRecord, Review, Screening, utcnow

#: File suffix of a kept photograph by its sniffed type (export names files with it).
SUFFIX = {"JPEG": ".jpg", "PNG": ".png", "TIFF": ".tif", "DICOM": ".dcm"}
#: Longest patient pseudonym accepted (characters).
MAX_PATIENT = 128


@dataclass
class NewImage:
    """One screened photograph as the service hands it to the worklist.

    Attributes
    ----------
    side : {"right", "left", "unknown"}
    name : str
        The uploaded file's name (shown on the page; never logged).
    data : bytes
        Its bytes (hashed; written to the image folder only when images are kept).
    kind : {"JPEG", "PNG", "TIFF", "DICOM"}
    row : dict
        The model's row (:meth:`medtune.evaluation.referral.PredictionRow.as_dict` fields).
    evidence : dict or None
        What the batch shift test reads of it (``features``, ``probs``: lists of floats), kept
        for the running batch (:meth:`Worklist.recent_evidence`).
    """

    side: str
    name: str
    data: bytes
    kind: str
    row: dict[str, Any]
    evidence: dict[str, Any] | None = None


@dataclass
class NewScreening:
    """A patient's screening before it is stored: its photographs, eyes and referral."""

    patient: str
    images: list[NewImage]
    eyes: list[dict[str, Any]]
    referral: str
    quality: str
    operating_point: str
    threshold: float | None
    model_id: str
    model_version: str
    class_names: list[str]
    grade_names: list[str]
    site_shift: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    batch_shift: dict[str, Any] | None = None


@dataclass(frozen=True)
class Filters:
    """What the worklist page filters by (all optional; dates are UTC days, inclusive)."""

    referral: str | None = None
    quality: str | None = None
    patient: str | None = None
    since: dt.date | None = None
    until: dt.date | None = None
    limit: int = 200


def check_patient(patient: str) -> str:
    """A patient pseudonym, stripped (may be empty: a script's batch without one); refused when
    too long or holding control characters.

    Raises
    ------
    MedtuneError
        Naming the rule broken.
    """
    patient = (patient or "").strip()
    if len(patient) > MAX_PATIENT or any(ord(c) < 32 for c in patient):
        raise MedtuneError(
            f"patient pseudonym: at most {MAX_PATIENT} printable characters; shorten it"
        )
    return patient


class Worklist:
    """Screenings, reviews and the audit log in a :class:`~medtune.worklist.db.Database`.

    Parameters
    ----------
    db : Database
        From :func:`medtune.worklist.db.open_database`.
    images_dir : path, optional
        Keep every screened photograph here, content-addressed (off by default).
    """

    def __init__(self, db: Database, images_dir: str | os.PathLike[str] | None = None) -> None:
        self.db = db
        self.images_dir = Path(images_dir) if images_dir is not None else None

    # ------------------------------------------------------------------ writing
    def add_screening(self, new: NewScreening, username: str) -> str:
        """Store a screening (and its audit entry) in one transaction; return its id."""
        screening_id = os.urandom(16).hex()
        kept = [self._keep(image.data) for image in new.images]
        record = Screening(
            id=screening_id,
            created_at=utcnow(),
            username=username,
            patient=check_patient(new.patient),
            referral=new.referral,
            quality=new.quality,
            operating_point=new.operating_point,
            threshold=new.threshold,
            model_id=new.model_id[:64],
            model_version=new.model_version[:64],
            labels={"classes": list(new.class_names), "grades": list(new.grade_names)},
            site_shift=new.site_shift,
            batch_shift=new.batch_shift,
        )
        record.eyes = [_eye(e) for e in new.eyes]
        record.images = [
            _image(i, image, sha, stored)
            for i, (image, (sha, stored)) in enumerate(zip(new.images, kept, strict=True))
        ]
        with self.db.session.begin() as s:
            s.add(record)
            s.add(_audit(username, "screen", screening_id, f"{len(new.images)} image(s)"))
        return screening_id

    def _keep(self, data: bytes) -> tuple[str, bool]:
        sha = hashlib.sha256(data).hexdigest()
        if self.images_dir is None:
            return sha, False
        path = self.images_dir / sha[:2] / sha
        if not path.is_file():
            write_bytes(path, data)  # atomic: a killed server never leaves half a photograph
        return sha, True

    def review(self, screening_id: str, side: str, grade: int, username: str) -> dict[str, Any]:
        """Record a grader's grade for one eye (the model's answer stays as it was).

        Raises
        ------
        MedtuneError
            For an unknown screening or eye, or a grade outside the model's grades.
        """
        with self.db.session.begin() as s:
            screening = s.get(Screening, screening_id)
            if screening is None:
                raise LookupError(screening_id)
            eye = next((e for e in screening.eyes if e.side == side), None)
            if eye is None:
                raise MedtuneError(f"this screening has no {side} eye; review one of its eyes")
            names = _grade_names(screening)
            if not 0 <= grade < len(names):
                raise MedtuneError(f"grade {grade} is not one of 0..{len(names) - 1}")
            s.add(Review(eye_id=eye.id, grade=grade, grade_name=names[grade], username=username))
            s.add(_audit(username, "review", screening_id, f"{side} eye: grade {grade}"))
        return self.get(screening_id)

    def audit(self, username: str, action: str, target: str = "", detail: str = "") -> None:
        """Append one audit entry (its own transaction)."""
        with self.db.session.begin() as s:
            s.add(_audit(username, action, target, detail))

    # ------------------------------------------------------------------ reading
    def recent_evidence(self, model_id: str, model_version: str, limit: int) -> list[dict]:
        """The batch-shift evidence of the ``limit`` photographs screened last with this model
        (the running batch of the page: the same model id and version, newest first).

        Parameters
        ----------
        model_id, model_version : str
            The model (:func:`medtune.workflows.serve.card.identity`).
        limit : int
            Photographs at most.

        Returns
        -------
        list of dict
            ``{"features": [...], "probs": [...], "patient": <screening id>}`` per photograph,
            newest first: a screening is one patient's visit, so its photographs count as one
            patient in the batch shift test.
        """
        query = (
            select(ImageRecord.batch_evidence, ImageRecord.screening_id)
            .join(Screening, ImageRecord.screening_id == Screening.id)
            .where(
                Screening.model_id == model_id[:64],
                Screening.model_version == model_version[:64],
                ImageRecord.batch_evidence.is_not(None),
            )
            .order_by(Screening.created_at.desc(), ImageRecord.position.desc())
            .limit(max(0, int(limit)))
        )
        with self.db.session() as s:
            return [{**e, "patient": sid} for e, sid in s.execute(query) if e]

    def get(self, screening_id: str) -> dict[str, Any]:
        """One screening with its eyes (and their reviews) and images, JSON-ready.

        Raises
        ------
        LookupError
            When no screening has this id.
        """
        with self.db.session() as s:
            screening = s.get(Screening, screening_id, options=_FULL)
            if screening is None:
                raise LookupError(screening_id)
            return screening_json(screening, full=True)

    def list(self, filters: Filters = Filters()) -> list[dict[str, Any]]:
        """Screenings matching ``filters``, newest first (summaries with eyes)."""
        query = _filtered(select(Screening), filters).order_by(Screening.created_at.desc())
        with self.db.session() as s:
            rows = s.scalars(query.options(*_FULL).limit(filters.limit)).all()
            return [screening_json(r, full=False) for r in rows]

    def count(self) -> int:
        """How many screenings are stored."""
        with self.db.session() as s:
            return int(s.scalar(select(func.count()).select_from(Screening)) or 0)

    def audit_entries(self, limit: int = 200) -> list[dict[str, Any]]:
        """The newest audit entries, newest first."""
        query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
        with self.db.session() as s:
            return [
                {
                    "at": _iso(a.at),
                    "user": a.username,
                    "action": a.action,
                    "target": a.target,
                    "detail": a.detail,
                }
                for a in s.scalars(query)
            ]

    # ------------------------------------------------------------------ exports
    def export_csv(self, filters: Filters) -> str:
        """One line per eye of the screenings matching ``filters`` (oldest first), with the
        model's and the newest reviewed grade."""
        query = _filtered(select(Screening), filters).order_by(Screening.created_at)
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(EXPORT_COLUMNS)
        with self.db.session() as s:
            for screening in s.scalars(query.options(*_FULL)):
                for eye in screening.eyes:
                    writer.writerow(_export_line(screening, eye))
        return buf.getvalue()

    def export_reviewed(self, out: str | os.PathLike[str]) -> int:
        """Write the reviewed, kept, gradable photographs with the graders' grades as a labelled
        set (``OUT/images/<sha>.<ext>`` and ``OUT/labels.csv`` with ``image,label,patient_id``)
        that ``medtune train --data OUT`` and ``medtune adapt --labels OUT`` read.

        Returns
        -------
        int
            Photographs written.

        Raises
        ------
        MedtuneError
            When images were not kept (nothing to export) or no eye has been reviewed.
        """
        if self.images_dir is None:
            raise MedtuneError(
                "the worklist keeps no photographs; serve with --keep-images so reviewed ones "
                "can be exported"
            )
        labelled = self._reviewed_images()
        if not labelled:
            raise MedtuneError(
                "no reviewed eye with a kept, gradable photograph yet; review eyes on the page"
            )
        out = Path(out)
        lines = []
        for sha, (kind, label, patient) in sorted(labelled.items()):
            source = self.images_dir / sha[:2] / sha
            name = f"images/{sha}{SUFFIX.get(kind, '')}"
            write_bytes(out / name, source.read_bytes())
            lines.append((name, label, patient))
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows([("image", "label", "patient_id"), *lines])
        write_text(out / "labels.csv", buf.getvalue())
        return len(lines)

    def _reviewed_images(self) -> dict[str, tuple[str, str, str]]:
        """``{sha: (kind, class name, patient group)}``; a photograph screened twice takes the
        newest review."""
        found: dict[str, tuple[str, str, str]] = {}
        query = select(Screening).order_by(Screening.created_at)
        with self.db.session() as s:
            for screening in s.scalars(query.options(*_FULL)):
                group = hashlib.sha256(screening.patient.encode()).hexdigest()[:12]
                for eye in screening.eyes:
                    if not eye.reviews:
                        continue
                    label = str(screening.labels["classes"][eye.reviews[-1].grade])
                    for image in screening.images:
                        if (
                            image.side == eye.side
                            and image.stored
                            and image.quality != "ungradable"
                        ):
                            found[image.sha256] = (image.kind, label, group)
        return found


_FULL = (
    selectinload(Screening.eyes).selectinload(Eye.reviews),
    selectinload(Screening.images),
)
EXPORT_COLUMNS = (
    "screening",
    "time_utc",
    "user",
    "patient",
    "referral",
    "quality",
    "eye",
    "eye_quality",
    "model_grade",
    "model_grade_name",
    "p_referable",
    "eye_refer",
    "reviewed_grade",
    "reviewed_grade_name",
    "reviewed_by",
    "reviewed_at",
    "operating_point",
    "threshold",
    "model_id",
    "model_version",
    "site_shift",
    "operating_point_validated",
)


def _cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting with ``= + - @`` (or a tab or
    carriage return) gets a leading ``'`` (OWASP, "CSV Injection")."""
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def _export_line(screening: Screening, eye: Eye) -> list[Any]:
    review = eye.reviews[-1] if eye.reviews else None
    return [_cell(v) for v in _export_values(screening, eye, review)]


def _export_values(screening: Screening, eye: Eye, review: Review | None) -> list[Any]:
    return [
        screening.id,
        _iso(screening.created_at),
        screening.username,
        screening.patient,
        screening.referral,
        screening.quality,
        eye.side,
        eye.quality,
        "" if eye.grade is None else eye.grade,
        eye.grade_name or "",
        "" if eye.p_referable is None else f"{eye.p_referable:.6f}",
        eye.refer,
        "" if review is None else review.grade,
        "" if review is None else review.grade_name,
        "" if review is None else review.username,
        "" if review is None else _iso(review.created_at),
        screening.operating_point,
        "" if screening.threshold is None else f"{screening.threshold:.6f}",
        screening.model_id,
        screening.model_version,
        "yes" if screening.site_shift else "no",
        ((screening.batch_shift or {}).get("validation") or {}).get("validated", ""),
    ]


def _filtered(query: Any, f: Filters) -> Any:
    if f.referral:
        query = query.where(Screening.referral == f.referral)
    if f.quality:
        query = query.where(Screening.quality == f.quality)
    if f.patient:
        query = query.where(Screening.patient == f.patient)
    if f.since:
        start = dt.datetime.combine(f.since, dt.time(), tzinfo=dt.timezone.utc)
        query = query.where(Screening.created_at >= start)
    if f.until:
        end = dt.datetime.combine(f.until + dt.timedelta(days=1), dt.time(), dt.timezone.utc)
        query = query.where(Screening.created_at < end)
    return query


def _eye(e: dict[str, Any]) -> Eye:
    if e["side"] not in EYES:
        raise MedtuneError(f"eye {e['side']!r} is unknown; use one of {', '.join(EYES)}")
    return Eye(
        side=e["side"],
        quality=e["quality"],
        grade=e.get("grade"),
        grade_name=e.get("grade_name"),
        p_referable=e.get("p_referable"),
        refer=e["refer"],
    )


def _image(position: int, image: NewImage, sha: str, stored: bool) -> ImageRecord:
    row = image.row
    return ImageRecord(
        position=position,
        side=image.side,
        name=image.name[:200],
        sha256=sha,
        kind=image.kind,
        stored=stored,
        quality=row.get("quality") or "",
        quality_reason=row.get("quality_reason") or "",
        grade=int(row["grade"]),
        grade_name=str(row["grade_name"]),
        probabilities={
            k[2:]: v for k, v in row.items() if k.startswith("p_") and k != "p_referable"
        },
        p_referable=row.get("p_referable"),
        refer=row.get("refer"),
        site_shift=row.get("site_shift"),
        outside_training=row.get("outside_training") == "yes",
        batch_evidence=image.evidence,
    )


def _audit(username: str, action: str, target: str, detail: str) -> AuditEntry:
    return AuditEntry(at=utcnow(), username=username, action=action, target=target, detail=detail)


def _grade_names(screening: Screening) -> Sequence[str]:
    return [str(g) for g in screening.labels["grades"]]


def _iso(value: dt.datetime | None) -> str | None:
    if value is None:
        return None
    if value.tzinfo is None:  # SQLite hands back naive datetimes: they were stored as UTC
        value = value.replace(tzinfo=dt.timezone.utc)
    return value.isoformat(timespec="seconds")


def screening_json(s: Screening, *, full: bool) -> dict[str, Any]:
    """A stored screening as JSON: summary (``full=False``) or with images and reviews."""
    out: dict[str, Any] = {
        "id": s.id,
        "time": _iso(s.created_at),
        "user": s.username,
        "patient": s.patient,
        "referral": s.referral,
        "quality": s.quality,
        "operating_point": s.operating_point,
        "threshold": s.threshold,
        "model": {"id": s.model_id, "version": s.model_version},
        "site_shift": s.site_shift,
        "batch_shift": s.batch_shift,
        "grades": list(_grade_names(s)),
        "eyes": [_eye_json(e, full) for e in s.eyes],
        "n_images": len(s.images),
    }
    if full:
        validation = (s.batch_shift or {}).get("validation")
        out["images"] = [_image_json(i, validation) for i in s.images]
    return out


def _eye_json(e: Eye, full: bool) -> dict[str, Any]:
    review = e.reviews[-1] if e.reviews else None
    out = {
        "side": e.side,
        "quality": e.quality,
        "grade": e.grade,
        "grade_name": e.grade_name,
        "p_referable": e.p_referable,
        "refer": e.refer,
        "review": None if review is None else _review_json(review),
    }
    if full:
        out["reviews"] = [_review_json(r) for r in e.reviews]
    return out


def _review_json(r: Review) -> dict[str, Any]:
    return {
        "grade": r.grade,
        "grade_name": r.grade_name,
        "by": r.username,
        "at": _iso(r.created_at),
    }


def _image_json(i: ImageRecord, validation: dict[str, str] | None) -> dict[str, Any]:
    """A stored photograph; a yes/no referral carries its batch's validation (the
    ``operating_point_validated`` / ``operating_point_status`` columns of its row)."""
    marked = validation is not None and i.refer in ("yes", "no")
    return {
        "position": i.position,
        "side": i.side,
        "name": i.name,
        "sha256": i.sha256,
        "stored": i.stored,
        "quality": i.quality,
        "quality_reason": i.quality_reason,
        "grade": i.grade,
        "grade_name": i.grade_name,
        "probabilities": i.probabilities,
        "p_referable": i.p_referable,
        "refer": i.refer,
        "site_shift": i.site_shift,
        "outside_training": i.outside_training,
        "operating_point_validated": validation["validated"] if marked else "",  # type: ignore[index]
        "operating_point_status": validation["status"] if marked else "",  # type: ignore[index]
    }
