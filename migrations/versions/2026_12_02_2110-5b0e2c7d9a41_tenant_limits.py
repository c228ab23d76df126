"""tenant limits: per-org priority and pending caps, indexes for caps and log retention

Revision ID: 5b0e2c7d9a41
Revises: 64154f161e96
Create Date: 2026-12-02 21:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b0e2c7d9a41"
down_revision: str | None = "64154f161e96"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_priority_class", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("max_pending_jobs", sa.Integer(), nullable=True))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_user_id_state", ["user_id", "state"], unique=False)

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index("ix_tasks_ended_at", ["ended_at"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_ended_at")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_user_id_state")

    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.drop_column("max_pending_jobs")
        batch_op.drop_column("max_priority_class")
