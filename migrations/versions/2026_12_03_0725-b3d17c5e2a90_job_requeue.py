"""job requeue: jobs.requeue, requeued after PREEMPTED or NODE_FAIL (null: when preemptible)

Revision ID: b3d17c5e2a90
Revises: 9a4c2e7f0b13
Create Date: 2026-12-03 07:25:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b3d17c5e2a90"
down_revision: str | None = "9a4c2e7f0b13"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("requeue", sa.Boolean(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("requeue")
