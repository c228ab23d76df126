"""LOAD: read the cluster into the core's frozen snapshot, in one short read transaction.

Database rows become `scheduler.core.types` values here and nowhere else: ids stay ints, times
become float epoch seconds. What the apply phase needs to recognise a stale decision (the pending
reasons already stored, the allocations open at load time) travels alongside the snapshot.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.core.types import (
    DependencyState,
    Node,
    Org,
    PendingJob,
    Placement,
    PolicyConfig,
    RunningJob,
    Snapshot,
)
from scheduler.db import Allocation, Gpu, Job, JobDependency, OrgUsage, Quota, Site, Task
from scheduler.db import Node as NodeRow
from scheduler.db import Org as OrgRow
from scheduler.services.accounting import HeldInterval, fold_usage
from scheduler.settings import Settings
from scheduler.states import GpuHealth, JobState, NodeState


def epoch(at: datetime) -> float:
    return at.timestamp()


def from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def policy_config(settings: Settings) -> PolicyConfig:
    return PolicyConfig(
        half_life_s=settings.usage_half_life_s,
        gpu_weights=dict(settings.gpu_weights),
        min_runtime_s=settings.min_runtime_s,
        preemption_grace_s=settings.preemption_grace_s,
    )


@dataclass
class Loaded:
    """A snapshot plus what apply needs to write only what changed."""

    snapshot: Snapshot
    explained: set[int] = field(default_factory=set)  # pending jobs with an explanation stored
    org_usage: dict[int, float] = field(default_factory=dict)  # folded to snapshot.now
    open_allocation_ids: frozenset[int] = frozenset()
    org_names: dict[int, str] = field(default_factory=dict)


async def _nodes(session: AsyncSession) -> tuple[Node, ...]:
    rows = (
        await session.execute(
            select(NodeRow.id, NodeRow.name, NodeRow.state, NodeRow.domain, Site.name).join(
                Site, Site.id == NodeRow.site_id
            )
        )
    ).all()
    gpus: dict[int, list[tuple[int, str, GpuHealth]]] = defaultdict(list)
    for node_id, index, model, health in await session.execute(
        select(Gpu.node_id, Gpu.index, Gpu.model, Gpu.health)
    ):
        gpus[node_id].append((index, model, health))
    nodes: list[Node] = []
    for node_id, name, state, domain, site in rows:
        node_gpus = sorted(gpus.get(node_id, ()))
        if not node_gpus:
            continue
        gpu_type = Counter(m for _, m, _ in node_gpus).most_common(1)[0][0]
        nodes.append(
            Node(
                id=node_id,
                name=name,
                site=site,
                domain=domain or "",
                gpu_type=gpu_type,
                gpus=tuple(i for i, _, _ in node_gpus),
                unhealthy_gpus=frozenset(
                    i for i, m, h in node_gpus if h is not GpuHealth.HEALTHY or m != gpu_type
                ),
                schedulable=state is NodeState.READY,
            )
        )
    return tuple(nodes)


async def _running(
    session: AsyncSession,
) -> tuple[tuple[RunningJob, ...], list[HeldInterval]]:
    stmt = (
        select(
            Allocation.id,
            Allocation.job_id,
            Allocation.org_id,
            Allocation.user_id,
            Allocation.gpu_type,
            Allocation.started_at,
            Task.node_id,
            Task.node_rank,
            Gpu.index,
        )
        .join(Task, Task.id == Allocation.task_id)
        .join(Gpu, Gpu.id == Allocation.gpu_id)
        .where(Allocation.ended_at.is_(None))
    )
    by_job: dict[int, list[Any]] = defaultdict(list)
    held: list[HeldInterval] = []
    for row in await session.execute(stmt):
        by_job[row.job_id].append(row)
        held.append(HeldInterval(row.id, row.org_id, row.gpu_type, epoch(row.started_at), end=None))
    if not by_job:
        return (), held
    jobs = {
        j.id: j
        for j in await session.execute(
            select(
                Job.id,
                Job.time_limit_s,
                Job.priority_class,
                Job.preemptible,
                Job.preempt_deadline,
            ).where(Job.id.in_(list(by_job)))
        )
    }
    running: list[RunningJob] = []
    for job_id in sorted(by_job):
        rows = by_job[job_id]
        job = jobs[job_id]
        per_node: dict[tuple[int, int], list[int]] = defaultdict(list)
        for r in rows:
            per_node[(r.node_rank, r.node_id)].append(r.index)
        placements = tuple(
            Placement(node_id=node_id, gpus=tuple(sorted(idx)))
            for (_, node_id), idx in sorted(per_node.items())
        )
        deadline = job.preempt_deadline
        running.append(
            RunningJob(
                job_id=job_id,
                org_id=rows[0].org_id,
                user_id=rows[0].user_id,
                gpu_type=rows[0].gpu_type,
                placements=placements,
                started_at=min(epoch(r.started_at) for r in rows),
                time_limit_s=float(job.time_limit_s),
                priority_class=job.priority_class,
                preemptible=job.preemptible,
                preempting=deadline is not None,
                preempt_deadline=epoch(deadline) if deadline is not None else None,
            )
        )
    return tuple(running), held


async def _dependencies(session: AsyncSession) -> dict[int, DependencyState]:
    """Per pending job with `afterok` dependencies: satisfied, waiting or never."""
    parent = Job.__table__.alias("parent")
    child = Job.__table__.alias("child")
    stmt = (
        select(JobDependency.job_id, parent.c.state, func.count())
        .join(child, child.c.id == JobDependency.job_id)
        .join(parent, parent.c.id == JobDependency.depends_on_id)
        .where(child.c.state == JobState.PENDING)
        .group_by(JobDependency.job_id, parent.c.state)
    )
    states: dict[int, set[JobState]] = defaultdict(set)
    for job_id, state, _ in await session.execute(stmt):
        states[job_id].add(JobState(state))
    out: dict[int, DependencyState] = {}
    for job_id, seen in states.items():
        if any(s.is_terminal and s is not JobState.COMPLETED for s in seen):
            out[job_id] = DependencyState.NEVER
        elif seen == {JobState.COMPLETED}:
            out[job_id] = DependencyState.SATISFIED
        else:
            out[job_id] = DependencyState.WAITING
    return out


async def _pending(session: AsyncSession) -> tuple[tuple[PendingJob, ...], set[int]]:
    deps = await _dependencies(session)
    stmt = select(
        Job.id,
        Job.org_id,
        Job.user_id,
        Job.gpus_per_node,
        Job.num_nodes,
        Job.time_limit_s,
        Job.submitted_at,
        Job.gpu_type,
        Job.site,
        Job.priority_class,
        Job.preemptible,
        Job.held,
        Job.priority,
    ).where(Job.state == JobState.PENDING)
    pending: list[PendingJob] = []
    explained: set[int] = set()
    for r in await session.execute(stmt.order_by(Job.id)):
        pending.append(
            PendingJob(
                job_id=r.id,
                org_id=r.org_id,
                user_id=r.user_id,
                gpus_per_node=r.gpus_per_node,
                nodes=r.num_nodes,
                time_limit_s=float(r.time_limit_s),
                submitted_at=epoch(r.submitted_at),
                gpu_type=r.gpu_type,
                site=r.site,
                priority_class=r.priority_class,
                preemptible=r.preemptible,
                held=r.held,
                dependency=deps.get(r.id, DependencyState.NONE),
            )
        )
        if r.priority is not None:
            explained.add(r.id)
    return tuple(pending), explained


async def closed_intervals(
    session: AsyncSession, allocation_ids: Iterable[int] | None, since: datetime | None
) -> list[HeldInterval]:
    """Allocations closed since the last fold: by id when the caller knows which, else by time."""
    stmt = select(
        Allocation.id,
        Allocation.org_id,
        Allocation.gpu_type,
        Allocation.started_at,
        Allocation.ended_at,
    ).where(Allocation.ended_at.is_not(None))
    if allocation_ids is not None:
        ids = list(allocation_ids)
        if not ids:
            return []
        stmt = stmt.where(Allocation.id.in_(ids))
    elif since is not None:
        stmt = stmt.where(Allocation.ended_at > since)
    return [
        HeldInterval(r.id, r.org_id, r.gpu_type, epoch(r.started_at), epoch(r.ended_at))
        for r in await session.execute(stmt)
    ]


async def _orgs(
    session: AsyncSession, usage: Mapping[int, float]
) -> tuple[tuple[Org, ...], dict[int, str]]:
    guaranteed: dict[int, dict[str, int]] = defaultdict(dict)
    limit: dict[int, dict[str, int]] = defaultdict(dict)
    for q in await session.execute(
        select(Quota.org_id, Quota.gpu_type, Quota.guaranteed, Quota.limit)
    ):
        guaranteed[q.org_id][q.gpu_type] = q.guaranteed
        if q.limit is not None:
            limit[q.org_id][q.gpu_type] = q.limit
    orgs: list[Org] = []
    names: dict[int, str] = {}
    for o in await session.execute(
        select(OrgRow.id, OrgRow.name, OrgRow.parent_id, OrgRow.shares).order_by(OrgRow.id)
    ):
        names[o.id] = o.name
        orgs.append(
            Org(
                id=o.id,
                name=o.name,
                parent_id=o.parent_id,
                shares=o.shares,
                guaranteed=guaranteed.get(o.id, {}),
                limit=limit.get(o.id, {}),
                usage=usage.get(o.id, 0.0),
            )
        )
    return tuple(orgs), names


async def load_snapshot(
    session: AsyncSession,
    *,
    now: datetime,
    config: PolicyConfig,
    previously_open: frozenset[int] | None,
) -> Loaded:
    """Everything the core needs, read in the caller's (short, read-only) transaction.

    `previously_open` is the set of allocations that were open at the last successful fold;
    those no longer open were closed since and are folded by id. Without it (a new leader) the
    allocations closed since the oldest `as_of` are found by time, once.
    """
    nodes = await _nodes(session)
    running, held = await _running(session)
    pending, explained = await _pending(session)
    previous = {
        r.org_id: (r.decayed_gpu_seconds, epoch(r.as_of))
        for r in await session.execute(
            select(OrgUsage.org_id, OrgUsage.decayed_gpu_seconds, OrgUsage.as_of)
        )
    }
    open_ids = frozenset(h.allocation_id for h in held)
    if previously_open is not None:
        closed = await closed_intervals(session, previously_open - open_ids, None)
    else:
        oldest = min((as_of for _, as_of in previous.values()), default=None)
        closed = await closed_intervals(
            session, None, from_epoch(oldest) if oldest is not None else None
        )
    now_s = epoch(now)
    usage = fold_usage(
        previous,
        [*held, *closed],
        now_s,
        half_life_s=config.half_life_s,
        gpu_weights=config.gpu_weights,
    )
    orgs, names = await _orgs(session, usage)
    for org in orgs:
        usage.setdefault(org.id, 0.0)
    snapshot = Snapshot(
        now=now_s, nodes=nodes, orgs=orgs, running=running, pending=pending, config=config
    )
    return Loaded(
        snapshot=snapshot,
        explained=explained,
        org_usage={k: v for k, v in usage.items() if k in names},
        open_allocation_ids=open_ids,
        org_names=names,
    )
