"""Read the database and report every broken invariant of DESIGN.md, with the rows involved.

Run after fault tests, at the end of the soak, and by operators (`fairgpu db invariants`).
Read-only: it never repairs anything, it says what is wrong.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Allocation, Gpu, Job, Org, Quota, Task, UsageRecord

# Float GPU-seconds summed over hour buckets: allow rounding, not missing time.
LEDGER_TOLERANCE_S = 0.5


@dataclass
class InvariantReport:
    checked: dict[str, int] = field(default_factory=dict)  # what was looked at, by kind
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


async def _gpus_held_twice(session: AsyncSession, report: InvariantReport) -> None:
    rows = await session.execute(
        select(Allocation.gpu_id, func.count())
        .where(Allocation.ended_at.is_(None))
        .group_by(Allocation.gpu_id)
        .having(func.count() > 1)
    )
    for gpu_id, count in rows:
        report.violations.append(f"gpu {gpu_id} is held by {count} open allocations")


async def _jobs_consistent(session: AsyncSession, report: InvariantReport) -> None:
    """Every job is in a known state, and its open allocations agree with that state."""
    jobs = dict((await session.execute(select(Job.id, Job.state))).all())
    report.checked["jobs"] = len(jobs)
    open_by_job: dict[int, int] = defaultdict(int)
    for (job_id,) in await session.execute(
        select(Allocation.job_id).where(Allocation.ended_at.is_(None))
    ):
        open_by_job[job_id] += 1
    for job_id, count in open_by_job.items():
        state = jobs.get(job_id)
        if state is None:
            report.violations.append(f"{count} open allocation(s) of unknown job {job_id}")
        elif state.is_terminal or state is JobState.PENDING:
            report.violations.append(f"job {job_id} is {state} but holds {count} GPU(s)")
    active_tasks = dict(
        (
            await session.execute(
                select(Task.job_id, func.count())
                .where(Task.state.in_([JobState.STARTING, JobState.RUNNING]))
                .group_by(Task.job_id)
            )
        ).all()
    )
    for job_id, state in jobs.items():
        if state is JobState.RUNNING and not active_tasks.get(job_id):
            report.violations.append(f"job {job_id} is RUNNING with no active task")
    for job_id in active_tasks:
        if jobs.get(job_id) not in (JobState.STARTING, JobState.RUNNING):
            report.violations.append(f"job {job_id} is {jobs.get(job_id)} with active tasks")


async def _orgs_within_limits(session: AsyncSession, report: InvariantReport) -> None:
    """Open allocations of an org's whole subtree never exceed its limit for that GPU type."""
    parents = dict((await session.execute(select(Org.id, Org.parent_id))).all())
    held: dict[tuple[int, str], int] = defaultdict(int)
    rows = await session.execute(
        select(Allocation.org_id, Allocation.gpu_type, func.count())
        .where(Allocation.ended_at.is_(None))
        .group_by(Allocation.org_id, Allocation.gpu_type)
    )
    for org_id, gpu_type, count in rows:
        node: int | None = org_id
        while node is not None:  # charge the org and every ancestor
            held[(node, gpu_type)] += count
            node = parents.get(node)
    limits = await session.execute(
        select(Quota.org_id, Quota.gpu_type, Quota.limit).where(Quota.limit.is_not(None))
    )
    report.checked["quotas"] = 0
    for org_id, gpu_type, limit in limits:
        report.checked["quotas"] += 1
        if limit is not None and held[(org_id, gpu_type)] > limit:
            report.violations.append(
                f"org {org_id} holds {held[(org_id, gpu_type)]} {gpu_type} GPUs, limit {limit}"
            )


async def _ledger_matches_allocations(session: AsyncSession, report: InvariantReport) -> None:
    """For every closed allocation, the ledger's GPU-seconds equal its interval."""
    ledger = dict(
        (
            await session.execute(
                select(
                    UsageRecord.allocation_id, func.sum(UsageRecord.gpu_seconds_allocated)
                ).group_by(UsageRecord.allocation_id)
            )
        ).all()
    )
    closed = await session.execute(
        select(Allocation.id, Allocation.started_at, Allocation.ended_at).where(
            Allocation.ended_at.is_not(None)
        )
    )
    report.checked["closed_allocations"] = 0
    for alloc_id, started_at, ended_at in closed:
        report.checked["closed_allocations"] += 1
        if ended_at is None:  # filtered out above; keeps the type checker honest
            continue
        expected = max(0.0, (ended_at - started_at).total_seconds())
        got = float(ledger.get(alloc_id) or 0.0)
        if abs(got - expected) > LEDGER_TOLERANCE_S:
            report.violations.append(
                f"allocation {alloc_id}: ledger {got:.1f} GPU-s, interval {expected:.1f} s"
            )


async def _allocations_on_known_gpus(session: AsyncSession, report: InvariantReport) -> None:
    """Every open allocation holds a GPU that exists. A closed one may have lost its GPU
    (`gpu_id` NULL): its node was deleted, and the ledger keeps its `gpu_type`."""
    orphans = await session.scalar(
        select(func.count())
        .select_from(Allocation)
        .outerjoin(Gpu, Gpu.id == Allocation.gpu_id)
        .where(Gpu.id.is_(None), or_(Allocation.gpu_id.is_not(None), Allocation.ended_at.is_(None)))
    )
    if orphans:
        report.violations.append(f"{orphans} allocation(s) on GPUs that do not exist")


async def _gangs_whole(session: AsyncSession, report: InvariantReport) -> None:
    """A start is all or nothing: an active job has one task per node of its current attempt,
    each active task holds exactly `gpus_per_node` GPUs of its own node, and an ended task
    holds none. A half-applied cycle (a server killed mid-apply) would break one of these."""
    jobs = {
        row.id: row
        for row in await session.execute(
            select(Job.id, Job.state, Job.num_nodes, Job.gpus_per_node, Job.requeue_count)
        )
    }
    tasks = {
        row.id: row
        for row in await session.execute(
            select(Task.id, Task.job_id, Task.state, Task.attempt, Task.node_id)
        )
    }
    held: dict[int, int] = defaultdict(int)
    rows = await session.execute(
        select(Allocation.task_id, Gpu.node_id)
        .join(Gpu, Gpu.id == Allocation.gpu_id)
        .where(Allocation.ended_at.is_(None))
    )
    for task_id, gpu_node_id in rows:
        held[task_id] += 1
        task = tasks.get(task_id)
        if task is None or task.state not in (JobState.STARTING, JobState.RUNNING):
            state = task.state if task is not None else "missing"
            report.violations.append(f"task {task_id} is {state} but holds a GPU")
        elif task.node_id != gpu_node_id:
            report.violations.append(
                f"task {task_id} on node {task.node_id} holds a GPU of node {gpu_node_id}"
            )
    current: dict[int, int] = defaultdict(int)
    for task in tasks.values():
        job = jobs.get(task.job_id)
        if job is None:
            continue
        active = task.state in (JobState.STARTING, JobState.RUNNING)
        if active and held[task.id] != job.gpus_per_node:
            report.violations.append(
                f"task {task.id} of job {job.id} holds {held[task.id]} GPU(s), "
                f"the job asks {job.gpus_per_node} per node"
            )
        if task.attempt == job.requeue_count:
            current[job.id] += 1
    for job in jobs.values():
        if job.state in (JobState.STARTING, JobState.RUNNING) and current[job.id] != job.num_nodes:
            report.violations.append(
                f"job {job.id} is {job.state} with {current[job.id]} task(s) in attempt "
                f"{job.requeue_count}, {job.num_nodes} node(s) asked"
            )


async def check_invariants(session: AsyncSession) -> InvariantReport:
    """Check all invariants in one read; the caller opens (and ends) the transaction."""
    report = InvariantReport()
    await _gpus_held_twice(session, report)
    await _jobs_consistent(session, report)
    await _orgs_within_limits(session, report)
    await _ledger_matches_allocations(session, report)
    await _allocations_on_known_gpus(session, report)
    await _gangs_whole(session, report)
    return report
