"""job arrays: jobs.array_job_id (indexed), array_task_id, array_limit

Revision ID: 7d2e4b6a1c58
Revises: 3c1f0a9b7e21
Create Date: 2026-12-03 06:40:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7d2e4b6a1c58"
down_revision: str | None = "3c1f0a9b7e21"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("array_job_id", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("array_task_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("array_limit", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_jobs_array_job_id"), ["array_job_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_jobs_array_job_id"))
        batch_op.drop_column("array_limit")
        batch_op.drop_column("array_task_id")
        batch_op.drop_column("array_job_id")
