"""stream owner: streams.user_id and streams.org_id, so that the per-user and per-org stream
caps count every server process's streams

Revision ID: b3e8d2f4a6c1
Revises: f1a2b3c4d5e6
Create Date: 2026-12-03 15:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "b3e8d2f4a6c1"
down_revision: str | None = "f1a2b3c4d5e6"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("streams", schema=None) as batch_op:
        batch_op.add_column(sa.Column("user_id", sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column("org_id", sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f("ix_streams_user_id"), ["user_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_streams_org_id"), ["org_id"], unique=False)


def downgrade() -> None:
    with op.batch_alter_table("streams", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_streams_org_id"))
        batch_op.drop_index(batch_op.f("ix_streams_user_id"))
        batch_op.drop_column("org_id")
        batch_op.drop_column("user_id")
