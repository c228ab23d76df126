"""Test harness: every database test runs on a real SQLite file and on real PostgreSQL.

`database_url` is parametrised `sqlite` / `postgres`, so `pytest -k postgres` selects exactly the
PostgreSQL variants. PostgreSQL gets a fresh database per test session (migrated once, truncated
between tests); SQLite gets a copy of a migrated template file per test.
`FAIRGPU_TEST_POSTGRES_URL` names the server; `FAIRGPU_REQUIRE_POSTGRES=1` turns an unreachable
server, or any skipped PostgreSQL test, into a failure (tests/harness/require_postgres.py).
Under pytest-xdist each worker process makes its own PostgreSQL database (the name carries the pid).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
import pytest
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from scheduler.db import Base
from scheduler.db.engine import asyncpg_dsn, make_engine, make_sessionmaker
from scheduler.db.migrate import migrate_url

T = TypeVar("T")

POSTGRES_URL = os.environ.get(
    "FAIRGPU_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test"
)
REQUIRE_POSTGRES = os.environ.get("FAIRGPU_REQUIRE_POSTGRES") == "1"

pytest_plugins = ["tests.harness.serial", "tests.harness.require_postgres"]


def run_async(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine from sync fixture code without touching the test's own event loop."""
    with ThreadPoolExecutor(max_workers=1) as pool:
        return pool.submit(lambda: asyncio.run(fn())).result()


# tests/gpu needs a real NVIDIA GPU and driver (`make test-gpu`): collected only where asked for,
# and there it fails without one rather than skipping.
collect_ignore = [] if os.environ.get("FAIRGPU_REAL_GPU") == "1" else ["gpu"]


@pytest.fixture(scope="session")
def postgres_server_url() -> Iterator[str]:
    """A fresh, migrated PostgreSQL database for this test session; dropped at the end."""
    admin = asyncpg_dsn(POSTGRES_URL)
    name = f"fairgpu_test_{os.getpid()}_{uuid.uuid4().hex[:8]}"

    async def create() -> None:
        conn = await asyncpg.connect(admin, timeout=5)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    try:
        run_async(create)
    except (OSError, asyncpg.PostgresError) as exc:
        message = f"PostgreSQL at {POSTGRES_URL} is not usable: {exc}"
        if REQUIRE_POSTGRES:
            pytest.fail(message + " (FAIRGPU_REQUIRE_POSTGRES=1)")
        pytest.skip(message)
    url = make_url(POSTGRES_URL).set(database=name).render_as_string(hide_password=False)
    run_async(lambda: migrate_url(url))
    yield url

    async def drop() -> None:
        conn = await asyncpg.connect(admin, timeout=5)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    run_async(drop)


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("sqlite-template") / "fairgpu.db"
    run_async(lambda: migrate_url(f"sqlite:///{path}"))
    return path


TABLES = ", ".join(f'"{t.name}"' for t in Base.metadata.sorted_tables)


def _truncate_postgres(url: str) -> None:
    async def truncate() -> None:
        conn = await asyncpg.connect(asyncpg_dsn(url), timeout=5)
        try:
            await conn.execute(f"TRUNCATE {TABLES} RESTART IDENTITY CASCADE")
        finally:
            await conn.close()

    run_async(truncate)


@pytest.fixture(
    params=[
        pytest.param("sqlite", id="sqlite"),
        pytest.param("postgres", id="postgres", marks=pytest.mark.postgres),
    ]
)
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A clean, migrated database: plain URL (fairgpu picks the driver)."""
    if request.param == "sqlite":
        template: Path = request.getfixturevalue("sqlite_template")
        path = tmp_path / "fairgpu.db"
        shutil.copyfile(template, path)
        return f"sqlite:///{path}"
    url: str = request.getfixturevalue("postgres_server_url")
    _truncate_postgres(url)
    return url


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    eng = make_engine(database_url)
    yield eng
    await eng.dispose()


@pytest.fixture
async def session(engine: AsyncEngine) -> AsyncIterator[AsyncSession]:
    async with make_sessionmaker(engine)() as s:
        yield s


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Task network namespaces left without a process (tests/harness/netns.py)."""
    if not hasattr(session.config, "workerinput"):  # once, in the controlling process
        from tests.harness.netns import remove_orphans

        remove_orphans()
