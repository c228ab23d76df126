"""The per-job bound on events a tenant can repeat at will (an attach, a forwarded
connection, a hold, a release, an update of a pending job): the first `max_per_kind` of a kind
are stored one by one, every later one is folded into a single counted row, so that a loop of
connections or of hold/release cannot fill the shared database with event rows, and `describe`
still tells how many there were, the first and the last.

Services take a session and never commit (the caller owns the transaction).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, func, insert, select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Event, Job
from scheduler.db.types import utcnow

MORE_SUFFIX = ".more"
"""The kind of a folded row: `job.forward.more` counts the `job.forward` events past the bound."""
CHUNK = 1_000  # job ids per statement (an array's 10,000 elements take ten)
_EVENTS: Table = Event.__table__  # type: ignore[assignment]


def more_kind(kind: str) -> str:
    return kind + MORE_SUFFIX


async def record_job_event(
    session: AsyncSession, event: dict[str, Any], *, max_per_kind: int
) -> None:
    """Store one event of a job (`event`: its columns), or count it in its kind's folded row
    once the job has `max_per_kind` of that kind already.

    The job's row is locked first, as every opening of a stream into it does
    (scheduler/services/streamrows.py: job, then user, then org), so that two recordings for one
    job count in turn and the folded row is created once; on SQLite the database's single writer
    does the same.
    """
    await session.execute(
        select(Job.id).where(Job.id == event["job_id"]).with_for_update(key_share=True)
    )  # FOR NO KEY UPDATE: see streamrows._queue_behind
    await record_job_events(session, [event], max_per_kind=max_per_kind)


async def record_job_events(
    session: AsyncSession, events: Sequence[dict[str, Any]], *, max_per_kind: int
) -> None:
    """Store events of jobs (one per job and kind; the caller has locked the jobs' rows, as
    an UPDATE of them does), folding those of jobs that have `max_per_kind` of the kind."""
    for kind in sorted({e["kind"] for e in events}):
        of_kind = [{"at": utcnow(), **e} for e in events if e["kind"] == kind]
        full: set[int] = set()
        for start in range(0, len(of_kind), CHUNK):
            ids = [e["job_id"] for e in of_kind[start : start + CHUNK]]
            full |= await _full(session, kind, ids, max_per_kind)
        stored = [e for e in of_kind if e["job_id"] not in full]
        if stored:
            await session.execute(insert(_EVENTS), stored)
        folded = [e for e in of_kind if e["job_id"] in full]
        for start in range(0, len(folded), CHUNK):
            await _fold(session, kind, folded[start : start + CHUNK])


async def _full(session: AsyncSession, kind: str, job_ids: list[int], cap: int) -> set[int]:
    """The jobs among `job_ids` that have `cap` events of `kind` (or a folded row already)."""
    folded = select(Event.job_id).where(Event.job_id.in_(job_ids), Event.kind == more_kind(kind))
    counted = (
        select(Event.job_id)
        .where(Event.job_id.in_(job_ids), Event.kind == kind)
        .group_by(Event.job_id)
        .having(func.count() >= cap)
    )
    return {int(j) for j in await session.scalars(folded.union(counted)) if j is not None}


async def _fold(session: AsyncSession, kind: str, events: list[dict[str, Any]]) -> None:
    """Count each event in its job's folded row (made by the first event past the bound)."""
    rows = {
        row.job_id: row
        for row in await session.scalars(
            select(Event).where(
                Event.job_id.in_([e["job_id"] for e in events]), Event.kind == more_kind(kind)
            )
        )
    }
    for event in events:
        row = rows.get(event["job_id"])
        if row is None:
            row = rows[event["job_id"]] = Event(
                kind=more_kind(kind), job_id=event["job_id"], details={}
            )
            session.add(row)
        before: dict[str, Any] = row.details or {}
        count = int(before.get("count", 0)) + 1
        at: datetime = event["at"]
        first = str(before.get("first_at") or at.isoformat())
        what = "event" if count == 1 else "events"
        row.at, row.actor = at, event["actor"]
        row.org_id, row.node_id = event.get("org_id"), event.get("node_id")
        row.reason = (
            f"{count} more {kind} {what} not stored one by one, from "
            f"{datetime.fromisoformat(first).isoformat(timespec='seconds')}; "
            f"the last: {event.get('reason') or '-'}"
        )[:1024]
        row.details = {
            "count": count,
            "first_at": first,
            "last_at": at.isoformat(),
            "last": event.get("details") or {},
        }
