"""job script: jobs.script, a batch script's text (protocol/script.py)

Revision ID: 3c1f0a9b7e21
Revises: 5b0e2c7d9a41
Create Date: 2026-12-03 06:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "3c1f0a9b7e21"
down_revision: str | None = "5b0e2c7d9a41"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("script", sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("script")
