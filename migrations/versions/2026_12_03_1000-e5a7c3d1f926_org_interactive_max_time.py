"""org interactive max time: orgs.interactive_max_time_s, the longest interactive job

Revision ID: e5a7c3d1f926
Revises: e5a7c3d9b1f2
Create Date: 2026-12-03 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e5a7c3d1f926"
down_revision: str | None = "e5a7c3d9b1f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("interactive_max_time_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.drop_column("interactive_max_time_s")
