"""`/metrics`: Prometheus exposition of the scheduler and the cluster (no token needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import SessionDep
from scheduler.metrics import read_cluster, render
from scheduler.services.runtime import SchedulerRuntime
from scheduler.services.scheduling.load import policy_config

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, session: SessionDep) -> Response:
    """Scheduler instruments of this replica plus cluster gauges read now with a few queries."""
    runtime: SchedulerRuntime = request.app.state.runtime
    stats = await read_cluster(session, policy_config(request.app.state.settings))
    await session.rollback()
    return Response(content=render(runtime.metrics, stats), media_type=CONTENT_TYPE_LATEST)
