"""job secret env: jobs.secret_env_ciphertext, {name: Fernet token} (scheduler/secretenv.py)

Revision ID: 8abb79f63772
Revises: 64154f161e96
Create Date: 2026-12-02 21:04:32.218157
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "8abb79f63772"
down_revision: str | None = "64154f161e96"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("secret_env_ciphertext", sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("secret_env_ciphertext")
