"""User names per org (migration d2f7b3a9c816): the schema holds one name per org and one
among platform admins; the downgrade to one name per server keeps the users while no name is
shared, and refuses, changing nothing, once two orgs hold one."""

from __future__ import annotations

import pytest
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine

from scheduler.db import User
from scheduler.db.engine import make_sessionmaker
from scheduler.db.migrate import check_schema, current_revision, head_revisions, run_migrations
from scheduler.states import Role
from tests import factories

BEFORE = "a6c2e8f4b1d7"


async def _add(engine: AsyncEngine, *users: User) -> None:
    async with make_sessionmaker(engine)() as session:
        session.add_all(users)
        await session.commit()


async def _names(engine: AsyncEngine) -> list[tuple[str, int | None]]:
    async with make_sessionmaker(engine)() as session:
        rows = await session.execute(select(User.name, User.org_id).order_by(User.id))
        return [(name, org_id) for name, org_id in rows]


async def test_a_name_is_unique_per_org_and_among_platform_admins(engine: AsyncEngine) -> None:
    async with make_sessionmaker(engine)() as session:
        acme, globex = await factories.org(session, "acme"), await factories.org(session, "globex")
        await session.commit()
    await _add(
        engine,
        User(name="jane", org_id=acme.id),
        User(name="jane", org_id=globex.id),
        User(name="jane", org_id=None, role=Role.PLATFORM_ADMIN),
    )
    for twin in (
        User(name="jane", org_id=acme.id),
        User(name="jane", org_id=None, role=Role.PLATFORM_ADMIN),
    ):
        with pytest.raises(IntegrityError):
            await _add(engine, twin)
    assert await _names(engine) == [("jane", acme.id), ("jane", globex.id), ("jane", None)]


async def test_downgrade_keeps_distinct_names_and_refuses_shared_ones(
    engine: AsyncEngine,
) -> None:
    async with make_sessionmaker(engine)() as session:
        acme, globex = await factories.org(session, "acme"), await factories.org(session, "globex")
        await session.commit()
    await _add(engine, User(name="ada", org_id=acme.id), User(name="gus", org_id=globex.id))
    await run_migrations(engine, "downgrade", BEFORE)
    assert await _names(engine) == [("ada", acme.id), ("gus", globex.id)]
    await run_migrations(engine, "upgrade", "head")
    assert await check_schema(engine) == []

    await _add(engine, User(name="ada", org_id=globex.id))
    with pytest.raises(RuntimeError, match=r"1 names are held in more than one org \(ada\)"):
        await run_migrations(engine, "downgrade", BEFORE)
    assert await current_revision(engine) == head_revisions()
    assert await check_schema(engine) == []
    assert await _names(engine) == [("ada", acme.id), ("gus", globex.id), ("ada", globex.id)]
