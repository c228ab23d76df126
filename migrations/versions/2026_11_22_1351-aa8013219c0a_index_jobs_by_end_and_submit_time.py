"""index jobs by end and submit time

Revision ID: aa8013219c0a
Revises: 1d35a83286f4
Create Date: 2026-11-22 13:51:12.522592
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "aa8013219c0a"
down_revision: str | None = "1d35a83286f4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_ended_at", ["ended_at"], unique=False)
        batch_op.create_index("ix_jobs_submitted_at", ["submitted_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_submitted_at")
        batch_op.drop_index("ix_jobs_ended_at")
