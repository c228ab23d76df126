"""org tenant wall: orgs.tenant (true: a tenant of its own, which the orgs above it see only in
aggregates; false: a group of its parent's tenant), true for every existing org, the safe
choice; users.disabled_at indexed (audit retention finds disabled users by it)

Revision ID: a6c2e8f4b1d7
Revises: 4d9b2f7e1a86
Create Date: 2026-12-04 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "a6c2e8f4b1d7"
down_revision: str | None = "4d9b2f7e1a86"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("tenant", sa.Boolean(), nullable=False, server_default=sa.text("true"))
        )
    op.create_index(
        "ix_users_disabled_at", "users", ["disabled_at"], unique=False, if_not_exists=True
    )


def downgrade() -> None:
    op.drop_index("ix_users_disabled_at", table_name="users")
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.drop_column("tenant")
