"""Liveness and readiness probes; no token needed (load balancers and Kubernetes call them)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from api.problems import RETRY_AFTER_S, problem
from api.shared import shared_call
from scheduler.db.migrate import head_revisions

router = APIRouter(tags=["health"])
log = logging.getLogger("fairgpu.api")


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up and serving. Says nothing about the database (see /readyz)."""
    return {"status": "ok"}


@router.get("/readyz", response_model=None)
async def readyz(request: Request) -> dict[str, Any] | JSONResponse:
    """Ready for traffic: the database answers and is migrated to the revision the code expects.

    Anyone may call it, without a token or a rate, and each check holds a connection of the
    pool every tenant shares: probes that arrive while a check runs share it (as scrapes of
    /metrics do), so a flood of them holds one connection, not one each."""
    headers = {"Retry-After": str(RETRY_AFTER_S)}
    found = await shared_call(request.app, "readyz_check", lambda: _check(request.app))
    if found.revisions is None:
        return problem(request, 503, "database unreachable", headers=headers)
    expected = sorted(head_revisions())
    if found.revisions != expected:
        return problem(
            request,
            503,
            f"database at revision {found.revisions or '(none)'}, code expects {expected}",
            headers=headers,
        )
    return {"status": "ready", "revision": found.revisions, "scheduler_leader": found.leader}


@dataclass(frozen=True)
class Readiness:
    revisions: list[str] | None  # None: the database did not answer
    leader: bool


async def _check(app: FastAPI) -> Readiness:
    engine: AsyncEngine = app.state.engine
    try:
        async with engine.connect() as conn:
            rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
    except Exception as exc:  # any failure here means "not ready", whatever the driver raised
        # Anyone may call this probe: the reason goes to the log, not to the caller.
        log.warning("readyz: database unreachable: %s", exc)
        return Readiness(revisions=None, leader=False)
    revisions = sorted({r[0] for r in rows})
    if revisions != sorted(head_revisions()):
        return Readiness(revisions=revisions, leader=False)
    runtime = getattr(app.state, "runtime", None)
    confirm = getattr(runtime, "confirm_leader", None)
    if confirm is not None:
        leader = bool(await confirm())
    else:
        leader = bool(getattr(runtime, "is_leader", False))
    return Readiness(revisions=revisions, leader=leader)
