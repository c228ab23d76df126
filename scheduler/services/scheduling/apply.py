"""APPLY: write the core's decisions in one transaction, guarded so stale ones change nothing.

The snapshot was read before the core ran, with no transaction open since; meanwhile jobs may
have been cancelled or held, quotas cut, GPUs may have gone bad and nodes down. So every start
is checked again against the rows as they are now (job still PENDING and not held, its org's
quotas and those above it as the core saw them, every GPU healthy on a ready node and not held
by an open allocation), and is skipped whole if anything moved. The jobs stay locked from
that read to the commit (PostgreSQL: `FOR NO KEY UPDATE`; SQLite: the apply holds the
database's write lock from its first statement), so a cancel or a user's disabling lands wholly
before the check or wholly after the commit; a quota cut committed after the quotas were read
orders after the starts, as one committed after the commit would. The partial unique index on
open allocations is the last line of defence: a start that trips it is rolled back to its
savepoint and skipped.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import Table, Text, bindparam, select, text, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import GpuHealth, JobState
from scheduler.core.types import JOB_CAPABILITIES, Decisions, PendingInfo, Preemption, Start
from scheduler.core.types import Org as CoreOrg
from scheduler.db import Allocation, Event, Gpu, Job, Quota, Task
from scheduler.db import Node as NodeRow
from scheduler.db import Org as OrgRow
from scheduler.services.jobactions import DEFAULT_MAX_GRACE_S, preemption_grace_of
from scheduler.services.jobstate import STOP_PREEMPT, transition_job
from scheduler.services.scheduling.load import (
    Loaded,
    capabilities_needed,
    from_epoch,
    isolated_orgs,
    quota_maps,
)
from scheduler.services.scheduling.tasks import ACTIVE_STATES, request_stop
from scheduler.states import NodeState

log = logging.getLogger("fairgpu.scheduler")
ACTOR = "scheduler"
_JOBS: Table = Job.__table__  # type: ignore[assignment]
T = TypeVar("T")


class GpuRef(NamedTuple):
    """What a start needs of a GPU row (read as a plain row: thousands per big cycle)."""

    id: int
    model: str
    health: GpuHealth


@dataclass
class Applied:
    started: list[int] = field(default_factory=list)
    skipped: list[int] = field(default_factory=list)  # stale starts
    preempted: list[tuple[int, str]] = field(default_factory=list)  # (job id, reason)
    wake_nodes: set[int] = field(default_factory=set)
    new_allocation_ids: set[int] = field(default_factory=set)
    admission_waits: list[tuple[str, float]] = field(default_factory=list)  # (org name, seconds)
    pending_written: int = 0


def _check(
    start: Start,
    gpus: Mapping[tuple[int, int], GpuRef],
    ready: set[int],
    taken: set[int],
) -> list[list[GpuRef]] | None:
    """The GPUs of each placement, or None when any is gone, unhealthy, held or off a ready node."""
    chosen: list[list[GpuRef]] = []
    for placement in start.placements:
        if placement.node_id not in ready:
            return None
        row: list[GpuRef] = []
        for index in placement.gpus:
            gpu = gpus.get((placement.node_id, index))
            if gpu is None or gpu.health is not GpuHealth.HEALTHY or gpu.id in taken:
                return None
            row.append(gpu)
        chosen.append(row)
    return chosen


def _stage_tasks(session: AsyncSession, start: Start, job: Job, now: datetime) -> list[Task]:
    tasks = [
        Task(
            job_id=job.id,
            attempt=job.requeue_count,
            node_rank=rank,
            node_id=placement.node_id,
            state=JobState.STARTING,
            created_at=now,
        )
        for rank, placement in enumerate(start.placements)
    ]
    session.add_all(tasks)
    job.borrowed = start.borrowed
    job.priority = None
    job.pending_reasons = None
    job.estimated_start_at = None
    transition_job(
        session,
        job,
        JobState.STARTING,
        actor=ACTOR,
        reason="borrowing idle GPUs" if start.borrowed else None,
        at=now,
        details={"nodes": [p.node_id for p in start.placements]},
    )
    return tasks


def _stage_allocations(
    session: AsyncSession,
    start: Start,
    job: Job,
    tasks: list[Task],
    chosen: list[list[GpuRef]],
    now: datetime,
) -> list[Allocation]:
    allocations = [
        Allocation(
            task_id=task.id,
            job_id=job.id,
            org_id=job.org_id,
            user_id=job.user_id,
            gpu_id=gpu.id,
            gpu_type=gpu.model,
            borrowed=start.borrowed,
            started_at=now,
        )
        for task, row in zip(tasks, chosen, strict=True)
        for gpu in row
    ]
    session.add_all(allocations)
    return allocations


async def _isolated_orgs(session: AsyncSession) -> frozenset[int]:
    """Orgs whose jobs need strict isolation now (one small read, none when no org asks)."""
    if await session.scalar(select(OrgRow.id).where(OrgRow.require_isolation).limit(1)) is None:
        return frozenset()
    rows = await session.execute(select(OrgRow.id, OrgRow.parent_id, OrgRow.require_isolation))
    return isolated_orgs((org_id, parent_id, required) for org_id, parent_id, required in rows)


# Awaited once the apply holds the jobs it starts, before it reads the orgs' quotas: the seam
# where tests land a cancel, a user's disabling or a quota cut inside the apply. None in service.
after_jobs_locked: Callable[[], Awaitable[None]] | None = None


async def _lock_jobs(session: AsyncSession, job_ids: Iterable[int]) -> dict[int, Job]:
    """The jobs as they are now, locked to the commit (PostgreSQL), in id order as every
    writer of several jobs locks them. Without the lock, a cancel committing between this read
    and the write of STARTING is overwritten: a cancelled job gets its GPUs."""
    jobs: dict[int, Job] = {}
    for chunk in _chunks(sorted(job_ids), JOB_LOAD_CHUNK):  # ORM loads, a short stretch each
        jobs.update(
            (j.id, j)
            for j in await session.scalars(
                select(Job)
                .where(Job.id.in_(chunk))
                .order_by(Job.id)
                .with_for_update(key_share=True)
            )
        )
    return jobs


def _path(org_id: int, decided_on: Mapping[int, CoreOrg]) -> Iterator[int]:
    """The org and its ancestors, as the core saw the tree (a cycle ends the walk)."""
    seen: set[int] = set()
    current: int | None = org_id
    while current is not None and current not in seen:
        seen.add(current)
        yield current
        org = decided_on.get(current)
        current = org.parent_id if org is not None else None


async def _quotas_moved(
    session: AsyncSession, org_ids: set[int], decided_on: Mapping[int, CoreOrg]
) -> set[int]:
    """Those of `org_ids` whose quotas, or an ancestor's, or whose place in the tree differ
    from what the core decided on (a quota cut since the load): their starts wait a cycle, and
    the next one decides on the quotas as they are."""
    path = sorted({o for org_id in org_ids for o in _path(org_id, decided_on)})
    parents: dict[int, int | None] = dict(
        (
            await session.execute(select(OrgRow.id, OrgRow.parent_id).where(OrgRow.id.in_(path)))
        ).all()
    )
    guaranteed, limit = quota_maps(
        await session.execute(
            select(Quota.org_id, Quota.gpu_type, Quota.guaranteed, Quota.limit).where(
                Quota.org_id.in_(path)
            )
        )
    )
    changed = set()
    for org_id in path:
        seen = decided_on.get(org_id)
        if (
            seen is None
            or org_id not in parents
            or parents[org_id] != seen.parent_id
            or guaranteed.get(org_id, {}) != seen.guaranteed
            or limit.get(org_id, {}) != seen.limit
        ):
            changed.add(org_id)
    if not changed:
        return set()
    return {o for o in org_ids if not changed.isdisjoint(_path(o, decided_on))}


async def apply_starts(
    session: AsyncSession,
    starts: tuple[Start, ...],
    now: datetime,
    applied: Applied,
    org_names: Mapping[int, str],
    *,
    decided_on: Mapping[int, CoreOrg],
    one_by_one: bool = False,
) -> None:
    """Apply the starts that still hold. Batched (two INSERTs in all) unless `one_by_one`.

    `decided_on`: the orgs (quotas, tree) of the snapshot the core decided on, by id.

    The batch trusts the in-code guard; if the unique index still fires, the caller rolls the
    whole transaction back and applies again `one_by_one`, each start in its own savepoint, so
    that only the start that lost the race is skipped.
    """
    if not starts:
        return
    jobs = await _lock_jobs(session, (s.job_id for s in starts))
    if after_jobs_locked is not None:
        await after_jobs_locked()
    moved = await _quotas_moved(session, {j.org_id for j in jobs.values()}, decided_on)
    node_ids = {p.node_id for s in starts for p in s.placements}
    ready: set[int] = set()
    unconfined: set[int] = set()  # ready nodes without strict isolation
    lacking: dict[str, set[int]] = {cap: set() for cap in JOB_CAPABILITIES}  # ready nodes
    shares: dict[int, int] = {}  # ready nodes' reported memory per GPU (absent: unknown)
    for node_id, isolation, capabilities, share in await session.execute(
        select(
            NodeRow.id, NodeRow.isolation, NodeRow.capabilities, NodeRow.memory_per_gpu_bytes
        ).where(NodeRow.id.in_(node_ids), NodeRow.state == NodeState.READY)
    ):
        ready.add(node_id)
        if share is not None:
            shares[node_id] = share
        if isolation != "strict":
            unconfined.add(node_id)
        for cap, nodes in lacking.items():
            if cap not in (capabilities or ()):
                nodes.add(node_id)
    isolated = await _isolated_orgs(session) if unconfined else frozenset()
    gpus = {
        (node_id, index): GpuRef(gpu_id, model, health)
        for node_id, index, gpu_id, model, health in await session.execute(
            select(Gpu.node_id, Gpu.index, Gpu.id, Gpu.model, Gpu.health).where(
                Gpu.node_id.in_(node_ids)
            )
        )
    }
    taken = {
        gpu_id
        for gpu_id in await session.scalars(
            select(Allocation.gpu_id).where(
                Allocation.ended_at.is_(None),
                Allocation.gpu_id.in_([g.id for g in gpus.values()]),
            )
        )
        if gpu_id is not None
    }
    batch: list[tuple[Start, Job, list[list[GpuRef]]]] = []
    for start in starts:
        job = jobs.get(start.job_id)
        chosen = None
        if (
            job is not None
            and job.state is JobState.PENDING
            and not job.held
            and job.org_id not in moved
        ):
            # A node whose agent restarted unconfined, older than a capability the job needs,
            # or with a share of memory its `--mem` does not fit, since the load takes no such
            # job.
            usable = ready - unconfined if job.org_id in isolated else ready
            needs = capabilities_needed(
                signal=job.signal is not None,
                interactive=job.interactive,
                private=job.network == "private",
                image=job.image is not None,
                image_cmd=job.image is not None and not job.command,
            )
            for cap in needs:
                usable = usable - lacking[cap]
            if job.memory_bytes is not None:
                usable = {
                    n
                    for n in usable
                    if shares.get(n) is None or shares[n] * job.gpus_per_node >= job.memory_bytes
                }
            chosen = _check(start, gpus, usable, taken)
        if job is None or chosen is None:
            applied.skipped.append(start.job_id)
            continue
        if one_by_one:
            try:
                async with session.begin_nested():
                    tasks = _stage_tasks(session, start, job, now)
                    await session.flush()
                    allocs = _stage_allocations(session, start, job, tasks, chosen, now)
                    await session.flush()
            except IntegrityError:
                # The savepoint rolled back and expired the job: reload it before any access.
                log.warning("start of job %s lost a race for its GPUs; skipped", start.job_id)
                await session.refresh(job)
                applied.skipped.append(start.job_id)
                continue
            applied.new_allocation_ids.update(a.id for a in allocs)
        else:
            batch.append((start, job, chosen))
            if len(batch) == START_CHUNK:
                await _write_batch(session, batch, now, applied)
                batch = []
        taken.update(g.id for row in chosen for g in row)
        applied.started.append(job.id)
        applied.wake_nodes.update(p.node_id for p in start.placements)
        wait_s = max(0.0, (now - job.submitted_at).total_seconds())
        applied.admission_waits.append((org_names.get(job.org_id, str(job.org_id)), wait_s))
    if batch:
        await _write_batch(session, batch, now, applied)


# Starts written per flush: the ORM stages and flushes a chunk in one stretch of the event loop
# (about a millisecond per start), so a cycle starting a thousand jobs is written in many short
# stretches, with the loop serving requests between them, rather than in one of a second.
START_CHUNK = 16
JOB_LOAD_CHUNK = 128


async def _write_batch(
    session: AsyncSession,
    batch: list[tuple[Start, Job, list[list[GpuRef]]]],
    now: datetime,
    applied: Applied,
) -> None:
    staged = [
        (start, job, _stage_tasks(session, start, job, now), chosen) for start, job, chosen in batch
    ]
    await session.flush()  # tasks (one INSERT … RETURNING): their ids for the allocations
    allocations = [
        a
        for start, job, tasks, chosen in staged
        for a in _stage_allocations(session, start, job, tasks, chosen, now)
    ]
    await session.flush()
    applied.new_allocation_ids.update(a.id for a in allocations)


async def apply_preemptions(
    session: AsyncSession,
    preemptions: tuple[Preemption, ...],
    now: datetime,
    grace_s: float,
    applied: Applied,
    max_grace_s: float = DEFAULT_MAX_GRACE_S,
) -> None:
    if not preemptions:
        return
    by_job = {p.job_id: p for p in preemptions}
    jobs = {j.id: j for j in await session.scalars(select(Job).where(Job.id.in_(list(by_job))))}
    tasks = await session.scalars(
        select(Task).where(Task.job_id.in_(list(by_job)), Task.state.in_(ACTIVE_STATES))
    )
    tasks_by_job: dict[int, list[Task]] = {}
    for t in tasks:
        tasks_by_job.setdefault(t.job_id, []).append(t)
    for job_id, p in by_job.items():
        job = jobs.get(job_id)
        if job is None or not job.state.is_active or job.preempt_deadline is not None:
            continue  # ended or already being preempted: nothing to do
        # A job warned by --signal gets its lead time as the grace when that is longer.
        job_grace_s = preemption_grace_of(job.signal, grace_s, max_grace_s)
        job.preempt_deadline = from_epoch(p.deadline + (job_grace_s - grace_s))
        for t in tasks_by_job.get(job_id, ()):
            if (
                t.attempt == job.requeue_count
                and request_stop(t, STOP_PREEMPT, at=now, grace_s=job_grace_s)
                and t.node_id is not None
            ):
                applied.wake_nodes.add(t.node_id)
        session.add(
            Event(
                at=now,
                kind="job.preempt",
                job_id=job_id,
                org_id=job.org_id,
                actor=ACTOR,
                reason=f"{p.reason.value} for job {p.preemptor_job_id}",
                details={"preemptor_job_id": p.preemptor_job_id, "reason": p.reason.value},
            )
        )
        applied.preempted.append((job_id, p.reason.value))


def _reasons_json(info: PendingInfo) -> list[dict[str, Any]]:
    return [
        {"code": r.code.value, "message": r.message, "details": dict(r.details)}
        for r in info.reasons
    ]


# Rows per statement: each chunk's parameters are encoded on the event loop in one go, so a
# chunk is kept to a few milliseconds of it (PostgreSQL sends arrays; SQLite binds row by row).
PENDING_CHUNK_PG = 2000
PENDING_CHUNK_SQLITE = 500


def _pending_rows(
    decisions: Decisions, explained: set[int], started: set[int], everything: bool
) -> list[tuple[int, float, str, datetime | None]]:
    """(id, priority, reasons as JSON text, estimated start) of the jobs to write, in id order.

    The core builds explanations when `decisions.pending` is first read, so a cycle with no job
    to write (nothing new between two `everything` cycles) builds none. Plain Python over every
    pending job: run in a worker thread, off the event loop.
    """
    wanted = sorted(
        job_id
        for job_id in decisions.reasons
        if job_id not in started and (everything or job_id not in explained)
    )
    if not wanted:
        return []
    pending = decisions.pending
    rows = []
    for job_id in wanted:
        info = pending[job_id]
        estimate = info.estimated_start
        rows.append(
            (
                job_id,
                info.priority,
                json.dumps(_reasons_json(info)),
                from_epoch(estimate) if estimate is not None else None,
            )
        )
    return rows


async def write_pending(
    session: AsyncSession,
    decisions: Decisions,
    loaded: Loaded,
    started: set[int],
    *,
    everything: bool,
) -> int:
    """Store priority, reasons and estimated start of pending jobs; one statement per chunk.

    Priorities (age) and estimates move every cycle, so rewriting every pending job each cycle
    would make the database's busiest write the least useful one. `everything` is set once per
    `explain_interval_s`; in between only jobs never explained yet (new or requeued) are written.
    The state condition keeps the write harmless for jobs that left PENDING meanwhile. Rows go
    in id order (concurrent writers of these rows lock them in one order).
    """
    rows = await asyncio.to_thread(_pending_rows, decisions, loaded.explained, started, everything)
    conn = await session.connection()
    if conn.dialect.name == "postgresql":
        for chunk in _chunks(rows, PENDING_CHUNK_PG):
            ids, prios, reasons, ests = (list(column) for column in zip(*chunk, strict=True))
            await conn.execute(
                _PG_PENDING_UPDATE, {"ids": ids, "prios": prios, "reasons": reasons, "ests": ests}
            )
        return len(rows)
    stmt = (
        update(_JOBS)
        .where(_JOBS.c.id == bindparam("b_id"), _JOBS.c.state == JobState.PENDING.value)
        .values(
            priority=bindparam("b_priority"),
            pending_reasons=bindparam("b_reasons", type_=Text()),  # JSON text already
            estimated_start_at=bindparam("b_est", type_=_JOBS.c.estimated_start_at.type),
        )
    )
    for chunk in _chunks(rows, PENDING_CHUNK_SQLITE):
        await conn.execute(
            stmt,
            [
                {"b_id": job_id, "b_priority": prio, "b_reasons": reasons, "b_est": est}
                for job_id, prio, reasons, est in chunk
            ],
        )
    return len(rows)


def _chunks(rows: list[T], size: int) -> Iterator[list[T]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


# One UPDATE for any number of jobs on PostgreSQL: arrays in, joined by id (no executemany).
_PG_PENDING_UPDATE = text(
    """
    UPDATE jobs SET priority = v.priority,
                    pending_reasons = CAST(v.reasons AS JSON),
                    estimated_start_at = v.est
    FROM unnest(CAST(:ids AS BIGINT[]), CAST(:prios AS FLOAT8[]), CAST(:reasons AS TEXT[]),
                CAST(:ests AS TIMESTAMPTZ[])) AS v(id, priority, reasons, est)
    WHERE jobs.id = v.id AND jobs.state = 'PENDING'
    """
)
