"""Rows written at an older revision, for migration tests: Core statements that name only the
columns there were then (the models name today's, which an older table lacks)."""

from __future__ import annotations

from sqlalchemy import column, insert, table
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Org
from scheduler.db.types import utcnow

# `orgs` before its `tenant` column (migration a6c2e8f4b1d7), with none of the model's defaults.
ORGS_BEFORE_TENANT = table(
    "orgs",
    *(column(name) for name in ("id", "name", "parent_id", "shares", "created_at")),
    *(column(flag) for flag in ("require_isolation", "require_private_network")),
    column("private_network_required"),
)


async def org_before_tenant(session: AsyncSession, name: str, parent_id: int | None = None) -> Org:
    """An org row of a schema without `orgs.tenant`; returned as a transient `Org` that only
    carries its id and name (for builders such as tests/factories.py `user` and `job`), never
    added to the session."""
    org_id = await session.scalar(
        insert(ORGS_BEFORE_TENANT)
        .values(
            name=name,
            parent_id=parent_id,
            shares=1.0,
            created_at=utcnow(),
            require_isolation=False,
            require_private_network=False,
            private_network_required=False,
        )
        .returning(ORGS_BEFORE_TENANT.c.id)
    )
    assert org_id is not None
    return Org(id=org_id, name=name)
