"""exact pending caps: fairgpu_pending_room(), the submit statement's count of pending jobs
taken under per-user and per-org advisory locks (PostgreSQL; SQLite counts under its write lock)

The submit statement used to read the counts in its own snapshot, taken before it began, so
concurrent submissions of one org each saw room and together overshot its cap. The function
takes the user's, then the org's transaction-level advisory lock, then reads the counts: each
statement of a VOLATILE function reads in a snapshot of its own (READ COMMITTED), taken after
the locks, so it sees every job a previous holder inserted (which committed, releasing them).

Revision ID: 7c3e9a2d5f18
Revises: 5b8e2d7f1a93
Create Date: 2026-12-04 10:50:00.000000
"""

from collections.abc import Sequence

from alembic import op

revision: str = "7c3e9a2d5f18"
down_revision: str | None = "5b8e2d7f1a93"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# The advisory lock classes (first key), scheduler/services/tenantlimits.py: PENDING_*_LOCK_CLASS.
ROOM_FUNCTION = """
CREATE FUNCTION fairgpu_pending_room(
    p_user_id integer, p_org_id integer, p_user_cap integer, p_org_cap integer
) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE
    user_pending bigint;
    org_pending bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1718026243, p_user_id);
    PERFORM pg_advisory_xact_lock(1718026244, p_org_id);
    SELECT coalesce(sum(n), 0) INTO user_pending FROM pending_job_counts
    WHERE owner_kind = 'user' AND owner_id = p_user_id;
    SELECT coalesce(sum(n), 0) INTO org_pending FROM pending_job_counts
    WHERE owner_kind = 'org' AND owner_id = p_org_id;
    RETURN user_pending < p_user_cap AND org_pending < p_org_cap;
END $$
"""


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(ROOM_FUNCTION)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION fairgpu_pending_room(integer, integer, integer, integer)")
