"""org log bytes: org_log_bytes (bytes of log text each org keeps in log_chunks) and
tasks.log_dropped_at (when the org's log budget deleted an ended task's log)

The counter is backfilled from the chunks there are; from then on the server keeps it in the
transactions that insert and delete chunks (scheduler.services.logbudget).

Revision ID: e3f8a1c6b905
Revises: 7c3e9a2d5f18
Create Date: 2026-12-04 11:20:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "e3f8a1c6b905"
down_revision: str | None = "7c3e9a2d5f18"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


BACKFILL_POSTGRES = (
    "INSERT INTO org_log_bytes (org_id, bytes) SELECT j.org_id, SUM(octet_length(c.data)) "
    "FROM log_chunks c JOIN tasks t ON t.id = c.task_id JOIN jobs j ON j.id = t.job_id "
    "GROUP BY j.org_id"
)
BACKFILL_SQLITE = BACKFILL_POSTGRES.replace("octet_length(c.data)", "length(CAST(c.data AS BLOB))")


def upgrade() -> None:
    op.create_table(
        "org_log_bytes",
        sa.Column("org_id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("bytes", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(
            ["org_id"], ["orgs.id"], name=op.f("fk_org_log_bytes_org_id_orgs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("org_id", name=op.f("pk_org_log_bytes")),
    )
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.add_column(sa.Column("log_dropped_at", sa.DateTime(timezone=True), nullable=True))
    postgres = op.get_bind().dialect.name == "postgresql"
    op.execute(BACKFILL_POSTGRES if postgres else BACKFILL_SQLITE)


def downgrade() -> None:
    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_column("log_dropped_at")
    op.drop_table("org_log_bytes")
