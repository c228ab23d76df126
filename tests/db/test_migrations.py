"""Migrations: one head; upgrade → check → downgrade → upgrade on both databases."""

from __future__ import annotations

import pytest
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import AsyncEngine

from scheduler.db import Base
from scheduler.db.migrate import check_schema, current_revision, head_revisions, run_migrations


def test_single_migration_head() -> None:
    assert len(head_revisions()) == 1


async def _tables(engine: AsyncEngine) -> set[str]:
    async with engine.connect() as conn:
        return set(await conn.run_sync(lambda c: inspect(c).get_table_names()))


async def test_upgrade_check_downgrade_upgrade(engine: AsyncEngine) -> None:
    # The fixture hands out a database already at head.
    assert await current_revision(engine) == head_revisions()
    assert await check_schema(engine) == []

    await run_migrations(engine, "downgrade", "base")
    assert await current_revision(engine) == ()
    assert await _tables(engine) <= {"alembic_version"}
    problems = await check_schema(engine)
    assert any("add_table jobs" in p for p in problems)

    await run_migrations(engine, "upgrade", "head")
    assert await check_schema(engine) == []
    assert set(Base.metadata.tables) <= await _tables(engine)


async def test_upgrade_at_head_is_a_no_op(engine: AsyncEngine) -> None:
    await run_migrations(engine, "upgrade", "head")
    await run_migrations(engine, "upgrade", "head")
    assert await check_schema(engine) == []


@pytest.mark.parametrize("times", [3])
async def test_concurrent_upgrades_from_empty_migrate_once(
    engine: AsyncEngine, database_url: str, times: int
) -> None:
    """Several servers starting together on an empty database: one migrates, the rest wait."""
    import asyncio

    from scheduler.db.engine import make_engine

    await run_migrations(engine, "downgrade", "base")
    engines = [make_engine(database_url) for _ in range(times)]
    try:
        await asyncio.gather(*(run_migrations(e, "upgrade", "head") for e in engines))
    finally:
        for e in engines:
            await e.dispose()
    assert await check_schema(engine) == []


BEFORE_TENANT_INDEXES = "0b755873f20c"
PREBUILT = (  # docs/OPERATIONS.md, Upgrades: what an operator runs before the upgrade
    "CREATE INDEX {c} IF NOT EXISTS ix_jobs_org_id_id ON jobs (org_id, id)",
    "CREATE INDEX {c} IF NOT EXISTS ix_jobs_user_id_id ON jobs (user_id, id)",
    "CREATE INDEX {c} IF NOT EXISTS ix_usage_ledger_job_id ON usage_ledger (job_id)",
    "CREATE INDEX {c} IF NOT EXISTS ix_api_tokens_expires_at ON api_tokens (expires_at)",
    "CREATE INDEX {c} IF NOT EXISTS ix_api_tokens_revoked_at ON api_tokens (revoked_at)",
)


async def test_indexes_built_concurrently_beforehand_are_taken_by_the_upgrade(
    engine: AsyncEngine,
) -> None:
    """The operator step for a large jobs table: the tenant indexes built without blocking
    writes (CONCURRENTLY, outside a transaction) before `fairgpu db upgrade`, which then
    finds them and reaches a schema that matches the code."""
    await run_migrations(engine, "downgrade", BEFORE_TENANT_INDEXES)
    postgres = engine.dialect.name == "postgresql"
    autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
    async with autocommit.connect() as conn:
        for statement in PREBUILT:
            await conn.execute(text(statement.format(c="CONCURRENTLY" if postgres else "")))
    await run_migrations(engine, "upgrade", "head")
    assert await current_revision(engine) == head_revisions()
    assert await check_schema(engine) == []
