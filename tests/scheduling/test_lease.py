"""Exactly one leader; another replica takes over within the lease timeout when it dies."""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import make_url

from scheduler.db.engine import asyncpg_dsn, make_engine, make_sessionmaker
from scheduler.db.migrate import migrate_url
from scheduler.services.runtime import SchedulerRuntime
from scheduler.services.scheduling.lease import LEASE_ROW_ID, Lease
from scheduler.settings import Settings
from tests.scheduling.harness import fast_settings, running_cluster

LEASE_TIMEOUT_S = 2.0


@asynccontextmanager
async def replica(settings: Settings) -> AsyncIterator[SchedulerRuntime]:
    engine = make_engine(settings.database_url, pool_size=3)
    runtime = SchedulerRuntime(
        settings=settings, sessionmaker=make_sessionmaker(engine), engine=engine
    )
    await runtime.start()
    try:
        yield runtime
    finally:
        await runtime.stop()
        await engine.dispose()


async def _until(predicate: object, timeout_s: float) -> float:
    began = time.monotonic()
    while time.monotonic() - began < timeout_s:
        if predicate():  # type: ignore[operator]
            return time.monotonic() - began
        await asyncio.sleep(0.05)
    raise AssertionError(f"not within {timeout_s} s")


async def _kill_lock_connection(runtime: SchedulerRuntime) -> None:
    """Simulate the leader's process dying: its lock connection goes away, uncleanly."""
    if runtime.lease.is_postgres:
        # The lock connection is found from outside (its advisory lock), never borrowed: the
        # leader's own loop may be using it at that moment ("another operation is in progress").
        url = runtime.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        admin = await asyncpg.connect(url)
        try:
            pids = await admin.fetch(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
            assert len(pids) == 1, pids  # only the leader holds the lease lock
            await admin.execute("SELECT pg_terminate_backend($1)", pids[0]["pid"])
        finally:
            await admin.close()
    # Stop its loop without a clean release (on SQLite the row then simply expires).
    task = runtime._task
    assert task is not None
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    runtime._task = None


async def test_one_leader_and_takeover_when_it_dies(database_url: str) -> None:
    settings = fast_settings(database_url, lease_timeout_s=LEASE_TIMEOUT_S)
    async with replica(settings) as first:
        await _until(lambda: first.is_leader and first.cycles > 0, 30)
        async with replica(settings) as second:
            await asyncio.sleep(0.5)
            assert first.is_leader
            assert not second.is_leader
            deposed_epoch = first.lease.epoch
            await _kill_lock_connection(first)
            took_s = await _until(lambda: second.is_leader, LEASE_TIMEOUT_S + 2.0)
            assert took_s <= LEASE_TIMEOUT_S + 1.0, took_s
            assert second.lease.epoch is not None
            assert deposed_epoch is not None
            assert second.lease.epoch > deposed_epoch
            cycles = second.cycles
            await _until(lambda: second.cycles > cycles, 30)  # a wait, not a bound
            assert second.metrics.leader._value.get() == 1


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_readiness_asks_the_database_whether_this_replica_still_leads(
    database_url: str,
) -> None:
    """A leader whose lock connection died (as when it was frozen while a standby took over)
    must not report itself leader until its loop notices: /readyz checks the lease at once."""
    settings = fast_settings(database_url, cycle_interval_s=600.0)
    async with running_cluster(settings) as cluster:
        assert (await cluster.http.get("/readyz")).json()["scheduler_leader"] is True
        admin = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_locks "
                "WHERE locktype = 'advisory' AND granted AND pid <> pg_backend_pid() "
                "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())"
            )
        finally:
            await admin.close()
        ready = (await cluster.http.get("/readyz")).json()
        assert ready["scheduler_leader"] is False


@pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
async def test_a_deposed_leader_holding_the_lease_row_does_not_block_the_takeover(
    database_url: str,
) -> None:
    """A leader frozen in the middle of an apply holds the lease row in a session the database
    does not end (it is not idle in transaction). The next holder of the lock ends it."""
    settings = fast_settings(database_url, lease_timeout_s=600.0)  # no idle timeout to help
    async with replica(settings) as first:  # the lease row exists from now on
        await _until(lambda: first.is_leader, 30)
    stuck = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await stuck.execute("BEGIN")
        locked = await stuck.fetch("SELECT epoch FROM scheduler_lease FOR UPDATE")
        assert len(locked) == 1  # the frozen apply's lock
        async with replica(settings) as runtime:
            # Well within the lease's 600 s: the new holder ended the frozen session.
            await _until(lambda: runtime.is_leader, 60)
            assert stuck.is_closed() or not await _alive(stuck)
    finally:
        await stuck.close()


async def _alive(conn: asyncpg.Connection) -> bool:
    try:
        await asyncio.wait_for(conn.fetchval("SELECT 1"), 2)
    except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError, TimeoutError):
        return False
    return True


@pytest.mark.postgres
async def test_a_new_leader_ends_no_session_of_another_database(
    postgres_server_url: str,
) -> None:
    """One PostgreSQL server may hold several fairgpu databases (staging beside production, or
    one made from another as a template, whose tables keep their oids). A new leader ending the
    deposed leader's session must look in its own database only: `scheduler_lease`'s oid in
    pg_locks may be another database's lease table too, held by that database's own leader."""
    admin_dsn = asyncpg_dsn(postgres_server_url)
    base = f"fairgpu_lease_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    ours, theirs = f"{base}_a", f"{base}_b"
    url = make_url(postgres_server_url)
    ours_url = url.set(database=ours).render_as_string(hide_password=False)
    theirs_url = url.set(database=theirs).render_as_string(hide_password=False)
    admin = await asyncpg.connect(admin_dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{ours}"')
        await migrate_url(ours_url)
        await admin.execute(f'CREATE DATABASE "{theirs}" TEMPLATE "{ours}"')  # same oids
        engine = make_engine(ours_url)
        other = await asyncpg.connect(asyncpg_dsn(theirs_url))
        try:
            await other.execute(
                "INSERT INTO scheduler_lease (id, holder, epoch, acquired_at, renewed_at,"
                " expires_at) VALUES ($1, 'theirs', 1, now(), now(), now())",
                LEASE_ROW_ID,
            )
            same = await other.fetchval("SELECT 'scheduler_lease'::regclass::oid")
            async with engine.connect() as conn:
                assert same == await conn.scalar(text("SELECT 'scheduler_lease'::regclass::oid"))
            # The other database's leader, in the middle of its apply.
            await other.execute("BEGIN")
            await other.fetch("SELECT epoch FROM scheduler_lease FOR UPDATE")
            lease = Lease(engine, ttl_s=60.0)
            async with make_sessionmaker(engine)() as session:
                assert await lease.try_acquire(session)
            await lease._end_deposed_transactions()
            assert await _alive(other)
            await lease.release()
        finally:
            await other.close()
            await engine.dispose()
    finally:
        for name in (theirs, ours):
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
