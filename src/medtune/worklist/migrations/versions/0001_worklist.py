"""The worklist: users, tokens, sessions, screenings, eyes, images, reviews, audit log.

Revision ID: 0001
Revises:
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

TIME = sa.DateTime(timezone=True)
#: Tables whose rows are never changed or removed once written.
APPEND_ONLY = ("reviews", "audit_log")


def upgrade() -> None:
    op.create_table(
        "users",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("username", sa.String(64), nullable=False, unique=True),
        sa.Column("password_hash", sa.String(255), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("failed_logins", sa.Integer, nullable=False),
        sa.Column("locked_until", TIME, nullable=True),
        sa.Column("deleted_at", TIME, nullable=True),
    )
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE")),
        sa.Column("token_hash", sa.String(64), nullable=False, unique=True),
        sa.Column("label", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_index("ix_api_tokens_user_id", "api_tokens", ["user_id"])
    op.create_table(
        "sessions",
        sa.Column("id", sa.String(64), primary_key=True),
        sa.Column("user_id", sa.Integer, sa.ForeignKey("users.id", ondelete="CASCADE")),
        sa.Column("csrf", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("expires_at", TIME, nullable=False),
    )
    op.create_index("ix_sessions_user_id", "sessions", ["user_id"])
    _screenings()
    _reviews_and_audit()
    for table in APPEND_ONLY:
        _append_only(table)


def _screenings() -> None:
    op.create_table(
        "screenings",
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("created_at", TIME, nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("patient", sa.String(128), nullable=False),
        sa.Column("referral", sa.String(32), nullable=False),
        sa.Column("quality", sa.String(32), nullable=False),
        sa.Column("operating_point", sa.String(16), nullable=False),
        sa.Column("threshold", sa.Float, nullable=True),
        sa.Column("model_id", sa.String(64), nullable=False),
        sa.Column("model_version", sa.String(64), nullable=False),
        sa.Column("labels", sa.JSON, nullable=False),
        sa.Column("site_shift", sa.Boolean, nullable=False),
    )
    for column in ("created_at", "patient", "referral", "quality"):
        op.create_index(f"ix_screenings_{column}", "screenings", [column])
    op.create_table(
        "eyes",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "screening_id", sa.String(32), sa.ForeignKey("screenings.id", ondelete="CASCADE")
        ),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("quality", sa.String(16), nullable=False),
        sa.Column("grade", sa.Integer, nullable=True),
        sa.Column("grade_name", sa.String(64), nullable=True),
        sa.Column("p_referable", sa.Float, nullable=True),
        sa.Column("refer", sa.String(16), nullable=False),
    )
    op.create_index("ix_eyes_screening_id", "eyes", ["screening_id"])
    op.create_table(
        "images",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column(
            "screening_id", sa.String(32), sa.ForeignKey("screenings.id", ondelete="CASCADE")
        ),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("side", sa.String(8), nullable=False),
        sa.Column("name", sa.String(200), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("stored", sa.Boolean, nullable=False),
        sa.Column("quality", sa.String(16), nullable=False),
        sa.Column("quality_reason", sa.Text, nullable=False),
        sa.Column("grade", sa.Integer, nullable=False),
        sa.Column("grade_name", sa.String(64), nullable=False),
        sa.Column("probabilities", sa.JSON, nullable=False),
        sa.Column("p_referable", sa.Float, nullable=True),
        sa.Column("refer", sa.String(16), nullable=True),
        sa.Column("site_shift", sa.Float, nullable=True),
        sa.Column("outside_training", sa.Boolean, nullable=False),
    )
    op.create_index("ix_images_screening_id", "images", ["screening_id"])
    op.create_index("ix_images_sha256", "images", ["sha256"])


def _reviews_and_audit() -> None:
    op.create_table(
        "reviews",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("eye_id", sa.Integer, sa.ForeignKey("eyes.id", ondelete="CASCADE")),
        sa.Column("grade", sa.Integer, nullable=False),
        sa.Column("grade_name", sa.String(64), nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("created_at", TIME, nullable=False),
    )
    op.create_index("ix_reviews_eye_id", "reviews", ["eye_id"])
    op.create_table(
        "audit_log",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("at", TIME, nullable=False),
        sa.Column("username", sa.String(64), nullable=False),
        sa.Column("action", sa.String(32), nullable=False),
        sa.Column("target", sa.String(128), nullable=False),
        sa.Column("detail", sa.Text, nullable=False),
    )
    op.create_index("ix_audit_log_at", "audit_log", ["at"])


def _append_only(table: str) -> None:
    """Triggers that refuse UPDATE and DELETE on ``table`` (SQLite and PostgreSQL dialects)."""
    dialect = op.get_bind().dialect.name
    if dialect == "sqlite":
        for event in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER {table}_no_{event.lower()} BEFORE {event} ON {table} "
                f"BEGIN SELECT RAISE(ABORT, '{table} is append-only'); END"
            )
    elif dialect == "postgresql":
        op.execute(
            "CREATE OR REPLACE FUNCTION medtune_append_only() RETURNS trigger AS $$ "
            "BEGIN RAISE EXCEPTION '% is append-only', TG_TABLE_NAME; END; $$ LANGUAGE plpgsql"
        )
        op.execute(
            f"CREATE TRIGGER {table}_append_only BEFORE UPDATE OR DELETE ON {table} "
            "FOR EACH ROW EXECUTE FUNCTION medtune_append_only()"
        )


def downgrade() -> None:
    for table in ("audit_log", "reviews", "images", "eyes", "screenings", "sessions"):
        op.drop_table(table)
    op.drop_table("api_tokens")
    op.drop_table("users")
