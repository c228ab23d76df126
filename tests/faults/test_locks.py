"""A server that leads the scheduler must not block a replica or `fairgpu admin bootstrap` from
migrating: the lease and the migration use different PostgreSQL advisory locks."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy.engine import make_url

from scheduler.db.migrate import migrate_url
from scheduler.services.scheduling.lease import LEASE_LOCK_KEY


@pytest.mark.postgres
async def test_migration_runs_while_the_scheduler_lease_is_held(postgres_server_url: str) -> None:
    database_url = postgres_server_url
    dsn = make_url(database_url).set(drivername="postgresql").render_as_string(False)
    holder = await asyncpg.connect(dsn)
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", LEASE_LOCK_KEY)
        await asyncio.wait_for(migrate_url(database_url), timeout=20)
    finally:
        await holder.close()
