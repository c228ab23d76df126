"""Reading jobs: one job in the caller's scope, its dependencies, why it waits, its events.

Visibility is passed in as `scope_org_id` (None = every org, for platform admins), so that a job
of another org is simply not found: ids cannot be probed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Event, Job, JobDependency
from scheduler.services import holds
from scheduler.services.errors import NotFound


async def get_job(session: AsyncSession, job_id: int, *, scope_org_id: int | None) -> Job:
    """The job, if the caller may see it; NotFound otherwise (also for another org's job)."""
    if not 0 < job_id < 2**63:
        raise NotFound(f"job {job_id} not found")
    job = await session.get(Job, job_id)
    if job is None or (scope_org_id is not None and job.org_id != scope_org_id):
        raise NotFound(f"job {job_id} not found")
    return job


async def find_by_idempotency_key(session: AsyncSession, user_id: int, key: str) -> Job | None:
    return await session.scalar(
        select(Job).where(Job.user_id == user_id, Job.idempotency_key == key)
    )


async def dependencies_of(session: AsyncSession, job_ids: Sequence[int]) -> dict[int, list[int]]:
    if not job_ids:
        return {}
    rows = await session.execute(
        select(JobDependency.job_id, JobDependency.depends_on_id)
        .where(JobDependency.job_id.in_(job_ids))
        .order_by(JobDependency.depends_on_id)
    )
    out: dict[int, list[int]] = {}
    for job_id, dep in rows:
        out.setdefault(job_id, []).append(dep)
    return out


def explain(job: Job) -> dict[str, Any]:
    """Why the job waits and until when, as the last scheduling cycle saw it."""
    base: dict[str, Any] = {
        "job_id": job.id,
        "state": job.state,
        "held": job.held,
        "priority": job.priority,
        "reasons": [],
        "estimated_start_at": None,
        "evaluated": job.pending_reasons is not None,
    }
    if job.state is not JobState.PENDING:
        since = job.started_at if job.state.is_active else job.ended_at
        when = f" since {since.isoformat()}" if since else ""
        base["evaluated"] = True
        base["message"] = f"job is {job.state}{when}" + (
            f": {job.state_reason}" if job.state_reason else ""
        )
        return base
    held = holds.hold_reason(job)
    if job.pending_reasons is None:
        base["message"] = "pending; no scheduling cycle has looked at this job yet"
        if held is not None:
            base["reasons"] = [held]
        return base
    base["reasons"] = [
        {
            "code": str(r.get("code", "")),
            "message": str(r.get("message", "")),
            "details": dict(r.get("details") or {}),
        }
        for r in job.pending_reasons
    ]
    if held is not None:  # the hold as it is now, with who held it and why
        base["reasons"] = [held, *(r for r in base["reasons"] if r["code"] != held["code"])]
    base["estimated_start_at"] = job.estimated_start_at
    codes = ", ".join(r["code"] for r in base["reasons"]) or "none"
    base["message"] = f"pending ({codes})"
    return base


async def job_events(
    session: AsyncSession, job_id: int, *, after_id: int | None, limit: int
) -> tuple[list[Event], bool]:
    stmt = select(Event).where(Event.job_id == job_id)
    if after_id is not None:
        stmt = stmt.where(Event.id > after_id)
    rows = list((await session.scalars(stmt.order_by(Event.id).limit(limit + 1))).all())
    return rows[:limit], len(rows) > limit
