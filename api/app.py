"""The FastAPI application: lifespan (engine, migrations, scheduler runtime) and routers."""

from __future__ import annotations

import gc
import importlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker
from starlette.types import Message, Receive, Scope, Send

from api.admission import Admission
from api.authcache import AuthCache
from api.authfailures import (
    AuthFailures,
    bearer_digest,
    client_address,
    has_bearer,
    parse_proxies,
    refuse_address,
)
from api.direct import DirectRoutes, Handler, send_problem
from api.limits import BodySizeLimit
from api.problems import install_problem_handlers
from api.relaylisten import relay_listener
from api.routers import (
    agent,
    forward,
    health,
    jobs,
    metrics,
    nodes,
    orgs,
    streams,
    tokens,
    usage,
    users,
)
from api.streamlimits import StreamLimits
from scheduler.db import leanpool
from scheduler.db.engine import make_server_engine, make_sessionmaker
from scheduler.db.migrate import run_migrations
from scheduler.services.heartbeat.service import Heartbeats
from scheduler.services.streams import StreamHub
from scheduler.services.tenantlimits import SubmitLimits
from scheduler.settings import Settings

log = logging.getLogger("fairgpu.api")

# Middle-generation collections between two looks at the oldest generation (CPython: 10).
FULL_COLLECTION_EVERY = 100

# Builds the scheduler runtime; tests may pass their own to observe notify()/wake_nodes().
RuntimeFactory = Callable[[Settings, async_sessionmaker[AsyncSession], AsyncEngine], Any]


@asynccontextmanager
async def _direct_routes(
    app: FairgpuApp, settings: Settings, engine: AsyncEngine, heartbeats: Heartbeats
) -> AsyncIterator[None]:
    """The direct routes and their lean asyncpg pool, on PostgreSQL when `hot_paths` is on."""
    if not settings.hot_paths or engine.dialect.name != "postgresql":
        yield
        return
    pool = leanpool.create_pool(
        settings.database_url,
        size=settings.database_pool_size,
        idle_in_transaction_timeout_s=settings.lease_timeout_s,
    )
    app.direct = DirectRoutes(app.state, app.ordinary, pool, heartbeats, app.admission)
    try:
        yield
    finally:
        app.direct = None
        await pool.close()


def _default_runtime(
    settings: Settings, sessionmaker: async_sessionmaker[AsyncSession], engine: AsyncEngine
) -> Any:
    # Imported late: the API package must not need the scheduling service at import time.
    runtime_cls = importlib.import_module("scheduler.services.runtime").SchedulerRuntime
    return runtime_cls(settings=settings, sessionmaker=sessionmaker, engine=engine)


class FairgpuApp(FastAPI):
    """FastAPI, with the direct routes (api/direct.py) tried before routing when they are on."""

    direct: DirectRoutes | None = None
    admission: Admission | None = None
    auth_failures: AuthFailures | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            self.auth_failures is not None
            and scope["type"] in ("http", "websocket")
            and has_bearer(scope)
        ):
            address = client_address(scope, self.auth_failures.proxies)
            refused_for_s = self.auth_failures.refused_for_s(address)
            cache: AuthCache = self.state.auth_cache
            if refused_for_s > 0 and not cache.vouched(bearer_digest(scope)):
                await refuse_address(scope, receive, send, refused_for_s)
                return
            send = self.auth_failures.watch(address, send, cache, scope)
        if scope["type"] == "http" and self.admission is not None:
            maker = getattr(self.state, "sessionmaker", None)
            if not await self.admission.admit(scope, send, maker):
                return
        if (
            scope["type"] == "websocket"
            and self.admission is not None
            and not await self.admission.admit_websocket(scope, receive, send)
        ):
            return
        if self.direct is not None and scope["type"] == "http":
            handler = self.direct.route(scope)
            if handler is not None:
                await self._direct(handler, scope, receive, send)
                return
        await super().__call__(scope, receive, send)

    async def ordinary(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The request through FastAPI's middleware, routing and exception handlers."""
        await super().__call__(scope, receive, send)

    async def _direct(self, handler: Handler, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watched(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await handler(scope, receive, watched)
        except Exception:
            if started:
                raise  # the ordinary route's error middleware has answered and logged it
            log.exception("unhandled error on %s %s", scope["method"], scope["path"])
            await send_problem(send, 500, "internal error; it has been logged", scope["path"])


def create_app(
    settings: Settings | None = None,
    *,
    runtime_factory: RuntimeFactory | None = None,
    freeze_heap: bool = False,
) -> FairgpuApp:
    """The whole server. Nothing touches the database until the lifespan starts.

    `freeze_heap` is for a server process of its own (`fairgpu server`): not for tests and
    embedders, which create many apps in one process.
    """
    settings = settings or Settings()
    make_runtime = runtime_factory or _default_runtime

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        engine = make_server_engine(settings)
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
            app.state.streams = hub = StreamHub(sessionmaker, relay_url=settings.server_relay_url)
            carry_streams = getattr(runtime, "carry_streams", None)
            if carry_streams is not None:  # a test's runtime may not
                carry_streams(hub)
            heartbeats = Heartbeats(
                settings,
                sessionmaker,
                app.state.autocommit_sessionmaker,
                runtime,
                streams=app.state.streams,
            )
            app.state.heartbeats = heartbeats
            async with (
                _direct_routes(app, settings, engine, heartbeats),
                relay_listener(hub, settings.port),
            ):
                await runtime.start()
                await hub.start()
                if freeze_heap:
                    # What start-up built lives as long as the process: keep it out of every
                    # full garbage collection, each of which would otherwise scan it all while
                    # requests wait (about 100 ms per collection in a server process).
                    gc.collect()
                    gc.freeze()
                    # Buffered heartbeat samples live about a second: long enough to reach the
                    # oldest generation, whose growth by a quarter triggers a full collection
                    # (50–140 ms with requests waiting), in a busy worker almost every second.
                    # Full collections are considered after FULL_COLLECTION_EVERY young ones
                    # rather than 10; young cycles are still collected as before.
                    young, middle, _ = gc.get_threshold()
                    gc.set_threshold(young, middle, FULL_COLLECTION_EVERY)
                try:
                    yield
                finally:
                    await hub.stop()
                    await runtime.stop()
        finally:
            await engine.dispose()

    app = FairgpuApp(
        title="fairgpu",
        summary="Fair-share GPU scheduler for shared GPU data centres.",
        version="0.1.0",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.auth_cache = AuthCache(settings.auth_cache_ttl_s)
    app.state.submit_limits = SubmitLimits.of(settings)
    app.admission = Admission(settings)
    app.auth_failures = AuthFailures(
        settings.auth_failure_rate_per_s,
        settings.auth_failure_burst,
        parse_proxies(settings.trusted_proxies),
    )
    app.state.stream_limits = StreamLimits(settings)
    install_problem_handlers(app)
    app.add_middleware(BodySizeLimit)
    for module in (
        health,
        jobs,
        orgs,
        users,
        tokens,
        nodes,
        usage,
        agent,
        metrics,
        streams,
        forward,
    ):
        app.include_router(module.router)
    return app


def create_server_app(settings: Settings) -> FairgpuApp:
    """uvicorn's factory for `fairgpu server`, bound to the parent's settings (cli/server.py):
    each HTTP worker process receives them pickled with uvicorn's config."""
    return create_app(settings, freeze_heap=True)
