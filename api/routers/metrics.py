"""`/metrics`: Prometheus exposition of the scheduler and the cluster (FAIRGPU_METRICS_TOKEN,
when set, is the bearer token it asks for; user tokens never open it).

The cluster's gauges are a few aggregate queries. Scrapes that arrive while a read is under
way share it: without a metrics token anyone may scrape, and each concurrent scrape held a
connection of the pool every tenant's requests share (20 at once took them all, for as long as
the client kept asking). A process now reads the cluster once at a time.
"""

from __future__ import annotations

import asyncio
import hmac

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from api.deps import parse_bearer
from scheduler.metrics import ClusterStats, read_cluster, render
from scheduler.services.errors import Unauthenticated
from scheduler.services.runtime import SchedulerRuntime

router = APIRouter(tags=["metrics"])


@router.get("/metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    """Scheduler instruments of this replica plus cluster gauges read now with a few queries
    (shared with the scrapes that arrive while they run)."""
    expected = request.app.state.settings.metrics_token
    if expected is not None:
        given = parse_bearer(request.headers.get("authorization", "")) or ""
        if not hmac.compare_digest(given.encode(), expected.get_secret_value().encode()):
            raise Unauthenticated("/metrics needs the metrics token (FAIRGPU_METRICS_TOKEN)")
    runtime: SchedulerRuntime = request.app.state.runtime
    stats = await _shared_read(request.app)
    return Response(content=render(runtime.metrics, stats), media_type=CONTENT_TYPE_LATEST)


async def _shared_read(app: FastAPI) -> ClusterStats:
    """The read under way, or a new one; a scrape that goes away does not cancel it."""
    under_way: asyncio.Task[ClusterStats] | None = getattr(app.state, "metrics_read", None)
    if under_way is None or under_way.done():
        under_way = asyncio.create_task(_read(app), name="fairgpu-metrics-read")
        app.state.metrics_read = under_way
    return await asyncio.shield(under_way)


async def _read(app: FastAPI) -> ClusterStats:
    async with app.state.sessionmaker() as session:
        return await read_cluster(session, app.state.settings.policy.to_policy_config())
