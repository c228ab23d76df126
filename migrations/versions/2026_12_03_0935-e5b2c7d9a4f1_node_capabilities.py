"""node capabilities: nodes.capabilities, what the node's agent can do (null: an older agent)

Revision ID: e5b2c7d9a4f1
Revises: c4e8a1f2d6b7
Create Date: 2026-12-03 09:35:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e5b2c7d9a4f1"
down_revision: str | None = "c4e8a1f2d6b7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("capabilities", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("capabilities")
