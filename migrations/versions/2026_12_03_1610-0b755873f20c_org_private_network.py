"""org private network: orgs.require_private_network (an admin's setting) and
orgs.private_network_required (it, or an ancestor's): every one-node job of the org private

Revision ID: 0b755873f20c
Revises: b8e2d4f6a1c3
Create Date: 2026-12-03 16:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0b755873f20c"
down_revision: str | None = "b8e2d4f6a1c3"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column(
                "require_private_network", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )
        batch_op.add_column(
            sa.Column(
                "private_network_required", sa.Boolean(), nullable=False, server_default=sa.false()
            )
        )


def downgrade() -> None:
    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.drop_column("private_network_required")
        batch_op.drop_column("require_private_network")
