"""Job detail retention: the events of jobs that ended longer ago than
`job_detail_retention_s`, and the batch script and secrets they kept, are deleted by the
scheduler leader in small batches (a short transaction each), never by a request.

What stays of a job that ran is what accounting and `fairgpu history` read: the job row (state,
exit code, times, GPUs), its tasks and allocations, and the usage ledger, until the job purge
(scheduler/services/jobpurge.py) takes the whole job after `job_purge_after_s`. In place of
its events each purged job keeps one `job.purged` row: how many were deleted, the first and the
last, so that `describe` says what happened to them. A job that never
started (cancelled while pending, say) has no task, allocation or ledger row: it is deleted
whole, unless another job still names it (a dependency, or the array it heads), so that a loop
of submit and cancel leaves nothing behind for ever (one still named when the pass goes by
waits for the job purge). Log chunks have their own, shorter retention
(scheduler/services/logretention.py).

How far the passes have got is kept in the database (`retention_cursors`), written with each
batch: a leader that restarts, or another that takes over, carries on from there. Walking again
from the first ended job, at a thousand jobs a minute, through the hundreds of days of jobs
whose details are gone already would keep every job that expired since (its secrets and script
included) for days past its retention, after each restart.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from scheduler.db import Event, Job, JobDependency, Task
from scheduler.db.types import utcnow
from scheduler.services.batches import Batch, Transactions
from scheduler.services.retentioncursors import load_cursor, save_cursor

PURGED_EVENT = "job.purged"
CURSOR = "job_details"  # its row in retention_cursors
ArrayElement = aliased(Job)
BATCH_JOBS = 200  # jobs looked at per transaction
BATCH_EVENTS = 2_000  # events deleted per transaction, however many of them one job has
MAX_BATCHES_PER_PASS = 5  # the rest waits for the next pass (a minute): a pass runs between
# cycles, and 5 transactions of 2,000 events took 0.9-2.2 s on PostgreSQL at load 8-12


@dataclass
class Purged:
    """What one pass removed: event rows, jobs whose script or secrets were cleared, and jobs
    that never started, deleted whole."""

    events: int = 0
    jobs: int = 0
    deleted_jobs: int = 0
    more: bool = False  # of one batch: its jobs have events left

    def add(self, other: Purged) -> None:
        self.events += other.events
        self.jobs += other.jobs
        self.deleted_jobs += other.deleted_jobs


async def ended_jobs(
    session: AsyncSession, *, ended_before: datetime, after: tuple[datetime, int] | None, limit: int
) -> Sequence[Any]:
    """(ended_at, id) of up to `limit` jobs that ended before `ended_before`, past `after` in
    that order (through `ix_jobs_ended_at`)."""
    stmt = select(Job.ended_at, Job.id).where(Job.ended_at < ended_before)
    if after is not None:
        at, job_id = after
        stmt = stmt.where(or_(Job.ended_at > at, and_(Job.ended_at == at, Job.id > job_id)))
    return (await session.execute(stmt.order_by(Job.ended_at, Job.id).limit(limit))).all()


async def purge_jobs(session: AsyncSession, job_ids: list[int], *, limit: int) -> Purged:
    """Delete up to `limit` events of `job_ids` (their `job.purged` rows aside), count them in
    each job's `job.purged` row, and clear the jobs' script and secrets; `more`: events are
    left."""
    found = (
        await session.execute(
            select(Event.id, Event.job_id, Event.at)
            .where(Event.job_id.in_(job_ids), Event.kind != PURGED_EVENT)
            .order_by(Event.id)
            .limit(limit + 1)
        )
    ).all()
    doomed = found[:limit]
    if doomed:
        await session.execute(delete(Event).where(Event.id.in_([row.id for row in doomed])))
        await _count_purged(session, doomed)
        await session.flush()  # before a delete of the jobs, which takes their new row along
    cleared = await session.execute(
        update(Job)
        .where(
            Job.id.in_(job_ids),
            or_(
                Job.script.is_not(None),
                Job.job_secret.is_not(None),
                Job.secret_env_ciphertext.is_not(None),
            ),
        )
        .values(script=None, job_secret=None, secret_env_ciphertext=None)
        .execution_options(synchronize_session=False)
    )
    jobs = int(cleared.rowcount or 0)  # type: ignore[attr-defined]
    return Purged(events=len(doomed), jobs=jobs, more=len(found) > limit)


async def delete_unstarted(session: AsyncSession, job_ids: list[int]) -> int:
    """Delete the jobs among `job_ids` that never had a task (so no allocation and no ledger
    row) and that no other job names: as its dependency, or as the head of its array."""
    dependent = select(JobDependency.job_id).where(JobDependency.depends_on_id == Job.id)
    task = select(Task.id).where(Task.job_id == Job.id)
    element = select(ArrayElement.id).where(
        ArrayElement.array_job_id == Job.id, ArrayElement.id != Job.id
    )
    result = await session.execute(
        delete(Job)
        .where(
            Job.id.in_(job_ids),
            Job.ended_at.is_not(None),
            ~task.exists(),
            ~dependent.exists(),
            ~element.exists(),
        )
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


async def _count_purged(session: AsyncSession, doomed: Sequence[Any]) -> None:
    """Add the deleted events to their jobs' `job.purged` rows (one per job, made at its
    first purge)."""
    spans: dict[int, tuple[int, datetime, datetime]] = {}
    for row in doomed:
        count, first, last = spans.get(row.job_id, (0, row.at, row.at))
        spans[row.job_id] = (count + 1, min(first, row.at), max(last, row.at))
    kept = {
        e.job_id: e
        for e in await session.scalars(
            select(Event).where(Event.job_id.in_(list(spans)), Event.kind == PURGED_EVENT)
        )
    }
    orgs = {
        row.id: row.org_id
        for row in await session.execute(select(Job.id, Job.org_id).where(Job.id.in_(list(spans))))
    }
    for job_id, (count, first, last) in spans.items():
        row = kept.get(job_id)
        if row is not None:
            old = row.details or {}
            count += int(old.get("count", 0))
            first = min(first, datetime.fromisoformat(str(old.get("first_at", first.isoformat()))))
            last = max(last, datetime.fromisoformat(str(old.get("last_at", last.isoformat()))))
        else:
            row = Event(kind=PURGED_EVENT, job_id=job_id, org_id=orgs.get(job_id))
            session.add(row)
        row.at, row.actor = utcnow(), "scheduler"
        row.reason = (
            f"{count} events from {first.isoformat(timespec='seconds')} to "
            f"{last.isoformat(timespec='seconds')} deleted by retention"
        )
        row.details = {"count": count, "first_at": first.isoformat(), "last_at": last.isoformat()}


@dataclass
class JobRetention:
    """One leader's passes; `done_through`: every job that ended up to it, in (ended_at, id)
    order, is purged already (read from the database by the first pass; None: none is)."""

    retention_s: float
    done_through: tuple[datetime, int] | None = None
    total: Purged = field(default_factory=Purged)
    loaded: bool = False

    async def run_pass(
        self, sessionmaker: async_sessionmaker[AsyncSession], now: datetime | None = None
    ) -> Purged:
        """Purge expired jobs, at most MAX_BATCHES_PER_PASS transactions; returns what went."""
        cutoff = (now or utcnow()) - timedelta(seconds=self.retention_s)
        purged = Purged()
        if not self.loaded:
            async with sessionmaker() as session:
                saved = await load_cursor(session, CURSOR)
            if saved is not None and saved[1] is not None:
                self.done_through = (saved[0], saved[1])
            self.loaded = True

        async def step(session: AsyncSession) -> Batch:
            jobs = await ended_jobs(
                session, ended_before=cutoff, after=self.done_through, limit=BATCH_JOBS
            )
            if not jobs:
                return Batch(more=False)
            ids = [j.id for j in jobs]
            batch = await purge_jobs(session, ids, limit=BATCH_EVENTS)
            if batch.more:  # events are left: the same jobs again
                purged.add(batch)
                return Batch(more=True)
            batch.deleted_jobs = await delete_unstarted(session, ids)
            purged.add(batch)
            last = (jobs[-1].ended_at, jobs[-1].id)
            await save_cursor(session, CURSOR, *last)
            return Batch(
                more=len(jobs) == BATCH_JOBS,
                committed=lambda: setattr(self, "done_through", last),
            )

        await Transactions(MAX_BATCHES_PER_PASS).run(sessionmaker, step)
        self.total.add(purged)
        return purged
