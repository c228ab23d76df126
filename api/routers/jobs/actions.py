"""A job's owner or admin changes it: update, cancel, hold and release."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Request

from api.deps import Principal, SessionDep, UserPrincipal
from api.routers.jobs.view import JobRef, notify, read_public, scope_of
from api.schemas.jobs import CancelRequest, HoldRequest, JobPublic, JobUpdate
from scheduler.db import Job
from scheduler.services import arrays, holds, jobactions, jobupdate
from scheduler.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


@router.patch("/{job_id}")
async def update_job(
    request: Request, job_id: JobRef, body: JobUpdate, session: SessionDep, principal: UserPrincipal
) -> JobPublic:
    """Change a pending job's time limit, name or hold; an array's id (`42`) changes every
    pending task of the array. A member may only lower a time limit (403 otherwise); org and
    platform admins may raise it up to the server's maximum. A job that is not pending: 409."""
    job = await _job_to_change(session, job_id, principal)
    settings: Settings = request.app.state.settings
    await jobupdate.update_job(
        session,
        job,
        whole_array=arrays.names_array(job, job_id),
        time_limit_s=body.time_limit,
        name=body.name,
        hold=body.hold,
        may_admin=principal.can_admin_org(job.org_id),
        max_time_limit_s=settings.max_time_limit_s,
        interactive_max_time_s=settings.interactive_max_time_s,
        actor=principal.actor,
        max_events=settings.max_job_events_per_kind,
    )
    await session.commit()
    notify(request, "update")
    return await read_public(session, job, principal)


def _max_events(request: Request) -> int:
    settings: Settings = request.app.state.settings
    return settings.max_job_events_per_kind


async def _job_to_change(session: SessionDep, job_id: str, principal: Principal) -> Job:
    job = await arrays.get_job_ref(session, job_id, scope_org_id=scope_of(principal))
    assert principal.user_id is not None
    jobactions.check_may_act(
        job, user_id=principal.user_id, may_admin_org=principal.can_admin_org(job.org_id)
    )
    return job


@router.post("/{job_id}/cancel")
async def cancel_job(
    request: Request,
    job_id: JobRef,
    session: SessionDep,
    principal: UserPrincipal,
    body: Annotated[CancelRequest | None, Body()] = None,
) -> JobPublic:
    """Cancel: a pending job ends at once; a running one is stopped (SIGTERM, grace, SIGKILL)
    and becomes CANCELLED when its node reports the exit. A finished job answers 409.
    An array's id (`42`) cancels all its elements; `42_7` one of them."""
    job = await _job_to_change(session, job_id, principal)
    settings: Settings = request.app.state.settings
    cancel = arrays.cancel_array if arrays.names_array(job, job_id) else jobactions.cancel_job
    nodes = await cancel(
        session,
        job,
        actor=principal.actor,
        reason=body.reason if body else None,
        grace_s=settings.policy.preemption_grace_s,
    )
    await session.commit()
    notify(request, "cancel", nodes)
    return await read_public(session, job, principal)


@router.post("/{job_id}/hold")
async def hold_job(
    request: Request,
    job_id: JobRef,
    session: SessionDep,
    principal: UserPrincipal,
    body: Annotated[HoldRequest | None, Body()] = None,
) -> JobPublic:
    """Keep a pending job (every pending element of an array `42`) from starting until it is
    released. An org admin of the job's org or a platform admin places an admin hold (its
    owner cannot release it; `level: "user"` asks for a user hold instead), anybody else a
    user hold; a member asking for `level: "admin"` gets 403."""
    job = await _job_to_change(session, job_id, principal)
    await holds.change_hold(
        session,
        job,
        hold=True,
        whole_array=arrays.names_array(job, job_id),
        actor=principal.actor,
        may_admin=principal.can_admin_org(job.org_id),
        level=body.level if body else None,
        reason=body.reason if body else None,
        max_events=_max_events(request),
    )
    await session.commit()
    notify(request, "hold")
    return await read_public(session, job, principal)


@router.post("/{job_id}/release")
async def release_job(
    request: Request, job_id: JobRef, session: SessionDep, principal: UserPrincipal
) -> JobPublic:
    """Let a held job (every held element of an array `42`) be scheduled again. A member may
    release a user hold only: an admin hold is 403, naming who held it and why."""
    job = await _job_to_change(session, job_id, principal)
    await holds.change_hold(
        session,
        job,
        hold=False,
        whole_array=arrays.names_array(job, job_id),
        actor=principal.actor,
        may_admin=principal.can_admin_org(job.org_id),
        max_events=_max_events(request),
    )
    await session.commit()
    notify(request, "release")
    return await read_public(session, job, principal)
