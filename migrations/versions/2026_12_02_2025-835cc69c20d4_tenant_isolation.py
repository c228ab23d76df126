"""tenant isolation: node isolation mode, org isolation requirement and image allow-list, job
memory request and secret

Revision ID: 835cc69c20d4
Revises: aa8013219c0a
Create Date: 2026-12-02 20:25:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "835cc69c20d4"
down_revision: str | None = "aa8013219c0a"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Server defaults fill the rows that exist already: nodes unconfined until their agents say
    # otherwise, orgs without requirements, jobs without a memory request or secret.
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("isolation", sa.String(length=16), nullable=False, server_default="none")
        )
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("require_isolation", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch_op.add_column(
            sa.Column("image_patterns", sa.JSON(), nullable=False, server_default=sa.text("'[]'"))
        )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("memory_bytes", sa.BigInteger(), nullable=True))
        batch_op.add_column(sa.Column("job_secret", sa.String(length=128), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("job_secret")
        batch_op.drop_column("memory_bytes")
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.drop_column("image_patterns")
        batch_op.drop_column("require_isolation")
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("isolation")
