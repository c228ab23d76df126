"""The migration that adds the per-org log counter fills it from the chunks already stored."""

from __future__ import annotations

from sqlalchemy import Table, insert, select
from sqlalchemy.ext.asyncio import AsyncEngine

from protocol.states import JobState
from scheduler.db import LogChunk, OrgLogBytes, Task
from scheduler.db.engine import make_sessionmaker
from scheduler.db.migrate import check_schema, run_migrations
from tests import factories
from tests.db.oldrows import org_before_tenant

BEFORE = "7c3e9a2d5f18"
# Core statements name only the columns there were before the revision.
TASKS: Table = Task.__table__  # type: ignore[assignment]
CHUNKS: Table = LogChunk.__table__  # type: ignore[assignment]


async def test_the_upgrade_backfills_each_orgs_log_bytes(engine: AsyncEngine) -> None:
    # Rows written at the revision before: the downgrade on SQLite rebuilds `tasks`, and that
    # drop, with foreign keys on, takes the chunks with it.
    await run_migrations(engine, "downgrade", BEFORE)
    maker = make_sessionmaker(engine)
    async with maker() as session:
        orgs = [await org_before_tenant(session, f"org-{i}") for i in range(3)]
        for org, texts in zip(orgs, (["abc\n", "é\n"], ["x" * 1000], []), strict=True):
            user = await factories.user(session, org)
            job = await factories.job(session, org, user, state=JobState.RUNNING)
            task_id = await session.scalar(
                insert(TASKS)
                .values(job_id=job.id, node_rank=0, state=JobState.RUNNING)
                .returning(TASKS.c.id)
            )
            for i, text in enumerate(texts):
                await session.execute(
                    insert(CHUNKS).values(task_id=task_id, offset=i * 1000, data=text)
                )
        await session.commit()
        ids = [org.id for org in orgs]

    await run_migrations(engine, "upgrade", "head")
    assert await check_schema(engine) == []
    async with maker() as session:
        rows = dict((await session.execute(select(OrgLogBytes.org_id, OrgLogBytes.bytes))).all())
    # "é" is two bytes: the counter is in bytes of text, not characters.
    assert rows == {ids[0]: 4 + 3, ids[1]: 1000}


async def test_a_downgrade_that_rebuilds_tasks_keeps_their_chunks(engine: AsyncEngine) -> None:
    """On SQLite a downgrade that drops a `tasks` column rebuilds the table (copy, drop, rename);
    with foreign keys on, that drop deleted every task's log chunks by their ON DELETE CASCADE.
    Migrations run with foreign keys off and check them before they commit."""
    maker = make_sessionmaker(engine)
    async with maker() as session:
        org = await factories.org(session)
        user = await factories.user(session, org)
        job = await factories.job(session, org, user, state=JobState.RUNNING)
        task_id = await session.scalar(
            insert(TASKS)
            .values(job_id=job.id, node_rank=0, state=JobState.RUNNING)
            .returning(TASKS.c.id)
        )
        await session.execute(insert(CHUNKS).values(task_id=task_id, offset=0, data="kept\n"))
        await session.commit()

    await run_migrations(engine, "downgrade", BEFORE)
    async with maker() as session:
        kept = (await session.execute(select(CHUNKS.c.data))).scalars().all()
    assert kept == ["kept\n"]
    await run_migrations(engine, "upgrade", "head")
    assert await check_schema(engine) == []
