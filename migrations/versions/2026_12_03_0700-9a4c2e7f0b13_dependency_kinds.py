"""dependency kinds: job_dependencies.kind (afterok, afterany, afternotok), jobs.singleton

Revision ID: 9a4c2e7f0b13
Revises: 7d2e4b6a1c58
Create Date: 2026-12-03 07:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9a4c2e7f0b13"
down_revision: str | None = "7d2e4b6a1c58"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("job_dependencies", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("kind", sa.String(length=16), server_default="afterok", nullable=False)
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("singleton", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("singleton")
    with op.batch_alter_table("job_dependencies", schema=None) as batch_op:
        batch_op.drop_column("kind")
