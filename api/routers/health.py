"""Liveness and readiness probes; no token needed (load balancers and Kubernetes call them)."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.problems import RETRY_AFTER_S, problem
from scheduler.db.migrate import head_revisions

router = APIRouter(tags=["health"])
log = logging.getLogger("fairgpu.api")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving. Says nothing about the database (see /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> dict[str, Any] | JSONResponse:
    """Ready for traffic: the database answers and is migrated to the revision the code expects."""
    engine: AsyncEngine = request.app.state.engine
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except Exception as exc:  # any failure here means "not ready", whatever the driver raised
        # Anyone may call this probe: the reason goes to the log, not to the caller.
        log.warning("readyz: database unreachable: %s", exc)
        return problem(request, 503, "database unreachable", headers=headers)
    current = {r[0] for r in rows}
    expected = set(head_revisions())
    if current != expected:
        return problem(
            request,
            503,
            f"database at revision {sorted(current) or '(none)'}, code expects {sorted(expected)}",
            headers=headers,
        )
    runtime = getattr(request.app.state, "runtime", None)
    confirm = getattr(runtime, "confirm_leader", None)
    if confirm is not None:
        leader = bool(await confirm())
    else:
        leader = bool(getattr(runtime, "is_leader", False))
    return {"status": "ready", "revision": sorted(current), "scheduler_leader": leader}
