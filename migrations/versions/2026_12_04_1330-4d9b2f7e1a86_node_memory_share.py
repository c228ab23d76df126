"""node memory share: nodes.memory_per_gpu_bytes, each GPU's share of the memory the node's
tasks may hold, as its agent reports it (null: unknown, an older agent or one without limits)

Revision ID: 4d9b2f7e1a86
Revises: e3f8a1c6b905
Create Date: 2026-12-04 13:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "4d9b2f7e1a86"
down_revision: str | None = "e3f8a1c6b905"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(sa.Column("memory_per_gpu_bytes", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("memory_per_gpu_bytes")
