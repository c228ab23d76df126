"""requeue backoff and node identity

Revision ID: 64154f161e96
Revises: 835cc69c20d4
Create Date: 2026-12-02 20:16:15.360499
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "64154f161e96"
down_revision: str | None = "835cc69c20d4"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.alter_column("gpu_id", existing_type=sa.INTEGER(), nullable=True)
        batch_op.drop_constraint(batch_op.f("fk_allocations_gpu_id_gpus"), type_="foreignkey")
        batch_op.create_foreign_key(
            batch_op.f("fk_allocations_gpu_id_gpus"),
            "gpus",
            ["gpu_id"],
            ["id"],
            ondelete="SET NULL",
        )

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_events_node_id_nodes"), type_="foreignkey")
        batch_op.create_foreign_key(
            batch_op.f("fk_events_node_id_nodes"), "nodes", ["node_id"], ["id"], ondelete="SET NULL"
        )

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("not_before", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.add_column(
            sa.Column("takeover_approved_until", sa.DateTime(timezone=True), nullable=True)
        )


def downgrade() -> None:
    with op.batch_alter_table("nodes", schema=None) as batch_op:
        batch_op.drop_column("takeover_approved_until")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("not_before")

    with op.batch_alter_table("events", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_events_node_id_nodes"), type_="foreignkey")
        batch_op.create_foreign_key(
            batch_op.f("fk_events_node_id_nodes"), "nodes", ["node_id"], ["id"], ondelete="CASCADE"
        )

    with op.batch_alter_table("allocations", schema=None) as batch_op:
        batch_op.drop_constraint(batch_op.f("fk_allocations_gpu_id_gpus"), type_="foreignkey")
        batch_op.create_foreign_key(
            batch_op.f("fk_allocations_gpu_id_gpus"),
            "gpus",
            ["gpu_id"],
            ["id"],
            ondelete="RESTRICT",
        )
        batch_op.alter_column("gpu_id", existing_type=sa.INTEGER(), nullable=False)
