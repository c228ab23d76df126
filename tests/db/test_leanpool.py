"""The direct routes' connection pool (scheduler/db/leanpool.py `LeanPool`), on PostgreSQL."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from scheduler.db.engine import asyncpg_dsn
from scheduler.db.leanpool import create_pool

pytestmark = pytest.mark.parametrize(
    "database_url", [pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)


async def _backends(database_url: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE application_name = 'fairgpu-lean' AND datname = current_database()"
        )
        return count
    finally:
        await conn.close()


async def test_many_statements_share_a_few_connections(database_url: str) -> None:
    pool = create_pool(database_url, size=2, idle_in_transaction_timeout_s=5)
    try:
        results = await asyncio.gather(
            *(pool.run("fetchval", "SELECT $1::int FROM pg_sleep(0.01)", i) for i in range(20))
        )  # fmt: skip
        assert results == list(range(20))
        assert await _backends(database_url) == 2
    finally:
        await pool.close()
    assert await _backends(database_url) == 0
    with pytest.raises(asyncpg.InterfaceError):
        await pool.run("fetchval", "SELECT 1")


async def test_a_refused_statement_keeps_its_connection_a_cancelled_one_does_not(
    database_url: str,
) -> None:
    pool = create_pool(database_url, size=1, idle_in_transaction_timeout_s=5)
    try:
        first = await pool.run("fetchval", "SELECT pg_backend_pid()")
        with pytest.raises(asyncpg.PostgresError):
            await pool.run("fetchval", "SELECT 1 / 0")
        assert await pool.run("fetchval", "SELECT pg_backend_pid()") == first
        slow = asyncio.create_task(pool.run("fetchval", "SELECT pg_sleep(5)"))
        await asyncio.sleep(0.2)
        slow.cancel()
        with pytest.raises(asyncio.CancelledError):
            await slow
        # A new connection replaces the interrupted one, and waiters are not stranded.
        pids = await asyncio.gather(
            *(pool.run("fetchval", "SELECT pg_backend_pid()") for _ in range(5))
        )
        assert len(set(pids)) == 1
        assert pids[0] != first
    finally:
        await pool.close()


async def test_a_connection_the_server_ends_is_not_handed_out_again(database_url: str) -> None:
    """A server shutting a connection down reports an error (57P01) before closing it; the
    pool must not give that connection to the next statement (it did: 'another operation is
    in progress', a 500 in the PostgreSQL-restart fault test)."""
    pool = create_pool(database_url, size=1, idle_in_transaction_timeout_s=5)
    try:
        first = await pool.run("fetchval", "SELECT pg_backend_pid()")
        with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
            await pool.run("fetchval", "SELECT pg_terminate_backend(pg_backend_pid())")
        again = await asyncio.gather(
            *(pool.run("fetchval", "SELECT pg_backend_pid()") for _ in range(3))
        )
        assert len(set(again)) == 1
        assert again[0] != first
    finally:
        await pool.close()
