"""retention cursors: how far each retention pass has got, kept across leader changes

Revision ID: c4a7e19d3b62
Revises: 9f2b6d1e7c34
Create Date: 2026-12-04 03:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "c4a7e19d3b62"
down_revision: str | None = "9f2b6d1e7c34"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "retention_cursors",
        sa.Column("name", sa.String(length=64), nullable=False),
        sa.Column("through_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("through_id", sa.BigInteger(), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_retention_cursors")),
    )


def downgrade() -> None:
    op.drop_table("retention_cursors")
