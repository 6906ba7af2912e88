"""The worklist's tables (SQLAlchemy 2.0 declarative mapping, https://docs.sqlalchemy.org).

One screening is one patient seen at one time: its eyes, its photographs (by SHA-256, never the
pixels), the model's answers and the referral, in three tables written in ONE transaction, so a
killed server leaves either the whole screening or none of it. Graders' reviews and the audit log
are append-only: a correction is a new ``reviews`` row beside the model's answer, and the
migration adds triggers that refuse ``UPDATE``/``DELETE`` on both tables.

The schema is created and changed only by the Alembic migrations in
``medtune/worklist/migrations`` (:func:`medtune.worklist.db.open_database` upgrades to head).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import JSON, Boolean, DateTime, Float, ForeignKey, Integer, String, Text
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

#: Eye sides stored (``unknown`` when neither the user nor the file name said which eye).
EYES = ("right", "left", "unknown")


def utcnow() -> dt.datetime:
    """Now, in UTC (every time in the worklist is UTC)."""
    return dt.datetime.now(dt.timezone.utc)


class Base(DeclarativeBase):
    """The worklist's declarative base."""

    type_annotation_map = {dict[str, Any]: JSON, dt.datetime: DateTime(timezone=True)}


class User(Base):
    """A person who logs in. Deleting a user keeps the row (``deleted_at``): screenings and the
    audit name who did what, and a deleted user's sessions and tokens are removed."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(16))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    locked_until: Mapped[dt.datetime | None] = mapped_column(default=None)
    deleted_at: Mapped[dt.datetime | None] = mapped_column(default=None)


class ApiToken(Base):
    """A bearer token for scripts (``Authorization: Bearer ...``); only its SHA-256 is stored."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    label: Mapped[str] = mapped_column(String(64), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class LoginSession(Base):
    """A logged-in browser: the signed cookie carries only ``id``; logging out deletes the row,
    so a copied cookie dies with it. ``csrf`` is the session's synchroniser token."""

    __tablename__ = "sessions"

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]


class Screening(Base):
    """One patient screened once: who, when, with which model and operating point, and the
    patient-level answer."""

    __tablename__ = "screenings"

    id: Mapped[str] = mapped_column(String(32), primary_key=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64))
    patient: Mapped[str] = mapped_column(String(128), index=True)
    referral: Mapped[str] = mapped_column(String(32), index=True)
    quality: Mapped[str] = mapped_column(String(32), index=True)
    operating_point: Mapped[str] = mapped_column(String(16))
    threshold: Mapped[float | None] = mapped_column(Float, default=None)
    model_id: Mapped[str] = mapped_column(String(64))
    model_version: Mapped[str] = mapped_column(String(64))
    #: ``{"classes": [...], "grades": [...]}``: the model's class names and their display names
    labels: Mapped[dict[str, Any]] = mapped_column(JSON)
    site_shift: Mapped[bool] = mapped_column(Boolean, default=False)
    eyes: Mapped[list[Eye]] = relationship(
        back_populates="screening", order_by="Eye.id", cascade="all, delete-orphan"
    )
    images: Mapped[list[ImageRecord]] = relationship(
        back_populates="screening", order_by="ImageRecord.position", cascade="all, delete-orphan"
    )


class Eye(Base):
    """One eye of a screening: the model's answer from its gradable photographs."""

    __tablename__ = "eyes"

    id: Mapped[int] = mapped_column(primary_key=True)
    screening_id: Mapped[str] = mapped_column(
        ForeignKey("screenings.id", ondelete="CASCADE"), index=True
    )
    side: Mapped[str] = mapped_column(String(8))
    quality: Mapped[str] = mapped_column(String(16))
    grade: Mapped[int | None] = mapped_column(Integer, default=None)
    grade_name: Mapped[str | None] = mapped_column(String(64), default=None)
    p_referable: Mapped[float | None] = mapped_column(Float, default=None)
    refer: Mapped[str] = mapped_column(String(16))
    screening: Mapped[Screening] = relationship(back_populates="eyes")
    reviews: Mapped[list[Review]] = relationship(order_by="Review.id")


class ImageRecord(Base):
    """One photograph of a screening: its hash (the pixels are kept only in the optional
    content-addressed folder, never here) and the model's row for it."""

    __tablename__ = "images"

    id: Mapped[int] = mapped_column(primary_key=True)
    screening_id: Mapped[str] = mapped_column(
        ForeignKey("screenings.id", ondelete="CASCADE"), index=True
    )
    position: Mapped[int] = mapped_column(Integer)
    side: Mapped[str] = mapped_column(String(8))
    name: Mapped[str] = mapped_column(String(200))
    sha256: Mapped[str] = mapped_column(String(64), index=True)
    kind: Mapped[str] = mapped_column(String(8))
    stored: Mapped[bool] = mapped_column(Boolean, default=False)
    quality: Mapped[str] = mapped_column(String(16))
    quality_reason: Mapped[str] = mapped_column(Text, default="")
    grade: Mapped[int] = mapped_column(Integer)
    grade_name: Mapped[str] = mapped_column(String(64))
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    p_referable: Mapped[float | None] = mapped_column(Float, default=None)
    refer: Mapped[str | None] = mapped_column(String(16), default=None)
    site_shift: Mapped[float | None] = mapped_column(Float, default=None)
    outside_training: Mapped[bool] = mapped_column(Boolean, default=False)
    screening: Mapped[Screening] = relationship(back_populates="images")


class Review(Base):
    """A grader's grade for one eye (append-only; the newest one is the eye's reviewed grade)."""

    __tablename__ = "reviews"

    id: Mapped[int] = mapped_column(primary_key=True)
    eye_id: Mapped[int] = mapped_column(ForeignKey("eyes.id", ondelete="CASCADE"), index=True)
    grade: Mapped[int] = mapped_column(Integer)
    grade_name: Mapped[str] = mapped_column(String(64))
    username: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEntry(Base):
    """Who did what, when (append-only). ``target`` is a screening id or a user name, never a
    patient pseudonym or a file name."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    username: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(32))
    target: Mapped[str] = mapped_column(String(128), default="")
    detail: Mapped[str] = mapped_column(Text, default="")
