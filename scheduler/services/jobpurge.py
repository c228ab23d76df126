"""Job purge (Slurm's PurgeJobAfter with usage rollups): jobs that ended longer ago than
`job_purge_after_s` are deleted whole, with their tasks, allocations, ledger rows, events and
log chunks, by the scheduler leader in small batches, never by a request.

Before a batch of jobs goes, their ledger rows are summed per org, user, GPU type, hour and
preempted into `usage_rollup`, in the same transaction: usage reports read ledger plus rollup,
so their totals are the same before and after. Fair-share reads neither (it decays
`org_usage`), so a purge leaves it as it was. A job still named by a job that has not ended
(its dependency, or the head of an array with an element not ended) waits for them; what ended
names nothing any more, and its dependency rows go with it. Those that wait are looked at
again after the leader restarts (its cursor lives in memory, on purpose: a restart is what
looks at them again; jobs older than the purge are gone, so the walk is short).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import delete, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import aliased

from protocol.states import TERMINAL_STATES
from scheduler.db import Allocation, Job, JobDependency, LogChunk, Task, UsageRecord, UsageRollup
from scheduler.db.types import utcnow
from scheduler.services.batches import Batch, Transactions
from scheduler.services.jobretention import ended_jobs
from scheduler.services.logbudget import delete_chunks

Dependent = aliased(Job)
BATCH_JOBS = 50  # jobs per transaction: their ledger rows are read to be summed
MAX_BATCHES_PER_PASS = 5  # the rest waits for the next pass (a minute): it runs between cycles
SUMMED = ("gpu_seconds_allocated", "gpu_seconds_busy", "billed_gpu_seconds", "energy_joules")


async def purgeable(session: AsyncSession, job_ids: list[int]) -> list[int]:
    """The jobs among `job_ids` in a final state, holding no GPU (an allocation not ended, as
    after a node that never reported its task's end) and that no job still to end names (as
    a dependency, or as the head of its array)."""
    named_by_live = (
        select(JobDependency.job_id)
        .join(Dependent, Dependent.id == JobDependency.job_id)
        .where(JobDependency.depends_on_id == Job.id, Dependent.ended_at.is_(None))
    )
    live_element = select(Dependent.id).where(
        Dependent.array_job_id == Job.id, Dependent.id != Job.id, Dependent.ended_at.is_(None)
    )
    holds_gpu = select(Allocation.id).where(
        Allocation.job_id == Job.id, Allocation.ended_at.is_(None)
    )
    rows = await session.scalars(
        select(Job.id).where(
            Job.id.in_(job_ids),
            Job.ended_at.is_not(None),
            Job.state.in_(sorted(TERMINAL_STATES)),
            ~holds_gpu.exists(),
            ~named_by_live.exists(),
            ~live_element.exists(),
        )
    )
    return list(rows)


async def roll_up(session: AsyncSession, job_ids: list[int]) -> int:
    """Add the jobs' ledger rows to `usage_rollup`, per org, user, GPU type, hour and
    preempted; returns how many rollup rows were written."""
    keys = (
        UsageRecord.org_id,
        UsageRecord.user_id,
        UsageRecord.gpu_type,
        UsageRecord.period_start,
        UsageRecord.preempted,
    )
    sums = [func.sum(getattr(UsageRecord, name)).label(name) for name in SUMMED]
    rows = (
        await session.execute(
            select(*keys, *sums).where(UsageRecord.job_id.in_(job_ids)).group_by(*keys)
        )
    ).all()
    if not rows:
        return 0
    values = [row._asdict() for row in rows]
    insert: Any = (
        postgresql.insert(UsageRollup)
        if (await session.connection()).dialect.name == "postgresql"
        else sqlite.insert(UsageRollup)
    )
    stmt = insert.values(values)
    table = UsageRollup.__table__.c
    await session.execute(
        stmt.on_conflict_do_update(
            index_elements=[c.name for c in UsageRollup.__table__.primary_key],
            set_={name: table[name] + stmt.excluded[name] for name in SUMMED},
        )
    )
    return len(values)


async def purge_jobs(session: AsyncSession, job_ids: list[int]) -> int:
    """Roll up and delete the purgeable jobs among `job_ids` (the rest stay); returns how many
    were deleted. Everything of a job cascades from its row."""
    doomed = await purgeable(session, job_ids)
    if not doomed:
        return 0
    await roll_up(session, doomed)
    # Their chunks would go with the tasks' rows; deleted here, they leave the orgs' counters.
    tasks = select(Task.id).where(Task.job_id.in_(doomed))
    await delete_chunks(session, LogChunk.task_id.in_(tasks))
    await session.execute(delete(JobDependency).where(JobDependency.depends_on_id.in_(doomed)))
    result = await session.execute(
        delete(Job).where(Job.id.in_(doomed)).execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


@dataclass
class JobPurge:
    """One leader's passes; `done_through`: every job that ended up to it, in (ended_at, id)
    order, was looked at (None after a start: the first pass looks at them all once)."""

    purge_after_s: float
    done_through: tuple[datetime, int] | None = None

    async def run_pass(
        self, sessionmaker: async_sessionmaker[AsyncSession], now: datetime | None = None
    ) -> int:
        """Purge jobs past `purge_after_s`, at most MAX_BATCHES_PER_PASS transactions;
        returns how many jobs were deleted."""
        cutoff = (now or utcnow()) - timedelta(seconds=self.purge_after_s)
        deleted = 0

        async def step(session: AsyncSession) -> Batch:
            nonlocal deleted
            jobs = await ended_jobs(
                session, ended_before=cutoff, after=self.done_through, limit=BATCH_JOBS
            )
            if not jobs:
                return Batch(more=False)
            deleted += await purge_jobs(session, [j.id for j in jobs])
            last = (jobs[-1].ended_at, jobs[-1].id)
            return Batch(
                more=len(jobs) == BATCH_JOBS,
                committed=lambda: setattr(self, "done_through", last),
            )

        await Transactions(MAX_BATCHES_PER_PASS).run(sessionmaker, step)
        return deleted
