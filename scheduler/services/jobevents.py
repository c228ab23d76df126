"""The per-job bound on events a tenant can repeat at will (an attach, a forwarded
connection): the first `max_per_kind` of a kind are stored one by one, every later one is
folded into a single counted row, so that a loop of connections cannot fill the shared database
with event rows, and `describe` still tells how many there were, the first and the last.

Services take a session and never commit (the caller owns the transaction).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Event, Job
from scheduler.db.types import utcnow

MORE_SUFFIX = ".more"
"""The kind of a folded row: `job.forward.more` counts the `job.forward` events past the bound."""


def more_kind(kind: str) -> str:
    return kind + MORE_SUFFIX


async def record_job_event(session: AsyncSession, event: Event, *, max_per_kind: int) -> None:
    """Store `event` (of a job), or count it in its kind's folded row once the job has
    `max_per_kind` of that kind already.

    The job's row is locked first, as every opening of a stream into it does
    (scheduler/services/streamrows.py: job, then user, then org), so that two recordings for one
    job count in turn and the folded row is created once; on SQLite the database's single writer
    does the same.
    """
    assert event.job_id is not None, "a job event names its job"
    event.at = event.at or utcnow()
    await session.execute(select(Job.id).where(Job.id == event.job_id).with_for_update())
    stored = await session.scalar(
        select(func.count()).select_from(
            select(Event.id)
            .where(Event.job_id == event.job_id, Event.kind == event.kind)
            .limit(max_per_kind)
            .subquery()
        )
    )
    if int(stored or 0) < max_per_kind:
        session.add(event)
        return
    folded = await session.scalar(
        select(Event)
        .where(Event.job_id == event.job_id, Event.kind == more_kind(event.kind))
        .order_by(Event.id)
        .limit(1)
        .with_for_update()
    )
    if folded is None:
        session.add(_folded_row(event, count=1, first_at=event.at))
        return
    details: dict[str, Any] = folded.details or {}
    count = int(details.get("count", 0)) + 1
    first_at = datetime.fromisoformat(str(details.get("first_at") or event.at.isoformat()))
    fresh = _folded_row(event, count=count, first_at=first_at)
    folded.at, folded.actor, folded.node_id = fresh.at, fresh.actor, fresh.node_id
    folded.reason, folded.details = fresh.reason, fresh.details


def _folded_row(event: Event, *, count: int, first_at: datetime) -> Event:
    """The counted row: its time, actor and node are the last folded event's; its details
    keep the count, the first time and the last event's own details."""
    what = "event" if count == 1 else "events"
    return Event(
        at=event.at,
        kind=more_kind(event.kind),
        job_id=event.job_id,
        node_id=event.node_id,
        org_id=event.org_id,
        actor=event.actor,
        reason=(
            f"{count} more {event.kind} {what} not stored one by one, "
            f"from {first_at.isoformat(timespec='seconds')}; the last: {event.reason or '-'}"
        )[:1024],
        details={
            "count": count,
            "first_at": first_at.isoformat(),
            "last_at": event.at.isoformat(),
            "last": event.details or {},
        },
    )
