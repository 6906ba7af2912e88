"""The running batch: each photograph's batch-shift evidence and each screening's verdict.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-06
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # what the batch shift test reads of a photograph (projected features, probabilities)
    op.add_column("images", sa.Column("batch_evidence", sa.JSON, nullable=True))
    # the running batch's verdict when the screening was made, and its referrals' validation
    op.add_column("screenings", sa.Column("batch_shift", sa.JSON, nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("screenings") as batch:
        batch.drop_column("batch_shift")
    with op.batch_alter_table("images") as batch:
        batch.drop_column("batch_evidence")
