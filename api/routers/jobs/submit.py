"""`POST /v1/jobs`: a job or an array enters the queue, once per Idempotency-Key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Header, Request, Response
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from api.deps import AutocommitSessionDep, AutocommitUserPrincipal, Principal
from api.routers.jobs.view import job_public, notify
from api.schemas.jobs import MAX_IDEMPOTENCY_KEY_CHARS, JobCreate, JobPublic
from scheduler.db import Org
from scheduler.secretenv import settings_cipher
from scheduler.services import arrays, jobqueries, jobsubmit
from scheduler.services import orgs as orgs_svc
from scheduler.services.errors import Forbidden, InvalidInput, NotFound
from scheduler.settings import Settings

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


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
    spec = jobsubmit.JobSpec(
        **{**body.spec_fields(), **await _network(request, session, body, org_id)}
    )
    if body.array is not None:
        return await _submit_array(request, body.array, spec, org_id, principal, key)
    try:
        result = await jobsubmit.submit_job(
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
            await jobqueries.find_by_idempotency_key(session, principal.user_id, key)
            if key
            else None
        )
        if existing is None:
            raise
        result = jobsubmit.Submitted(existing, created=False)
    # Serialised once, straight to JSON: this is the hot path.
    if result.created:
        notify(request, "submit")
        public = job_public(result.job, spec.depends_on)
        return Response(public.model_dump_json(), status_code=201, media_type="application/json")
    deps = await jobqueries.dependencies_of(session, [result.job.id])
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
    spec: jobsubmit.JobSpec,
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
        admission.charge_submissions(
            request.headers.get("authorization", ""),
            len(tasks.task_ids),
            principal.user_id,
            principal.org_id,
        )
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
        deps = await jobqueries.dependencies_of(session, [result.job.id])
        public = job_public(result.job, deps.get(result.job.id))
    if result.created:
        notify(request, "submit")
    return Response(
        public.model_dump_json(),
        status_code=201 if result.created else 200,
        media_type="application/json",
    )
