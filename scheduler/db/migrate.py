"""Run Alembic from inside fairgpu: upgrade, downgrade and check, safe under concurrent starts.

On PostgreSQL the whole upgrade runs in one transaction that first takes an advisory lock, so
two servers starting together migrate once: the second waits and finds the schema at head.
On SQLite a lock file next to the database does the same for processes on one machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Connection, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations
from scheduler.db.base import Base
from scheduler.db.engine import make_engine

# pg_advisory_xact_lock key: the first 8 bytes of "fairgpu-migrate" as a signed bigint.
MIGRATION_LOCK_KEY = int.from_bytes(b"fairgpu-migrate"[:8], "big", signed=True)
FILE_TEMPLATE = "%%(year)d_%%(month).2d_%%(day).2d_%%(hour).2d%%(minute).2d-%%(rev)s_%%(slug)s"


def alembic_config() -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(Path(migrations.__file__).parent))
    cfg.set_main_option("file_template", FILE_TEMPLATE)
    return cfg


def head_revisions() -> tuple[str, ...]:
    return tuple(ScriptDirectory.from_config(alembic_config()).get_heads())


@contextlib.asynccontextmanager
async def _sqlite_file_lock(engine: AsyncEngine) -> AsyncIterator[None]:
    """flock waits in a worker thread: the event loop keeps serving whoever holds the lock."""
    database = make_url(str(engine.url)).database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        yield
        return
    lock_path = Path(database).with_name(Path(database).name + ".migrate.lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a") as handle:
        await asyncio.to_thread(fcntl.flock, handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run(connection: Connection, action: str, revision: str) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": MIGRATION_LOCK_KEY})
    cfg = alembic_config()
    cfg.attributes["connection"] = connection
    if action == "upgrade":
        command.upgrade(cfg, revision)
    else:
        command.downgrade(cfg, revision)


async def run_migrations(
    engine: AsyncEngine, action: str = "upgrade", revision: str = "head"
) -> None:
    if engine.dialect.name != "sqlite":
        async with engine.begin() as conn:
            await conn.run_sync(_run, action, revision)
        return
    # SQLite changes a column by rebuilding its table (copy, drop, rename: Alembic's batch
    # mode), and with foreign keys on, the drop deletes every child row by its ON DELETE
    # CASCADE (a downgrade that dropped a `tasks` column took every log chunk). So the
    # migrations run with them off (the pragma is a no-op inside a transaction) and the
    # references are checked before the commit: a migration that broke one is rolled back.
    async with _sqlite_file_lock(engine), engine.connect() as conn:
        await conn.exec_driver_sql("PRAGMA foreign_keys=OFF")
        await conn.commit()
        try:
            async with conn.begin():
                await conn.run_sync(_run, action, revision)
                broken = (await conn.exec_driver_sql("PRAGMA foreign_key_check")).fetchall()
                if broken:
                    table, rowid, parent = (str(value) for value in tuple(broken[0])[:3])
                    raise RuntimeError(
                        f"migration {action} to {revision} left {len(broken)} broken "
                        f"references (first: {table} row {rowid} to {parent}); rolled back"
                    )
        finally:
            await conn.exec_driver_sql("PRAGMA foreign_keys=ON")
            await conn.commit()


def _current_and_diff(connection: Connection) -> tuple[tuple[str, ...], list[Any]]:
    ctx = MigrationContext.configure(
        connection, opts={"compare_type": True, "render_as_batch": True}
    )
    return tuple(ctx.get_current_heads()), list(compare_metadata(ctx, Base.metadata))


def describe_diff(diff: Any) -> str:
    """`add_table orgs` rather than a repr of the whole Table."""
    if isinstance(diff, list):
        return "; ".join(describe_diff(d) for d in diff)
    kind, *parts = diff
    names = [
        getattr(p, "name", None) or p for p in parts if p is not None and not isinstance(p, dict)
    ]
    return " ".join([str(kind), *(str(n) for n in names[:3])])


async def check_schema(engine: AsyncEngine) -> list[str]:
    """Problems that stand between the database and the models; empty when they agree."""
    async with engine.connect() as conn:
        current, diffs = await conn.run_sync(_current_and_diff)
    problems: list[str] = []
    heads = head_revisions()
    if set(current) != set(heads):
        problems.append(f"database at revision {current or '(none)'}, code expects {heads}")
    problems.extend(describe_diff(d) for d in diffs)
    return problems


async def current_revision(engine: AsyncEngine) -> tuple[str, ...]:
    async with engine.connect() as conn:
        current, _ = await conn.run_sync(_current_and_diff)
    return current


async def migrate_url(database_url: str, action: str = "upgrade", revision: str = "head") -> None:
    engine = make_engine(database_url)
    try:
        await run_migrations(engine, action, revision)
    finally:
        await engine.dispose()
