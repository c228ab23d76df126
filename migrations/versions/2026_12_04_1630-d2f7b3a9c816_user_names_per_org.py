"""user names per org: unique within an org (uq_users_org_id) and among platform admins, who
have none (uq_users_platform_admin_name, partial: NULLs are distinct in a unique constraint),
in place of one name over the whole server, which told every tenant who worked elsewhere

Downgrade refuses while two users share a name (then in different orgs): the global
constraint could not hold; rename or delete one of them first.

Revision ID: d2f7b3a9c816
Revises: a6c2e8f4b1d7
Create Date: 2026-12-04 16:30:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "d2f7b3a9c816"
down_revision: str | None = "a6c2e8f4b1d7"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

ORG_IS_NULL = sa.text("org_id IS NULL")


def upgrade() -> None:
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_constraint("uq_users_name", type_="unique")
        batch_op.create_unique_constraint("uq_users_org_id", ["org_id", "name"])
    op.create_index(
        "uq_users_platform_admin_name",
        "users",
        ["name"],
        unique=True,
        postgresql_where=ORG_IS_NULL,
        sqlite_where=ORG_IS_NULL,
    )


def downgrade() -> None:
    shared = (
        op.get_bind()
        .execute(sa.text("SELECT name FROM users GROUP BY name HAVING COUNT(*) > 1 ORDER BY name"))
        .scalars()
        .all()
    )
    if shared:
        listed = ", ".join(shared[:10]) + (" ..." if len(shared) > 10 else "")
        raise RuntimeError(
            f"cannot make user names global again: {len(shared)} names are held in more than "
            f"one org ({listed}); rename or delete all but one of each first"
        )
    op.drop_index("uq_users_platform_admin_name", table_name="users")
    with op.batch_alter_table("users", schema=None) as batch_op:
        batch_op.drop_constraint("uq_users_org_id", type_="unique")
        batch_op.create_unique_constraint("uq_users_name", ["name"])
