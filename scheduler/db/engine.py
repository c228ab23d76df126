"""Engines and sessions: one place that knows how PostgreSQL and SQLite differ at runtime."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Any, TypeVar

from sqlalchemy import Table, event
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from scheduler.settings import Settings, normalise_database_url

SQLITE_BUSY_TIMEOUT_MS = 30_000

T = TypeVar("T")


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    """Foreign keys on (SQLite leaves them off), WAL so readers never block the writer."""
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.close()


def make_engine(
    database_url: str,
    *,
    pool_size: int = 10,
    echo: bool = False,
    pre_ping: bool = True,
    idle_in_transaction_timeout_s: float | None = None,
) -> AsyncEngine:
    """`pre_ping` checks each pooled connection before use: safer across database restarts, but
    on PostgreSQL it costs three round trips (BEGIN; SELECT 1; ROLLBACK) per checkout.

    `idle_in_transaction_timeout_s` (PostgreSQL) lets the database end a transaction whose client
    stopped talking: a server frozen in the middle of a scheduling apply would otherwise keep the
    lease row locked, and no standby could take over until it woke up.

    Statement parameters are never logged nor put in error messages: they carry job secrets,
    environments and token hashes.
    """
    url = normalise_database_url(database_url)
    if url.startswith("sqlite"):
        engine = create_async_engine(
            url,
            echo=echo,
            hide_parameters=True,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
        return engine
    connect_args: dict[str, object] = {}
    if idle_in_transaction_timeout_s is not None:
        timeout_ms = max(1, int(idle_in_transaction_timeout_s * 1000))
        connect_args["server_settings"] = {"idle_in_transaction_session_timeout": str(timeout_ms)}
    return create_async_engine(
        url,
        echo=echo,
        hide_parameters=True,
        pool_size=pool_size,
        max_overflow=pool_size,
        pool_pre_ping=pre_ping,
        pool_recycle=1800,
        connect_args=connect_args,
    )


def make_server_engine(settings: Settings, *, pool_size: int | None = None) -> AsyncEngine:
    """The engine of a server process (HTTP worker or scheduler) from its settings."""
    return make_engine(
        settings.database_url,
        pool_size=pool_size or settings.database_pool_size,
        echo=settings.database_echo,
        pre_ping=settings.database_pre_ping,
        # No server transaction waits on anything: one idle this long belongs to a frozen
        # process, and holding the lease row it would block failover.
        idle_in_transaction_timeout_s=settings.lease_timeout_s,
    )


def make_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """Sessions keep loaded rows usable after commit: callers read results once committed."""
    return async_sessionmaker(engine, expire_on_commit=False, autoflush=False)


def dialect_insert(session: AsyncSession, table: Table) -> Any:
    """INSERT for the session's database, with its ON CONFLICT clauses."""
    if session.get_bind().dialect.name == "postgresql":
        return pg_insert(table)
    return sqlite_insert(table)


def asyncpg_dsn(database_url: str) -> str:
    """The URL as asyncpg's own `connect` takes it (no SQLAlchemy driver suffix)."""
    url = make_url(normalise_database_url(database_url))
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


def sqlstate(exc: DBAPIError) -> str:
    """PostgreSQL's SQLSTATE of a driver error ("" when it has none, as on SQLite)."""
    orig = exc.orig
    driver = getattr(orig, "driver_exception", None) or getattr(orig, "__cause__", None)
    return str(getattr(driver, "sqlstate", "") or getattr(orig, "sqlstate", "") or "")


def error_line(exc: BaseException) -> str:
    """A database error for the log: its type and first line only. PostgreSQL's DETAIL (a
    failing row's values, which may include a job's environment or secret) is left out, as
    statement parameters are (`hide_parameters`)."""
    orig = getattr(exc, "orig", None) or exc
    first = (str(orig).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first[:300]}"


async def run_to_end(transaction: Awaitable[T]) -> T:
    """Run a write transaction (begin to commit or rollback) to its end, even when the caller
    is cancelled meanwhile; the cancellation is raised once the transaction has ended.

    A cancellation that lands inside a transaction (a client giving up on its request, a
    server stopping its background work) interrupts the driver mid-statement: the connection
    is then neither committed nor rolled back nor closed. On SQLite that connection keeps the
    database's one write lock, and every other writer waits out the busy timeout and fails
    with "database is locked". Server transactions are short and bounded by the busy or
    statement timeout, so finishing one costs at most that wait.
    """
    task = asyncio.ensure_future(transaction)
    cancelled = False
    while not task.done():
        try:
            # asyncio.wait, unlike awaiting the task, leaves it running when the waiter is
            # cancelled (anyio's cancel scopes cancel the waiter again at each await).
            await asyncio.wait((task,))
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled():
            task.exception()  # retrieved: the caller's cancellation is what propagates
        raise asyncio.CancelledError
    return task.result()
