"""admin hold: jobs.hold_level, held_by, hold_reason (a hold its owner may not release)

Revision ID: a7d1c9e3b5f2
Revises: e5a7c3d1f926
Create Date: 2026-12-03 12:45:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a7d1c9e3b5f2"
down_revision: str | None = "e5a7c3d1f926"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Jobs held before this revision keep a user hold (hold_level None), as they had.
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("hold_level", sa.String(length=8), nullable=True))
        batch_op.add_column(sa.Column("held_by", sa.String(length=255), nullable=True))
        batch_op.add_column(sa.Column("hold_reason", sa.String(length=1024), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("hold_reason")
        batch_op.drop_column("held_by")
        batch_op.drop_column("hold_level")
