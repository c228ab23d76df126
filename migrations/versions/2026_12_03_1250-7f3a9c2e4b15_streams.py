"""streams: a row per interactive stream, naming the replica that holds its user side

Revision ID: 7f3a9c2e4b15
Revises: a7d1c9e3b5f2
Create Date: 2026-12-03 12:50:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "7f3a9c2e4b15"
down_revision: str | None = "a7d1c9e3b5f2"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BIG_ID = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
WHEN = sa.DateTime(timezone=True)


def upgrade() -> None:
    op.create_table(
        "streams",
        sa.Column("id", sa.String(length=64), nullable=False),
        sa.Column("job_id", BIG_ID, nullable=False),
        sa.Column("task_id", BIG_ID, nullable=False),
        sa.Column("node_id", sa.Integer(), nullable=False),
        sa.Column("rank", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(length=16), nullable=False),
        sa.Column("port", sa.Integer(), nullable=True),
        sa.Column("holder_id", sa.String(length=64), nullable=False),
        sa.Column("holder_url", sa.String(length=512), nullable=False),
        sa.Column("created_at", WHEN, nullable=False),
        sa.Column("expires_at", WHEN, nullable=False),
        sa.Column("claimed_at", WHEN, nullable=True),
        sa.Column("alive_at", WHEN, nullable=False),
        sa.Column("relay_secret_hash", sa.String(length=64), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_streams_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["node_id"], ["nodes.id"], name=op.f("fk_streams_node_id_nodes"), ondelete="CASCADE"
        ),
        sa.ForeignKeyConstraint(
            ["task_id"], ["tasks.id"], name=op.f("fk_streams_task_id_tasks"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_streams")),
    )
    with op.batch_alter_table("streams", schema=None) as batch_op:
        batch_op.create_index("ix_streams_job_id_kind", ["job_id", "kind"], unique=False)
        batch_op.create_index(batch_op.f("ix_streams_node_id"), ["node_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_streams_holder_id"), ["holder_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_streams_alive_at"), ["alive_at"], unique=False)


def downgrade() -> None:
    op.drop_table("streams")
