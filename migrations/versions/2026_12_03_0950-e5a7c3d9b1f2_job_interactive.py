"""job interactive: jobs.interactive, rank 0 under a pseudo-terminal (`fairgpu run --pty`)

Revision ID: e5a7c3d9b1f2
Revises: e5b2c7d9a4f1
Create Date: 2026-12-03 09:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e5a7c3d9b1f2"
down_revision: str | None = "e5b2c7d9a4f1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("interactive", sa.Boolean(), server_default=sa.text("false"), nullable=False)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("interactive")
