"""`/v1/jobs`: submit, list, inspect, cancel, hold and release jobs; explain, logs, events.

A job of another organisation answers 404, exactly like a job that does not exist.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, Header, Path, Query, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import (
    AutocommitSessionDep,
    AutocommitUserPrincipal,
    Principal,
    SessionDep,
    UserPrincipal,
)
from api.schemas.common import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from api.schemas.jobs import (
    MAX_IDEMPOTENCY_KEY_CHARS,
    CancelRequest,
    EventPublic,
    EventsPublic,
    HoldRequest,
    JobCreate,
    JobExplain,
    JobLogs,
    JobPublic,
    JobReason,
    JobsPublic,
    JobUpdate,
)
from protocol.states import JobState
from scheduler.db import Job, Org, User
from scheduler.secretenv import masked, settings_cipher
from scheduler.services import arrays, dependencies, holds, jobupdate
from scheduler.services import jobs as svc
from scheduler.services import orgs as orgs_svc
from scheduler.services.errors import Forbidden, InvalidInput, NotFound
from scheduler.services.joblist import ListedJob, TimeWindow, first_reason, get_listed
from scheduler.services.joblist import list_jobs as list_listed
from scheduler.services.logs import MAX_LOG_RESPONSE_BYTES, LogSlice, read_log
from scheduler.services.redact import hidden_from, redact, redact_text
from scheduler.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

MAX_FOLLOW_WAIT_S = 30.0
JobRef = Annotated[
    str,
    Path(
        pattern=r"^[0-9]{1,19}(_[0-9]{1,7})?$",
        description="A job id (`42`), or an array element: the array's id and the task id "
        "(`42_7`). Actions on an array's id apply to all its elements.",
    ),
]
FOLLOW_POLL_S = 0.5


def scope_of(principal: Principal) -> int | None:
    """The org a caller's view is limited to; None for platform admins. -1 sees nothing."""
    if principal.is_platform_admin:
        return None
    return principal.org_id if principal.org_id is not None else -1


def job_public(job: Job, depends_on: list[int] | None = None) -> JobPublic:
    return JobPublic(
        id=job.id,
        org_id=job.org_id,
        user_id=job.user_id,
        name=job.name,
        command=job.command,
        image=job.image,
        env=job.env,
        secret_env=masked(job.secret_env_ciphertext),
        workdir=job.workdir,
        gpus_per_node=job.gpus_per_node,
        nodes=job.num_nodes,
        memory_bytes=job.memory_bytes,
        gpu_type=job.gpu_type,
        site=job.site,
        time_limit_s=job.time_limit_s,
        priority_class=job.priority_class,
        preemptible=job.preemptible,
        requeue=job.requeue if job.requeue is not None else job.preemptible,
        signal=job.signal,
        held=job.held,
        hold_level=holds.level_of(job),
        held_by=job.held_by if job.held else None,
        hold_reason=job.hold_reason if job.held else None,
        interactive=job.interactive,
        network=job.network,
        state=job.state,
        state_reason=job.state_reason,
        exit_code=job.exit_code,
        requeue_count=job.requeue_count,
        submitted_at=job.submitted_at,
        started_at=job.started_at,
        ended_at=job.ended_at,
        estimated_start_at=job.estimated_start_at,
        depends_on=depends_on or [],
        array_job_id=job.array_job_id,
        array_task_id=job.array_task_id,
        array_limit=job.array_limit,
    )


def _listed_public(listed: ListedJob, hidden: set[int]) -> JobPublic:
    public = job_public(listed.job, listed.depends_on)
    public.org_name = listed.org_name
    public.user_name = listed.user_name
    public.node_names = listed.node_names
    reason = first_reason(listed.job)
    if reason:
        public.pending_reason = JobReason(code=reason[0], message=redact_text(reason[1], hidden))
    return public


async def _hidden(session: AsyncSession, principal: Principal, jobs: list[Job]) -> set[int]:
    """Jobs of other orgs that these jobs' reasons name: shown to members without their ids."""
    if principal.is_platform_admin:
        return set()
    reasons = [r for job in jobs for r in job.pending_reasons or []]
    return await hidden_from(session, reasons, principal.org_id)


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


async def _read_public(session: SessionDep, job: Job, principal: Principal) -> JobPublic:
    hidden = await _hidden(session, principal, [job])
    return _listed_public(await get_listed(session, job), hidden)


def _notify(request: Request, reason: str, nodes: list[int] | None = None) -> None:
    runtime = request.app.state.runtime
    if nodes:
        runtime.wake_nodes(nodes)
    runtime.notify(reason)


def checked_idempotency_key(value: str | None) -> str | None:
    if value is None:
        return None
    key = value.strip()
    if not key or len(key) > MAX_IDEMPOTENCY_KEY_CHARS or not key.isprintable():
        raise InvalidInput(
            f"Idempotency-Key must be 1..{MAX_IDEMPOTENCY_KEY_CHARS} printable characters"
        )
    return key


async def _submit_org(session: AsyncSession, principal: Principal, ref: str | None) -> int:
    """The org a submission goes to: the caller's own, or `ref` when the caller may submit
    there (its own org, by anyone in it; any org, by a platform admin)."""
    if ref is None:
        if principal.org_id is None:
            raise InvalidInput("jobs belong to an organisation, and this user has none: name one")
        return principal.org_id
    ref = ref.strip()
    if ref.isdigit():
        wanted = int(ref) if int(ref) < 2**31 else None
        found = await session.scalar(select(Org.id).where(Org.id == wanted)) if wanted else None
    else:
        found = await session.scalar(select(Org.id).where(Org.name == ref))
    if found is not None and found == principal.org_id:
        return found
    if not principal.is_platform_admin:
        raise Forbidden(
            f"you may submit only to your own organisation, not {ref!r} "
            "(submitting on behalf of another org needs a platform admin)"
        )
    if found is None:
        raise NotFound(f"org {ref!r} not found")
    return found


@router.post(
    "",
    status_code=201,
    response_model=JobPublic,
    responses={200: {"description": "Same Idempotency-Key: the job stored the first time"}},
)
async def submit_job(
    request: Request,
    body: JobCreate,
    session: AutocommitSessionDep,
    principal: AutocommitUserPrincipal,
    idempotency_key: Annotated[str | None, Header(alias="Idempotency-Key")] = None,
) -> Response:
    """Submit a job to the caller's organisation, or with `org` on behalf of another one
    (platform admins only; naming one's own org is always allowed).

    On PostgreSQL the job, its event and its dependencies are one atomic statement, run on an
    autocommit session: authentication plus that statement are the request's only round trips.

    With an `Idempotency-Key`, a retry of the same submission by the same user returns the job
    stored the first time, with status 200 instead of 201, and stores nothing new.
    """
    if principal.user_id is None:
        raise InvalidInput("jobs belong to a user")
    org_id = await _submit_org(session, principal, body.org)
    key = checked_idempotency_key(idempotency_key)
    spec = svc.JobSpec(**{**body.spec_fields(), **await _network(request, session, body, org_id)})
    if body.array is not None:
        return await _submit_array(request, body.array, spec, org_id, principal, key)
    try:
        result = await svc.submit_job(
            session,
            org_id=org_id,
            user_id=principal.user_id,
            actor=principal.actor,
            spec=spec,
            idempotency_key=key,
            **_server_limits(request),
        )
        await session.commit()
    except IntegrityError:
        # Two submissions with one key raced; the other one won. Return its job.
        await session.rollback()
        existing = (
            await svc.find_by_idempotency_key(session, principal.user_id, key) if key else None
        )
        if existing is None:
            raise
        result = svc.Submitted(existing, created=False)
    # Serialised once, straight to JSON: this is the hot path.
    if result.created:
        _notify(request, "submit")
        public = job_public(result.job, spec.depends_on)
        return Response(public.model_dump_json(), status_code=201, media_type="application/json")
    deps = await svc.dependencies_of(session, [result.job.id])
    public = job_public(result.job, deps.get(result.job.id))
    return Response(public.model_dump_json(), status_code=200, media_type="application/json")


async def _network(
    request: Request, session: AsyncSession, body: JobCreate, org_id: int
) -> dict[str, str]:
    """Under FAIRGPU_PRIVATE_NETWORK_REQUIRED, or for an org whose admin set
    `require_private_network` (on it or above it), a one-node job runs in a network of its own."""
    if body.nodes > 1 or body.network == "private":
        return {}
    settings: Settings = request.app.state.settings
    if settings.private_network_required:
        why = "this server runs every one-node job in a network of its own"
    elif await orgs_svc.private_network_required(session, org_id):
        why = (
            "org settings run every one-node job of this org in a network of its own "
            "(require_private_network)"
        )
    else:
        return {}
    if body.network == "host":
        raise InvalidInput(
            f"{why}: leave --network out or say private (gangs run in their nodes' network)"
        )
    return {"network": "private"}


def _server_limits(request: Request) -> dict[str, Any]:
    """What the server's settings say of every submission, single job or array."""
    settings: Settings = request.app.state.settings
    return {
        "default_time_limit_s": settings.default_time_limit_s,
        "max_time_limit_s": settings.max_time_limit_s,
        "max_preemption_grace_s": settings.policy.max_preemption_grace_s,
        "limits": request.app.state.submit_limits,
        "secret_cipher": settings_cipher(settings),
    }


async def _submit_array(
    request: Request,
    array: str,
    spec: svc.JobSpec,
    org_id: int,
    principal: Principal,
    key: str | None,
) -> Response:
    """An array's elements are several statements: a transaction of their own."""
    assert principal.user_id is not None
    tasks = arrays.parse_array(array)
    arrays.check_array_bytes(spec, len(tasks.task_ids))  # before it is charged: a 422 is free
    admission = getattr(request.app, "admission", None)
    if admission is not None:
        admission.charge_submissions(request.headers.get("authorization", ""), len(tasks.task_ids))
    async with request.app.state.sessionmaker() as session:
        result = await arrays.submit_array(
            session,
            org_id=org_id,
            user_id=principal.user_id,
            actor=principal.actor,
            spec=spec,
            array=tasks,
            idempotency_key=key,
            **_server_limits(request),
        )
        await session.commit()
        deps = await svc.dependencies_of(session, [result.job.id])
        public = job_public(result.job, deps.get(result.job.id))
    if result.created:
        _notify(request, "submit")
    return Response(
        public.model_dump_json(),
        status_code=201 if result.created else 200,
        media_type="application/json",
    )


_SINCE = "ISO-8601 with a timezone, e.g. 2026-01-01T00:00:00Z; inclusive."
_UNTIL = "ISO-8601 with a timezone; exclusive."


def _aware(name: str, value: datetime | None) -> datetime | None:
    if value is None:
        return None
    if value.tzinfo is None:
        raise InvalidInput(f"{name} needs a timezone (e.g. 2026-01-01T00:00:00Z)")
    return value.astimezone(UTC)


def _row_id(ref: str) -> int | None:
    """A number that can be a row's id (an int4 column): one beyond it names no row, and must
    not reach PostgreSQL, which refuses it (500)."""
    return int(ref) if ref.isdigit() and 0 < int(ref) < 2**31 else None


async def _org_id(session: SessionDep, ref: str) -> int | None:
    if ref.isdigit():
        return _row_id(ref)
    return await session.scalar(select(Org.id).where(Org.name == ref))


@router.get("")
async def list_jobs(
    session: SessionDep,
    principal: UserPrincipal,
    state: Annotated[list[JobState], Query(max_length=16)] = [],  # noqa: B006
    org: Annotated[str | None, Query(max_length=63, description="Org name or id.")] = None,
    user: Annotated[str | None, Query(max_length=64, description="User name or id.")] = None,
    mine: bool = False,
    submitted_since: Annotated[datetime | None, Query(description=_SINCE)] = None,
    submitted_until: Annotated[datetime | None, Query(description=_UNTIL)] = None,
    ended_since: Annotated[datetime | None, Query(description=_SINCE)] = None,
    ended_until: Annotated[datetime | None, Query(description=_UNTIL)] = None,
    cursor: Annotated[str | None, Query(max_length=24, pattern=r"^\d+$")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_PAGE_SIZE)] = DEFAULT_PAGE_SIZE,
) -> JobsPublic:
    """Jobs the caller may see, newest first; filter by state (repeatable), org, user, mine,
    and submit or end time (ISO-8601 with a timezone; `since` inclusive, `until` exclusive).

    Each job carries its org and user names, the nodes it runs on and the first reason it
    waits, so that a queue view needs one call per page (the full reasons: `explain`).
    """
    window = TimeWindow(
        submitted_since=_aware("submitted_since", submitted_since),
        submitted_until=_aware("submitted_until", submitted_until),
        ended_since=_aware("ended_since", ended_since),
        ended_until=_aware("ended_until", ended_until),
    )
    scope = scope_of(principal)
    org_id = user_id = None
    empty = JobsPublic(data=[], count=0, next_cursor=None)
    if org is not None:
        org_id = await _org_id(session, org)
        if org_id is None or (scope is not None and org_id != scope):
            raise NotFound(f"org {org!r} not found")
    if user is not None:
        user_id = (
            _row_id(user)
            if user.isdigit()
            else await session.scalar(select(User.id).where(User.name == user))
        )
        if user_id is None:
            return empty
    if mine:
        if user_id is not None and user_id != principal.user_id:
            return empty
        user_id = principal.user_id
    before = int(cursor) if cursor is not None else None
    if before is not None and before >= 2**63:
        before = None
    rows, more = await list_listed(
        session,
        scope_org_id=scope,
        org_id=org_id,
        user_id=user_id,
        states=state,
        window=window,
        before_id=before,
        limit=limit,
    )
    hidden = await _hidden(session, principal, [r.job for r in rows])
    data = [_listed_public(r, hidden) for r in rows]
    return JobsPublic(
        data=data, count=len(data), next_cursor=str(rows[-1].job.id) if more and rows else None
    )


@router.get("/{job_id}")
async def get_job(job_id: JobRef, session: SessionDep, principal: UserPrincipal) -> JobPublic:
    """One job, with its batch script if it has one."""
    job = await arrays.get_job_ref(session, job_id, scope_org_id=scope_of(principal))
    public = await _read_public(session, job, principal)
    public.script = await session.scalar(select(Job.script).where(Job.id == job.id))
    public.dependency = await dependencies.dependency_text(session, job)
    return public


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
    _notify(request, "update")
    return await _read_public(session, job, principal)


def _max_events(request: Request) -> int:
    settings: Settings = request.app.state.settings
    return settings.max_job_events_per_kind


async def _job_to_change(session: SessionDep, job_id: str, principal: Principal) -> Job:
    job = await arrays.get_job_ref(session, job_id, scope_org_id=scope_of(principal))
    assert principal.user_id is not None
    svc.check_may_act(
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
    cancel = arrays.cancel_array if arrays.names_array(job, job_id) else svc.cancel_job
    nodes = await cancel(
        session,
        job,
        actor=principal.actor,
        reason=body.reason if body else None,
        grace_s=settings.policy.preemption_grace_s,
    )
    await session.commit()
    _notify(request, "cancel", nodes)
    return await _read_public(session, job, principal)


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
    _notify(request, "hold")
    return await _read_public(session, job, principal)


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
    _notify(request, "release")
    return await _read_public(session, job, principal)


@router.get("/{job_id}/explain")
async def explain_job(job_id: JobRef, session: SessionDep, principal: UserPrincipal) -> JobExplain:
    """Why a job waits (Slurm's reason words, with numbers) and when it is expected to start,
    as the last scheduling cycle saw it."""
    job = await arrays.get_job_ref(session, job_id, scope_org_id=scope_of(principal))
    explained = svc.explain(job)
    waits_on = await dependencies.unmet(session, job) if job.state is JobState.PENDING else {}
    for reason in explained["reasons"]:
        if reason["code"] in ("Dependency", "DependencyNeverSatisfied") and waits_on:
            listed = ", ".join(f"{dep} ({state})" for dep, state in waits_on.items())
            reason["message"] = f"{reason['message']}: {listed}"
            reason["details"] = {**reason["details"], **waits_on}
    hidden = await _hidden(session, principal, [job])
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
    user holds at most `max_log_follows_per_user` such waits at once (429 beyond)."""
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
        admission = getattr(request.app, "admission", None)
        assert principal.user_id is not None
        # Each waiting read polls the database: a user holds a bounded number at once (429).
        with admission.follows.slot(principal.user_id) if admission else contextlib.nullcontext():
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
    rows, more = await svc.job_events(session, job.id, after_id=after, limit=limit)
    data = [EventPublic.model_validate(e) for e in rows]
    if not principal.is_platform_admin:
        data = await _redacted_events(session, principal, data)
    return EventsPublic(
        data=data, count=len(data), next_cursor=str(rows[-1].id) if more and rows else None
    )
