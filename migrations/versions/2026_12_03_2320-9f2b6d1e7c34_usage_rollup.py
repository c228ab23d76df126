"""usage rollup: the ledger of jobs purged after job_purge_after_s, summed per org, user,
GPU type, hour and preempted, so that usage reports add up the same after a purge

Revision ID: 9f2b6d1e7c34
Revises: 6e1d4c8b2a57
Create Date: 2026-12-03 23:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "9f2b6d1e7c34"
down_revision: str | None = "6e1d4c8b2a57"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "usage_rollup",
        sa.Column("org_id", sa.Integer(), nullable=False),
        sa.Column("user_id", sa.Integer(), nullable=False),
        sa.Column("gpu_type", sa.String(length=64), nullable=False),
        sa.Column("period_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("preempted", sa.Boolean(), nullable=False),
        sa.Column("gpu_seconds_allocated", sa.Float(), nullable=False),
        sa.Column("gpu_seconds_busy", sa.Float(), nullable=False),
        sa.Column("billed_gpu_seconds", sa.Float(), nullable=False),
        sa.Column("energy_joules", sa.Float(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["orgs.id"], name=op.f("fk_usage_rollup_org_id_orgs"), ondelete="RESTRICT"
        ),
        sa.ForeignKeyConstraint(
            ["user_id"],
            ["users.id"],
            name=op.f("fk_usage_rollup_user_id_users"),
            ondelete="RESTRICT",
        ),
        sa.PrimaryKeyConstraint(
            "org_id",
            "user_id",
            "gpu_type",
            "period_start",
            "preempted",
            name=op.f("pk_usage_rollup"),
        ),
    )
    op.create_index(
        "ix_usage_rollup_org_id_period_start", "usage_rollup", ["org_id", "period_start"]
    )


def downgrade() -> None:
    op.drop_index("ix_usage_rollup_org_id_period_start", table_name="usage_rollup")
    op.drop_table("usage_rollup")
