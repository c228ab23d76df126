"""The FastAPI application: lifespan (engine, migrations, scheduler runtime) and routers."""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import APIRouter, FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from api.authcache import AuthCache
from api.limits import BodySizeLimit
from api.problems import install_problem_handlers
from scheduler.db.engine import make_engine, make_sessionmaker
from scheduler.db.migrate import run_migrations
from scheduler.settings import Settings

# Builds the scheduler runtime; tests may pass their own to observe notify()/wake_nodes().
RuntimeFactory = Callable[[Settings, async_sessionmaker[AsyncSession], AsyncEngine], Any]

# S1's routers, then S2's (agent protocol, metrics): included when their module exists.
_ROUTERS = (
    "api.routers.health",
    "api.routers.jobs",
    "api.routers.orgs",
    "api.routers.users",
    "api.routers.tokens",
    "api.routers.nodes",
    "api.routers.usage",
    "api.routers.agent",
    "api.routers.metrics",
)


def _default_runtime(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> Any:
    # Imported late: the API package must not need the scheduling service at import time.
    runtime_cls = importlib.import_module("scheduler.services.runtime").SchedulerRuntime
    return runtime_cls(settings=settings, sessionmaker=sessionmaker, engine=engine)


def create_app(
    settings: Settings | None = None, *, runtime_factory: RuntimeFactory | None = None
) -> FastAPI:
    """The whole server. Nothing touches the database until the lifespan starts."""
    settings = settings or Settings()
    make_runtime = runtime_factory or _default_runtime

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine = make_engine(
            settings.database_url,
            pool_size=settings.database_pool_size,
            echo=settings.database_echo,
            pre_ping=settings.database_pre_ping,
            # No server transaction waits on anything: one idle this long belongs to a frozen
            # process, and holding the lease row it would block failover.
            idle_in_transaction_timeout_s=settings.lease_timeout_s,
        )
        try:
            if settings.migrate_on_start:
                await run_migrations(engine)
            sessionmaker = make_sessionmaker(engine)
            app.state.autocommit_sessionmaker = (
                make_sessionmaker(engine.execution_options(isolation_level="AUTOCOMMIT"))
                if engine.dialect.name == "postgresql"
                else sessionmaker
            )
            runtime = make_runtime(settings, sessionmaker, engine)
            app.state.settings = settings
            app.state.engine = engine
            app.state.sessionmaker = sessionmaker
            app.state.runtime = runtime
            await runtime.start()
            try:
                yield
            finally:
                await runtime.stop()
        finally:
            await engine.dispose()

    app = FastAPI(
        title="fairgpu",
        summary="Fair-share GPU scheduler for shared GPU data centres.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auth_cache = AuthCache(settings.auth_cache_ttl_s)
    install_problem_handlers(app)
    app.add_middleware(BodySizeLimit)
    for name in _ROUTERS:
        if importlib.util.find_spec(name) is None:
            continue
        router = getattr(importlib.import_module(name), "router", None)
        if isinstance(router, APIRouter):
            app.include_router(router)
    return app
