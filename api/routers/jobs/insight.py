"""Why a job waits, what it printed and what happened to it: explain, logs and events."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import Principal, SessionDep, UserPrincipal
from api.routers.jobs.view import JobRef, hidden_for, scope_of
from api.schemas.common import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from api.schemas.jobs import EventPublic, EventsPublic, JobExplain, JobLogs
from protocol.states import JobState
from scheduler.db import Job
from scheduler.services import arrays, dependencies, jobqueries
from scheduler.services.errors import InvalidInput
from scheduler.services.logs import MAX_LOG_RESPONSE_BYTES, LogSlice, read_log
from scheduler.services.redact import hidden_from, redact

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_FOLLOW_WAIT_S = 30.0
FOLLOW_POLL_S = 0.5


@router.get("/{job_id}/explain")
async def explain_job(job_id: JobRef, session: SessionDep, principal: UserPrincipal) -> JobExplain:
    """Why a job waits (Slurm's reason words, with numbers) and when it is expected to start,
    as the last scheduling cycle saw it."""
    job = await arrays.get_job_ref(session, job_id, scope_org_id=scope_of(principal))
    explained = jobqueries.explain(job)
    waits_on = await dependencies.unmet(session, job) if job.state is JobState.PENDING else {}
    for reason in explained["reasons"]:
        if reason["code"] in ("Dependency", "DependencyNeverSatisfied") and waits_on:
            listed = ", ".join(f"{dep} ({state})" for dep, state in waits_on.items())
            reason["message"] = f"{reason['message']}: {listed}"
            reason["details"] = {**reason["details"], **waits_on}
    hidden = await hidden_for(session, principal, [job])
    explained["reasons"] = redact(explained["reasons"], hidden)
    return JobExplain.model_validate(explained)


@router.get("/{job_id}/logs")
async def job_logs(
    request: Request,
    job_id: JobRef,
    session: SessionDep,
    principal: UserPrincipal,
    rank: Annotated[int, Query(ge=0, lt=512)] = 0,
    attempt: Annotated[int | None, Query(ge=0, le=10_000)] = None,
    offset: Annotated[int | None, Query(ge=0, lt=2**62)] = None,
    tail: Annotated[
        int | None, Query(ge=0, le=MAX_LOG_RESPONSE_BYTES, description="Bytes.")
    ] = None,
    max_bytes: Annotated[int, Query(ge=1, le=MAX_LOG_RESPONSE_BYTES)] = 256 * 1024,
    wait_s: Annotated[float, Query(ge=0, le=MAX_FOLLOW_WAIT_S)] = 0.0,
) -> JobLogs:
    """The output of the job's task at `rank` (latest attempt unless `attempt`), from byte
    `offset` or the last `tail` bytes. To follow, call again with `offset=next_offset`; with
    `wait_s` the call waits up to that long for new output (long poll) before answering; a
    user holds at most `max_log_follows_per_user` such waits at once, all users of an org
    `max_log_follows_per_org` (429 beyond)."""
    if offset is not None and tail is not None:
        raise InvalidInput("give offset or tail, not both")
    job = await arrays.get_job_ref(session, job_id, scope_org_id=scope_of(principal))
    kwargs: dict[str, Any] = {
        "rank": rank,
        "attempt": attempt,
        "offset": offset,
        "tail_bytes": tail,
        "max_bytes": max_bytes,
    }
    piece = await read_log(session, job, **kwargs)
    if wait_s > 0 and not piece.data and not piece.eof:
        assert principal.user_id is not None
        # Each waiting read polls the database: a user, and an org, hold a bounded number
        # at once (429).
        with _follow_slots(request, principal.user_id, principal.org_id):
            piece = await _wait_for_output(session, job, piece, kwargs, wait_s)
    return JobLogs(
        job_id=job.id,
        rank=rank,
        attempt=piece.attempt,
        task_id=piece.task_id,
        offset=piece.offset,
        next_offset=piece.next_offset,
        data=piece.data,
        eof=piece.eof,
    )


@contextlib.contextmanager
def _follow_slots(request: Request, user_id: int, org_id: int | None) -> Iterator[None]:
    """The user's place among its waiting reads, then its org's (none for a platform admin,
    who belongs to no org)."""
    admission = getattr(request.app, "admission", None)
    if admission is None:
        yield
        return
    with contextlib.ExitStack() as places:
        places.enter_context(admission.follows.slot(user_id))
        if org_id is not None:
            places.enter_context(admission.org_follows.slot(org_id))
        yield


async def _wait_for_output(
    session: AsyncSession, job: Job, piece: LogSlice, kwargs: dict[str, Any], wait_s: float
) -> LogSlice:
    deadline = time.monotonic() + wait_s
    while not piece.data and not piece.eof and time.monotonic() < deadline:
        await session.rollback()  # end the read transaction: no session held open while waiting
        await asyncio.sleep(min(FOLLOW_POLL_S, max(0.0, deadline - time.monotonic())))
        await session.refresh(job)
        kwargs["offset"], kwargs["tail_bytes"] = piece.offset, None
        piece = await read_log(session, job, **kwargs)
    return piece


@router.get("/{job_id}/events")
async def job_events(
    job_id: JobRef,
    session: SessionDep,
    principal: UserPrincipal,
    cursor: Annotated[str | None, Query(max_length=24, pattern=r"^\d+$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
) -> EventsPublic:
    """The job's history: every state change with who, when and why, oldest first."""
    job = await arrays.get_job_ref(session, job_id, scope_org_id=scope_of(principal))
    after = int(cursor) if cursor is not None and int(cursor) < 2**63 else None
    rows, more = await jobqueries.job_events(session, job.id, after_id=after, limit=limit)
    data = [EventPublic.model_validate(e) for e in rows]
    if not principal.is_platform_admin:
        data = await _redacted_events(session, principal, data)
    return EventsPublic(
        data=data, count=len(data), next_cursor=str(rows[-1].id) if more and rows else None
    )


async def _redacted_events(
    session: AsyncSession, principal: Principal, events: list[EventPublic]
) -> list[EventPublic]:
    """Events that name a job of another org (a preemptor) name it as such, without its id."""
    as_reasons = [{"message": e.reason or "", "details": e.details or {}} for e in events]
    hidden = await hidden_from(session, as_reasons, principal.org_id)
    if not hidden:
        return events
    return [
        event.model_copy(
            update={
                "reason": shown["message"] if event.reason is not None else None,
                "details": shown["details"] if event.details is not None else None,
            }
        )
        for event, shown in zip(events, redact(as_reasons, hidden), strict=True)
    ]
