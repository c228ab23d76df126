"""tenant-bounded indexes: a listing of one org's or one user's jobs walks (org_id, id) or
(user_id, id), not every org's jobs by id; deleting a job finds its ledger rows by job_id;
audit retention finds dead tokens by revoked_at and expires_at

On PostgreSQL a plain CREATE INDEX blocks writes to its table while it builds: an operator
with a large jobs table builds these CONCURRENTLY before upgrading (docs/OPERATIONS.md,
Upgrades), and this migration then finds them and leaves them (IF NOT EXISTS). The schema
it leaves is the same either way.

Revision ID: 6e1d4c8b2a57
Revises: 0b755873f20c
Create Date: 2026-12-03 23:00:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "6e1d4c8b2a57"
down_revision: str | None = "0b755873f20c"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

INDEXES = (
    ("ix_jobs_org_id_id", "jobs", ["org_id", "id"]),
    ("ix_jobs_user_id_id", "jobs", ["user_id", "id"]),
    ("ix_usage_ledger_job_id", "usage_ledger", ["job_id"]),
    ("ix_api_tokens_expires_at", "api_tokens", ["expires_at"]),
    ("ix_api_tokens_revoked_at", "api_tokens", ["revoked_at"]),
)


def upgrade() -> None:
    for name, table, columns in INDEXES:
        op.create_index(name, table, columns, unique=False, if_not_exists=True)


def downgrade() -> None:
    for name, table, _ in reversed(INDEXES):
        op.drop_index(name, table_name=table)
