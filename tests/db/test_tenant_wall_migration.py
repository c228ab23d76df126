"""The migration that adds the tenant wall leaves every existing org a tenant of its own: the
orgs above it see it only in aggregates, as the safe choice (docs/OPERATIONS.md)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine

from scheduler.db import Org
from scheduler.db.engine import make_sessionmaker
from scheduler.db.migrate import check_schema, run_migrations
from tests.db.oldrows import org_before_tenant

BEFORE = "4d9b2f7e1a86"


async def test_orgs_that_were_there_become_tenants(engine: AsyncEngine) -> None:
    await run_migrations(engine, "downgrade", BEFORE)
    maker = make_sessionmaker(engine)
    async with maker() as session:
        programme = await org_before_tenant(session, "programme")
        await org_before_tenant(session, "company", parent_id=programme.id)
        await session.commit()

    await run_migrations(engine, "upgrade", "head")
    assert await check_schema(engine) == []
    async with maker() as session:
        rows = dict((await session.execute(select(Org.name, Org.tenant))).all())
    assert rows == {"programme": True, "company": True}
