"""`/metrics`: Prometheus exposition of the scheduler and the cluster (FAIRGPU_METRICS_TOKEN,
when set, is the bearer token it asks for; user tokens never open it)."""

from __future__ import annotations

import hmac

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import SessionDep, parse_bearer
from scheduler.metrics import read_cluster, render
from scheduler.services.errors import Unauthenticated
from scheduler.services.runtime import SchedulerRuntime

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request, session: SessionDep) -> Response:
    """Scheduler instruments of this replica plus cluster gauges read now with a few queries."""
    expected = request.app.state.settings.metrics_token
    if expected is not None:
        given = parse_bearer(request.headers.get("authorization", "")) or ""
        if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
            raise Unauthenticated("/metrics needs the metrics token (FAIRGPU_METRICS_TOKEN)")
    runtime: SchedulerRuntime = request.app.state.runtime
    stats = await read_cluster(session, request.app.state.settings.policy.to_policy_config())
    await session.rollback()
    return Response(content=render(runtime.metrics, stats), media_type=CONTENT_TYPE_LATEST)
