"""tenant limits: per-org priority and pending caps, pending counts, indexes for log retention

On PostgreSQL a trigger on `jobs` keeps `pending_job_counts` (pending jobs per user and per
org, spread over 16 slot rows each) as jobs are inserted, change state or are
deleted; the submit statement reads its caps' counts there. SQLite counts jobs instead.

Revision ID: 5b0e2c7d9a41
Revises: 8abb79f63772
Create Date: 2026-12-02 21:10:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "5b0e2c7d9a41"
down_revision: str | None = "8abb79f63772"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Each owner's count is spread over 16 slot rows (a job's slot: its id % 16).
COUNT_FUNCTION = """
CREATE FUNCTION fairgpu_count_pending() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    delta integer := 0;
    job_id bigint;
    user_id integer;
    org_id integer;
BEGIN
    IF TG_OP = 'INSERT' THEN
        IF NEW.state = 'PENDING' THEN delta := 1; END IF;
        job_id := NEW.id; user_id := NEW.user_id; org_id := NEW.org_id;
    ELSIF TG_OP = 'DELETE' THEN
        IF OLD.state = 'PENDING' THEN delta := -1; END IF;
        job_id := OLD.id; user_id := OLD.user_id; org_id := OLD.org_id;
    ELSE
        IF OLD.state = 'PENDING' AND NEW.state <> 'PENDING' THEN delta := -1;
        ELSIF OLD.state <> 'PENDING' AND NEW.state = 'PENDING' THEN delta := 1;
        END IF;
        job_id := NEW.id; user_id := NEW.user_id; org_id := NEW.org_id;
    END IF;
    IF delta <> 0 THEN
        -- Always the org's row, then the user's: a one-job change (submit, cancel) waits
        -- for the org's row before it holds any, so it never closes a cycle with a
        -- many-job change (the scheduler starting jobs) of the same org.
        INSERT INTO pending_job_counts AS c (owner_kind, owner_id, slot, n)
        VALUES ('org', org_id, job_id % 16, delta),
               ('user', user_id, job_id % 16, delta)
        ON CONFLICT (owner_kind, owner_id, slot) DO UPDATE SET n = c.n + EXCLUDED.n;
    END IF;
    RETURN NULL;
END $$
"""
COUNT_TRIGGER = """
CREATE TRIGGER jobs_count_pending AFTER INSERT OR DELETE OR UPDATE OF state ON jobs
FOR EACH ROW EXECUTE FUNCTION fairgpu_count_pending()
"""
BACKFILL = """
INSERT INTO pending_job_counts (owner_kind, owner_id, slot, n)
SELECT 'user', user_id, id % 16, count(*) FROM jobs
WHERE state = 'PENDING' GROUP BY user_id, id % 16
UNION ALL
SELECT 'org', org_id, id % 16, count(*) FROM jobs
WHERE state = 'PENDING' GROUP BY org_id, id % 16
"""


def upgrade() -> None:
    op.create_table(
        "pending_job_counts",
        sa.Column("owner_kind", sa.String(length=4), nullable=False),
        sa.Column("owner_id", sa.Integer(), nullable=False),
        sa.Column("slot", sa.Integer(), nullable=False),
        sa.Column("n", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint(
            "owner_kind", "owner_id", "slot", name=op.f("pk_pending_job_counts")
        ),
    )
    if op.get_bind().dialect.name == "postgresql":
        op.execute("LOCK TABLE jobs IN SHARE MODE")  # no job changes between backfill and trigger
        op.execute(BACKFILL)
        op.execute(COUNT_FUNCTION)
        op.execute(COUNT_TRIGGER)

    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("max_priority_class", sa.String(length=32), nullable=True))
        batch_op.add_column(sa.Column("max_pending_jobs", sa.Integer(), nullable=True))

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index("ix_jobs_user_id_state", ["user_id", "state"], unique=False)

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.create_index("ix_tasks_ended_at", ["ended_at"], unique=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER jobs_count_pending ON jobs")
        op.execute("DROP FUNCTION fairgpu_count_pending()")
    op.drop_table("pending_job_counts")

    with op.batch_alter_table("tasks", schema=None) as batch_op:
        batch_op.drop_index("ix_tasks_ended_at")

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index("ix_jobs_user_id_state")

    with op.batch_alter_table("orgs", schema=None) as batch_op:
        batch_op.drop_column("max_pending_jobs")
        batch_op.drop_column("max_priority_class")
