"""Who may forward a port of which task of a job, and the forward event (docs/INTERACTIVE.md).

The same people as for a terminal (scheduler/services/interactive.py): the job's owner, an
org-admin of its org or a platform admin; a member who is not the owner gets 403, anybody else
404. Any running task of any running job may be forwarded to, on a node whose agent can.
"""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Event
from scheduler.services.arrays import get_job_ref
from scheduler.services.errors import Conflict
from scheduler.services.interactive import AttachTarget, record_stream_event, task_target
from scheduler.services.jobactions import check_may_act

FORWARD_EVENT = "job.forward"


async def forward_target(
    session: AsyncSession,
    job_ref: str,
    *,
    rank: int,
    user_id: int,
    scope_org_id: int | None,
    may_admin_org: Callable[[int], bool],
) -> AttachTarget:
    """The running task of rank `rank` of the job, if the caller may forward to it."""
    job = await get_job_ref(session, job_ref, scope_org_id=scope_org_id)
    check_may_act(job, user_id=user_id, may_admin_org=may_admin_org(job.org_id))
    if job.state is not JobState.RUNNING:
        raise Conflict(f"job {job.id} is {job.state.value}: only a running job's ports forward")
    return await task_target(
        session,
        job,
        rank,
        capability="port-forward",
        lacking="cannot forward ports (older than `port-forward`)",
    )


async def record_forward(
    session: AsyncSession,
    target: AttachTarget,
    *,
    actor: str,
    port: int,
    max_events: int,
    forward_session: str | None = None,
) -> int | None:
    """One event per forward session (a `fairgpu port-forward` run, `forward_session`: the
    CLI's random id for it), not per connection: a session that opens thousands of connections
    writes one row, whose details count its connections and bytes as they end
    (`count_connection`). The id of that event, for the caller to count this connection in;
    None when there is none to count in (a client that names no session gets an event per
    connection, as before; past the job's bound they are folded into one counted row)."""
    if forward_session is None:
        await record_stream_event(
            session,
            target,
            kind=FORWARD_EVENT,
            actor=actor,
            reason=f"forwarded a connection to port {port} of rank {target.rank}",
            details={"rank": target.rank, "port": port},
            max_events=max_events,
        )
        return None
    key = session_key(forward_session)
    found = await _session_event(session, target, actor=actor, key=key, max_events=max_events)
    if found is not None:
        return found
    await record_stream_event(
        session,
        target,
        kind=FORWARD_EVENT,
        actor=actor,
        reason=f"started forwarding port {port} of rank {target.rank}",
        details={
            "rank": target.rank,
            "port": port,
            "session": key,
            **dict.fromkeys(SESSION_COUNTS, 0),
        },
        max_events=max_events,
    )
    # Stored, or folded into the job's counted row past its bound (then there is none).
    return await _session_event(session, target, actor=actor, key=key, max_events=max_events)


async def _session_event(
    session: AsyncSession, target: AttachTarget, *, actor: str, key: int, max_events: int
) -> int | None:
    """The id of `actor`'s event of forward session `key` on the job, if it has one: among
    their latest `max_events` (a job stores no more of a kind one by one)."""
    for event in await session.scalars(
        select(Event)
        .where(Event.job_id == target.job_id, Event.kind == FORWARD_EVENT, Event.actor == actor)
        .order_by(Event.id.desc())
        .limit(max_events)
    ):
        if (event.details or {}).get("session") == key:
            return event.id
    return None


SESSION_COUNTS = ("connections", "bytes_to_job", "bytes_from_job")
"""What a forward session's event counts, updated as each of its connections ends."""


def session_key(forward_session: str) -> int:
    """The CLI's session id (16 hex digits) as the integer the event's details keep."""
    return int(forward_session[:15], 16)


async def count_connection(
    session: AsyncSession, *, event_id: int, bytes_to_job: int, bytes_from_job: int
) -> None:
    """A connection of a forward session has ended: its session's event counts it. The row is
    locked (PostgreSQL; SQLite has one writer), so connections ending at once in several server
    processes all count."""
    event = await session.scalar(select(Event).where(Event.id == event_id).with_for_update())
    if event is None:  # purged meanwhile (the job's details outlived their retention)
        return
    details = dict(event.details or {})
    added = {"connections": 1, "bytes_to_job": bytes_to_job, "bytes_from_job": bytes_from_job}
    for name, value in added.items():
        details[name] = int(details.get(name, 0)) + value
    event.details = details
