"""Problem responses for failures that are not the client's: a bug (500) and a database that
is away (503 with Retry-After), and the health probes."""

from __future__ import annotations

import socket

import pytest
from sqlalchemy import text

from api.app import create_app
from scheduler.settings import Settings
from tests.api.helpers import RecordingRuntime, World, client, running_app


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


async def test_unexpected_error_is_a_500_problem_without_internals(world: World) -> None:
    @world.app.get("/v1/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals: password=hunter2")

    async with client(world.app, world.tokens["member_a"], raise_app_exceptions=False) as c:
        r = await c.get("/v1/boom")
    assert r.status_code == 500
    assert r.headers["content-type"].startswith("application/problem+json")
    assert "hunter2" not in r.text
    assert "RuntimeError" not in r.text
    assert r.json()["title"] == "Internal server error"


async def test_database_away_is_503_with_retry_after() -> None:
    url = f"postgresql://nobody@127.0.0.1:{_closed_port()}/none"
    app = create_app(
        Settings(database_url=url, migrate_on_start=False), runtime_factory=RecordingRuntime
    )
    async with app.router.lifespan_context(app), client(app, "fg_u_whatever") as c:
        jobs = await c.get("/v1/jobs")
        ready = await c.get("/readyz")
        alive = await c.get("/healthz")
    assert jobs.status_code == 503, jobs.text
    assert jobs.headers["retry-after"] == "5"
    assert jobs.headers["content-type"].startswith("application/problem+json")
    assert "nobody" not in jobs.text
    assert ready.status_code == 503
    assert ready.headers["retry-after"] == "5"
    assert "nobody" not in ready.text
    assert "127.0.0.1" not in ready.text
    assert alive.status_code == 200


async def test_readyz_wants_the_schema_at_head(database_url: str) -> None:
    async with running_app(database_url, migrate=True) as app:
        async with client(app) as c:
            assert (await c.get("/readyz")).json()["status"] == "ready"
        async with app.state.engine.begin() as conn:
            head = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
            await conn.execute(text("UPDATE alembic_version SET version_num = 'old'"))
        try:
            async with client(app) as c:
                r = await c.get("/readyz")
        finally:  # the PostgreSQL test database is shared by the session: put it back
            async with app.state.engine.begin() as conn:
                await conn.execute(text("UPDATE alembic_version SET version_num = :v"), {"v": head})
        assert r.status_code == 503
        assert "old" in r.json()["detail"]
        assert app.state.runtime.started


async def test_lifespan_migrates_an_empty_database(tmp_path: object) -> None:
    url = f"sqlite:///{tmp_path}/fresh.db"
    async with running_app(url, migrate=True) as app, client(app) as c:
        assert (await c.get("/readyz")).status_code == 200
        runtime = app.state.runtime
    assert runtime.started
    assert runtime.stopped


@pytest.mark.postgres
@pytest.mark.parametrize("database_url", ["postgres"], indirect=True)
async def test_connections_lost_to_a_database_restart_fail_softly(world: World) -> None:
    """Without pre-ping, a pooled connection killed under us fails one request with 503 and is
    replaced; the next requests succeed."""
    async with world.client("member_a") as c:
        assert (await c.get("/v1/jobs")).status_code == 200
        async with world.app.state.engine.connect() as conn:
            await conn.execute(
                text(
                    "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        statuses = [(await c.get("/v1/jobs")) for _ in range(3)]
    assert statuses[0].status_code in (200, 503)
    if statuses[0].status_code == 503:
        assert statuses[0].headers["retry-after"] == "5"
    assert [r.status_code for r in statuses[1:]] == [200, 200]
