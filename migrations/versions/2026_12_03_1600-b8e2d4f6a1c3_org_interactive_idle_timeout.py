"""org interactive idle timeout: orgs.interactive_idle_timeout_s, the idle time that ends an
interactive job (0: never; NULL: the parent's, or the server's)

Revision ID: b8e2d4f6a1c3
Revises: b3e8d2f4a6c1
Create Date: 2026-12-03 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b8e2d4f6a1c3"
down_revision: str | None = "b3e8d2f4a6c1"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("interactive_idle_timeout_s", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.drop_column("interactive_idle_timeout_s")
