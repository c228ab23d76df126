"""Job listings that carry what a queue view shows, so that a client needs one call per page.

A page is four queries whatever its size, never one per job: the ids of the page's jobs with
the size of their text; those jobs joined to their org and user names; the node names of the
jobs' latest attempts; their dependencies. The first pending reason comes from
`jobs.pending_reasons`, which every scheduling cycle writes.
Visibility is `scope_org_id`, as in `scheduler/services/jobqueries.py`: None sees every org.

A page also stops at `MAX_PAGE_TEXT_BYTES` of its jobs' commands and environments as JSON: a
job may carry 128 KiB of them, six times that once control characters are escaped, so 500 jobs
made one answer of 390 MB (and about 900 MB of the server's memory, 10 s of its CPU) for any
member to ask for as often as they liked. The cursor carries on where the page stopped.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, Row, Text, and_, cast, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Job, Org, Task, User
from scheduler.db import Node as NodeRow
from scheduler.services import holds
from scheduler.services.jobqueries import dependencies_of

MAX_REASON_MESSAGE_CHARS = 200
MAX_PAGE_TEXT_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class TimeWindow:
    """Bounds on submit and end times: `since` inclusive, `until` exclusive, all UTC-aware."""

    submitted_since: datetime | None = None
    submitted_until: datetime | None = None
    ended_since: datetime | None = None
    ended_until: datetime | None = None


@dataclass(frozen=True, slots=True)
class ListedJob:
    job: Job
    org_name: str
    user_name: str
    node_names: list[str] = field(default_factory=list)
    """Where the latest attempt runs or ran, by node rank; empty while pending."""
    depends_on: list[int] = field(default_factory=list)


def first_reason(job: Job) -> tuple[str, str] | None:
    """(code, short message) of the first reason a pending job waits, as the last cycle saw it.

    A held job waits for its release, whatever the last cycle saw (`JobHeldUser` or
    `JobHeldAdmin`, with who held it and why); any other job not yet looked at has no reason
    yet (None, Slurm's `(None)`).
    """
    if job.state is not JobState.PENDING:
        return None
    held = holds.hold_reason(job)
    if held is not None:  # as it is now: a cycle may not have seen the hold (or the release)
        return _clip(held["code"], held["message"])
    reasons: list[dict[str, Any]] = job.pending_reasons or []
    if reasons:
        first = reasons[0]
        return _clip(str(first.get("code", "")), str(first.get("message", "")))
    return None


def _clip(code: str, message: str) -> tuple[str, str]:
    if len(message) > MAX_REASON_MESSAGE_CHARS:
        message = message[: MAX_REASON_MESSAGE_CHARS - 1] + "…"
    return code, message


async def list_jobs(
    session: AsyncSession,
    *,
    scope_org_id: int | None,
    org_id: int | None = None,
    user_id: int | None = None,
    states: Sequence[JobState] = (),
    window: TimeWindow = TimeWindow(),
    before_id: int | None = None,
    limit: int = 100,
    max_text_bytes: int = MAX_PAGE_TEXT_BYTES,
) -> tuple[list[ListedJob], bool]:
    """Newest first. Returns (jobs, more): `more` says a next page exists. The page holds at
    least one job, and no more than fit in `max_text_bytes` of commands and environments."""
    stmt = select(Job.id, _text_bytes().label("text_bytes"))
    if scope_org_id is not None:
        stmt = stmt.where(Job.org_id == scope_org_id)
    if org_id is not None:
        stmt = stmt.where(Job.org_id == org_id)
    if user_id is not None:
        stmt = stmt.where(Job.user_id == user_id)
    if states:
        stmt = stmt.where(Job.state.in_(list(states)))
    if window.submitted_since is not None:
        stmt = stmt.where(Job.submitted_at >= window.submitted_since)
    if window.submitted_until is not None:
        stmt = stmt.where(Job.submitted_at < window.submitted_until)
    if window.ended_since is not None:
        stmt = stmt.where(Job.ended_at >= window.ended_since)
    if window.ended_until is not None:
        stmt = stmt.where(Job.ended_at < window.ended_until)
    if before_id is not None:
        stmt = stmt.where(Job.id < before_id)
    sized = (await session.execute(stmt.order_by(Job.id.desc()).limit(limit + 1))).all()
    more = len(sized) > limit
    sized = sized[:limit]
    kept = _within(sized, max_text_bytes)
    more = more or kept < len(sized)
    wanted = [job_id for job_id, _ in sized[:kept]]
    rows = (
        await session.execute(
            select(Job, Org.name, User.name)
            .join(Org, Org.id == Job.org_id)
            .join(User, User.id == Job.user_id)
            .where(Job.id.in_(wanted))
            .order_by(Job.id.desc())
        )
    ).all()
    ids = [job.id for job, _, _ in rows]
    placed = [job.id for job, _, _ in rows if job.state is not JobState.PENDING]
    nodes = await node_names_of(session, placed)
    deps = await dependencies_of(session, ids)
    listed = [
        ListedJob(
            job=job,
            org_name=org_name,
            user_name=user_name,
            node_names=nodes.get(job.id, []),
            depends_on=deps.get(job.id, []),
        )
        for job, org_name, user_name in rows
    ]
    return listed, more


def _text_bytes() -> ColumnElement[int]:
    """A job's command and environment as stored (JSON text, control characters escaped)."""
    return func.length(cast(Job.command, Text)) + func.coalesce(func.length(cast(Job.env, Text)), 0)


def _within(sized: Sequence[Row[int, int]], max_bytes: int) -> int:
    """How many of the jobs, from the first, fit in `max_bytes` of text; at least one."""
    total = 0
    for n, (_, text_bytes) in enumerate(sized):
        total += int(text_bytes or 0)
        if total > max_bytes and n > 0:
            return n
    return len(sized)


async def get_listed(session: AsyncSession, job: Job) -> ListedJob:
    """One job as a listing shows it (for the replies that return a single job)."""
    org_name = select(Org.name).where(Org.id == job.org_id).scalar_subquery()
    user_name = select(User.name).where(User.id == job.user_id).scalar_subquery()
    names = (await session.execute(select(org_name, user_name))).one()
    placed = [] if job.state is JobState.PENDING else [job.id]
    nodes = await node_names_of(session, placed)
    deps = await dependencies_of(session, [job.id])
    return ListedJob(
        job=job,
        org_name=names[0],
        user_name=names[1],
        node_names=nodes.get(job.id, []),
        depends_on=deps.get(job.id, []),
    )


async def node_names_of(session: AsyncSession, job_ids: Sequence[int]) -> dict[int, list[str]]:
    """Node names of each job's latest attempt, by node rank: one query for all the jobs."""
    if not job_ids:
        return {}
    latest = (
        select(Task.job_id, func.max(Task.attempt).label("attempt"))
        .where(Task.job_id.in_(list(job_ids)))
        .group_by(Task.job_id)
        .subquery()
    )
    rows = await session.execute(
        select(Task.job_id, NodeRow.name)
        .join(latest, and_(latest.c.job_id == Task.job_id, latest.c.attempt == Task.attempt))
        .join(NodeRow, NodeRow.id == Task.node_id)
        .order_by(Task.job_id, Task.node_rank)
    )
    out: dict[int, list[str]] = {}
    for job_id, name in rows:
        out.setdefault(job_id, []).append(name)
    return out
