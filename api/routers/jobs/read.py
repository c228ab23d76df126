"""`GET /v1/jobs` and `GET /v1/jobs/{job_id}`: the queue view and one job."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from fastapi import APIRouter, Query
from sqlalchemy import select

from api.deps import SessionDep, UserPrincipal
from api.routers.jobs.view import JobRef, hidden_for, listed_public, read_public, scope_of
from api.schemas.common import DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE
from api.schemas.jobs import JobPublic, JobsPublic
from protocol.states import JobState
from scheduler.db import Job, Org, User
from scheduler.services import arrays, dependencies
from scheduler.services.errors import InvalidInput, NotFound
from scheduler.services.joblist import TimeWindow
from scheduler.services.joblist import list_jobs as list_listed
from scheduler.services.users import find_user

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

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


async def _user_id(session: SessionDep, ref: str, *, org_id: int | None) -> int | None:
    """The id of the user `ref` names: a number is an id; a name is one of org `org_id`'s
    users (the caller's org, or the one `org` names), since names are unique per org only.
    With no org (a platform admin's whole view), the one user of that name anywhere, and a
    name that several orgs hold is refused: the caller names the org or the user's id."""
    if ref.isdigit():
        return _row_id(ref)
    if org_id is not None:
        found = await find_user(session, ref, org_id=org_id)
        return found.id if found is not None else None
    ids = (await session.scalars(select(User.id).where(User.name == ref).limit(2))).all()
    if len(ids) > 1:
        raise InvalidInput(
            f"more than one org has a user {ref!r}: give `org` as well, or the user's id"
        )
    return ids[0] if ids else None


@router.get("")
async def list_jobs(
    session: SessionDep,
    principal: UserPrincipal,
    state: Annotated[list[JobState], Query(max_length=16)] = [],  # noqa: B006
    org: Annotated[str | None, Query(max_length=63, description="Org name or id.")] = None,
    user: Annotated[
        str | None,
        Query(
            max_length=64,
            description="User id, or name: of the caller's org, or of `org`'s (names are "
            "unique per org; a platform admin naming a name two orgs hold gets 422).",
        ),
    ] = None,
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

    A page ends at `limit` jobs or at 8 MiB of their commands and environments, whichever
    comes first (at least one job); `next_cursor` goes on from there.
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
        user_id = await _user_id(session, user, org_id=org_id if org_id is not None else scope)
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
    hidden = await hidden_for(session, principal, [r.job for r in rows])
    data = [listed_public(r, hidden) for r in rows]
    return JobsPublic(
        data=data, count=len(data), next_cursor=str(rows[-1].job.id) if more and rows else None
    )


@router.get("/{job_id}")
async def get_job(job_id: JobRef, session: SessionDep, principal: UserPrincipal) -> JobPublic:
    """One job, with its batch script if it has one."""
    job = await arrays.get_job_ref(session, job_id, scope_org_id=scope_of(principal))
    public = await read_public(session, job, principal)
    public.script = await session.scalar(select(Job.script).where(Job.id == job.id))
    public.dependency = await dependencies.dependency_text(session, job)
    return public
