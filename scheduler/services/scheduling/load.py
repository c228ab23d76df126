"""LOAD: read the cluster into the core's frozen snapshot, in one short read transaction.

Database rows become `scheduler.core.types` values here and nowhere else: ids stay ints, times
become float epoch seconds. What the apply phase needs to recognise a stale decision (the pending
reasons already stored, the allocations open at load time) travels alongside the snapshot.
"""

from __future__ import annotations

import asyncio
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import Executable, Result, Text, case, cast, func, select
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from protocol.states import GpuHealth, JobState
from scheduler.core.types import (
    JOB_CAPABILITIES,
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
from scheduler.services.dependencies import met
from scheduler.services.scheduling.sqltime import epoch_s
from scheduler.states import NodeState


def epoch(at: datetime) -> float:
    return at.timestamp()


def from_epoch(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass
class Loaded:
    """A snapshot plus what apply needs to write only what changed."""

    snapshot: Snapshot
    explained: set[int] = field(default_factory=set)  # pending jobs with an explanation stored
    org_usage: dict[int, float] = field(default_factory=dict)  # folded to snapshot.now
    open_allocation_ids: frozenset[int] = frozenset()
    org_names: dict[int, str] = field(default_factory=dict)


Rows = Sequence[Any]  # plain result rows (tuple-like), unpacked by position


@dataclass
class _Fetched:
    """What the read transaction returned, before any per-row Python work."""

    nodes: Rows
    gpus: Rows
    held: Rows
    running_jobs: Rows
    dependencies: Rows
    pending: Rows
    usage: Rows
    closed: Rows
    quotas: Rows
    orgs: Rows
    array_active: Rows = ()  # (array_job_id, active elements) of arrays with a `%N` limit
    singletons: Rows = ()  # (id, org, name) of pending singleton jobs
    named: Rows = ()  # (id, org, name) of jobs not ended with a singleton's name, by id


async def _rows(conn: AsyncConnection, stmt: Executable) -> Rows:
    """Execute on the loop (the driver buffers the rows), turn them into rows in a thread.

    Row construction and type processing of tens of thousands of rows would otherwise run on
    the server's event loop in one stretch, stalling every request it serves meanwhile.
    """
    result = await conn.execute(stmt)
    return await asyncio.to_thread(_plain, result)


def _plain(result: Result[Any]) -> list[tuple[Any, ...]]:
    # Plain tuples of numbers and strings leave the garbage collector's lists at its next pass;
    # Row objects stay tracked and, kept for the build, push it into full collections.
    return [tuple(row) for row in result]


_NODES = select(
    NodeRow.id,
    NodeRow.name,
    NodeRow.state,
    NodeRow.domain,
    Site.name,
    NodeRow.isolation,
    NodeRow.capabilities,
    NodeRow.memory_per_gpu_bytes,
).join(Site, Site.id == NodeRow.site_id)
# In id order: a cycle's nodes then equal the last cycle's while no node changed, which lets the
# loop's Scheduler keep its layout (PostgreSQL returns updated rows in another order).
_NODES = _NODES.order_by(NodeRow.id)
_GPUS = select(Gpu.node_id, Gpu.index, Gpu.model, Gpu.health)
_HELD = (
    select(
        Allocation.id,
        Allocation.job_id,
        Allocation.org_id,
        Allocation.user_id,
        Allocation.gpu_type,
        epoch_s(Allocation.started_at),
        Task.node_id,
        Task.node_rank,
        Gpu.index,
    )
    .join(Task, Task.id == Allocation.task_id)
    .join(Gpu, Gpu.id == Allocation.gpu_id)
    .where(Allocation.ended_at.is_(None))
)
_RUNNING_JOBS = select(
    Job.id,
    Job.time_limit_s,
    Job.priority_class,
    Job.preemptible,
    epoch_s(Job.preempt_deadline),
).where(Job.id.in_(select(Allocation.job_id).where(Allocation.ended_at.is_(None))))
_PENDING = (
    select(
        Job.id,
        Job.org_id,
        Job.user_id,
        Job.gpus_per_node,
        Job.num_nodes,
        Job.time_limit_s,
        epoch_s(Job.submitted_at),
        Job.gpu_type,
        Job.site,
        Job.priority_class,
        Job.preemptible,
        Job.held,
        Job.priority.is_not(None),
        epoch_s(Job.not_before),
        Job.array_job_id,
        Job.array_limit,
        Job.signal.is_not(None),
        Job.interactive,
        Job.network == "private",
        Job.image.is_not(None),
        # No command: the image's own ENTRYPOINT and CMD (only an image job's command is read).
        case((Job.image.is_(None), False), else_=cast(Job.command, Text) == "[]"),
        Job.memory_bytes,
    )
    .where(Job.state == JobState.PENDING)
    .order_by(Job.id)
)
_ARRAY_ACTIVE = (
    select(Job.array_job_id, func.count())
    .where(
        Job.state.in_([JobState.STARTING, JobState.RUNNING]),
        Job.array_limit.is_not(None),
    )
    .group_by(Job.array_job_id)
)
_SINGLETONS = select(Job.id, Job.org_id, Job.name).where(
    Job.state == JobState.PENDING, Job.singleton.is_(True)
)


def _named_stmt(names: set[str]) -> Executable:
    return (
        select(Job.id, Job.org_id, Job.name)
        .where(
            Job.name.in_(sorted(names)),
            Job.state.in_([JobState.PENDING, JobState.STARTING, JobState.RUNNING]),
        )
        .order_by(Job.id)
    )


_USAGE = select(OrgUsage.org_id, OrgUsage.decayed_gpu_seconds, epoch_s(OrgUsage.as_of))
_QUOTAS = select(Quota.org_id, Quota.gpu_type, Quota.guaranteed, Quota.limit)
_ORGS = select(
    OrgRow.id, OrgRow.name, OrgRow.parent_id, OrgRow.shares, OrgRow.require_isolation
).order_by(OrgRow.id)


def _dependencies_stmt() -> Executable:
    parent = Job.__table__.alias("parent")
    child = Job.__table__.alias("child")
    return (
        select(JobDependency.job_id, parent.c.state, JobDependency.kind)
        .join(child, child.c.id == JobDependency.job_id)
        .join(parent, parent.c.id == JobDependency.depends_on_id)
        .where(child.c.state == JobState.PENDING)
        .group_by(JobDependency.job_id, parent.c.state, JobDependency.kind)
    )


_DEPENDENCIES = _dependencies_stmt()


def _closed_stmt(allocation_ids: Iterable[int] | None, since: datetime | None) -> Executable:
    """Allocations closed since the last fold: by id when the caller knows which, else by time."""
    stmt = select(
        Allocation.id,
        Allocation.org_id,
        Allocation.gpu_type,
        epoch_s(Allocation.started_at),
        epoch_s(Allocation.ended_at),
    ).where(Allocation.ended_at.is_not(None))
    if allocation_ids is not None:
        stmt = stmt.where(Allocation.id.in_(list(allocation_ids)))
    elif since is not None:
        stmt = stmt.where(Allocation.ended_at > since)
    return stmt


async def _fetch(session: AsyncSession, previously_open: frozenset[int] | None) -> _Fetched:
    conn = await session.connection()
    nodes = await _rows(conn, _NODES)
    gpus = await _rows(conn, _GPUS)
    held = await _rows(conn, _HELD)
    running_jobs = await _rows(conn, _RUNNING_JOBS) if held else []
    dependencies = await _rows(conn, _DEPENDENCIES)
    pending = await _rows(conn, _PENDING)
    usage = await _rows(conn, _USAGE)
    if previously_open is not None:
        gone = previously_open - {row[0] for row in held}
        closed = await _rows(conn, _closed_stmt(gone, None)) if gone else []
    else:
        oldest = min((row[2] for row in usage), default=None)
        since = from_epoch(oldest) if oldest is not None else None
        closed = await _rows(conn, _closed_stmt(None, since))
    quotas = await _rows(conn, _QUOTAS)
    orgs = await _rows(conn, _ORGS)
    limited = any(row[15] is not None for row in pending)
    array_active = await _rows(conn, _ARRAY_ACTIVE) if limited else []
    singletons = await _rows(conn, _SINGLETONS)
    named = await _rows(conn, _named_stmt({row[2] for row in singletons})) if singletons else []
    return _Fetched(
        nodes,
        gpus,
        held,
        running_jobs,
        dependencies,
        pending,
        usage,
        closed,
        quotas,
        orgs,
        array_active,
        singletons,
        named,
    )


# -- building the snapshot: plain Python over the fetched rows, run in a worker thread ----------


def _nodes(fetched: _Fetched) -> tuple[Node, ...]:
    gpus: dict[int, list[tuple[int, str, GpuHealth]]] = defaultdict(list)
    for node_id, index, model, health in fetched.gpus:
        gpus[node_id].append((index, model, health))
    nodes: list[Node] = []
    for node_id, name, state, domain, site, isolation, capabilities, memory in fetched.nodes:
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
                strict_isolation=isolation == "strict",
                # An agent that never said (older than `capabilities`) can do none of them.
                capabilities=_node_capabilities(capabilities),
                memory_per_gpu_bytes=memory,
            )
        )
    return tuple(nodes)


def _node_capabilities(names: list[str] | None) -> frozenset[str]:
    """The capabilities of a node's agent that jobs need, one shared set per combination."""
    caps = frozenset(names or ()) & JOB_CAPABILITIES
    return _CAPS.get(caps, caps)


# Agent capabilities a pending job needs, by (has `--signal`, interactive, `--network
# private`, an image, an image without a command): the warning signal is delivered only by a
# "signal" agent, a terminal opened only by a "pty" one, a network namespace made only by a
# "netns" one, an image run only by a "container" one (its runtime configured and working), and
# put in the namespace only by a "container-netns" one (a job that leaves its network unsaid
# runs in one where the node can, in the node's elsewhere: it needs nothing); a task with no
# command is taken only by an "image-cmd" one (older agents refuse it).
_NEEDS = {
    (signal, pty, private, image, image_cmd): frozenset(
        name
        for name, wanted in (
            ("signal", signal),
            ("pty", pty),
            ("netns", private),
            ("container", image),
            ("container-netns", private and image),
            ("image-cmd", image_cmd),
        )
        if wanted
    )
    for signal in (False, True)
    for pty in (False, True)
    for private in (False, True)
    for image in (False, True)
    for image_cmd in (False, True)
}
_CAPS = {caps: caps for caps in _NEEDS.values()}


def capabilities_needed(
    *, signal: bool, interactive: bool, private: bool, image: bool, image_cmd: bool
) -> frozenset[str]:
    """The agent capabilities a job needs of its node (`_NEEDS`): the load places it by them and
    the apply's guard checks them again. `image_cmd`: an image job without a command."""
    return _NEEDS[(signal, interactive, private, image, image_cmd)]


def _running(fetched: _Fetched) -> tuple[tuple[RunningJob, ...], list[HeldInterval]]:
    by_job: dict[int, list[Any]] = defaultdict(list)
    held: list[HeldInterval] = []
    for row in fetched.held:
        alloc_id, job_id, org_id, _, gpu_type, started_s, _, _, _ = row
        by_job[job_id].append(row)
        held.append(HeldInterval(alloc_id, org_id, gpu_type, started_s, end=None))
    jobs = {row[0]: row for row in fetched.running_jobs}
    running: list[RunningJob] = []
    for job_id in sorted(by_job):
        rows = by_job[job_id]
        _, time_limit_s, priority_class, preemptible, deadline_s = jobs[job_id]
        per_node: dict[tuple[int, int], list[int]] = defaultdict(list)
        for r in rows:
            per_node[(r[7], r[6])].append(r[8])  # (node rank, node id) -> GPU indexes
        placements = tuple(
            Placement(node_id=node_id, gpus=tuple(sorted(idx)))
            for (_, node_id), idx in sorted(per_node.items())
        )
        first = rows[0]
        running.append(
            RunningJob(
                job_id=job_id,
                org_id=first[2],
                user_id=first[3],
                gpu_type=first[4],
                placements=placements,
                started_at=min(r[5] for r in rows),
                time_limit_s=float(time_limit_s),
                priority_class=priority_class,
                preemptible=preemptible,
                preempting=deadline_s is not None,
                preempt_deadline=deadline_s,
            )
        )
    return tuple(running), held


def _dependencies(fetched: _Fetched) -> dict[int, DependencyState]:
    """Per pending job with dependencies (services/dependencies.py): satisfied, waiting or
    never. A singleton waits while an earlier job of its org with its name is not ended."""
    seen: dict[int, set[bool | None]] = defaultdict(set)
    for job_id, state, kind in fetched.dependencies:
        seen[job_id].add(met(kind, JobState(state)))
    out: dict[int, DependencyState] = {}
    for job_id, outcomes in seen.items():
        if False in outcomes:
            out[job_id] = DependencyState.NEVER
        elif outcomes == {True}:
            out[job_id] = DependencyState.SATISFIED
        else:
            out[job_id] = DependencyState.WAITING
    first: dict[tuple[int, str], int] = {}  # (org, name) -> its earliest job not ended
    for job_id, org_id, name in fetched.named:
        first.setdefault((org_id, name), job_id)
    for job_id, org_id, name in fetched.singletons:
        if first.get((org_id, name), job_id) < job_id and out.get(job_id) is not (
            DependencyState.NEVER
        ):
            out[job_id] = DependencyState.WAITING
    return out


def isolated_orgs(orgs: Iterable[tuple[int, int | None, bool]]) -> frozenset[int]:
    """Orgs whose jobs need strict isolation: those that require it and every org below them.

    `orgs` is (id, parent id, requires isolation) per org.
    """
    parent: dict[int, int | None] = {}
    own: set[int] = set()
    for org_id, parent_id, required in orgs:
        parent[org_id] = parent_id
        if required:
            own.add(org_id)
    if not own:
        return frozenset()
    out: set[int] = set()
    for org_id in parent:
        seen: set[int] = set()
        current: int | None = org_id
        while current is not None and current not in seen:  # `seen`: a cycle ends the walk
            if current in own:
                out.add(org_id)
                break
            seen.add(current)
            current = parent.get(current)
    return frozenset(out)


def _pending(fetched: _Fetched) -> tuple[tuple[PendingJob, ...], set[int]]:
    deps = _dependencies(fetched)
    isolated = isolated_orgs((row[0], row[2], row[4]) for row in fetched.orgs)
    none = DependencyState.NONE
    runnable = (DependencyState.NONE, DependencyState.SATISFIED)
    # Room each limited array has for more active elements; its pending elements take it in
    # id (= task) order, and those beyond it wait as JobArrayTaskLimit.
    array_room = {array_job_id: -active for array_job_id, active in fetched.array_active}
    pending: list[PendingJob] = []
    explained: set[int] = set()
    for (
        job_id,
        org_id,
        user_id,
        gpus_per_node,
        num_nodes,
        time_limit_s,
        submitted_s,
        gpu_type,
        site,
        priority_class,
        preemptible,
        held,
        has_priority,
        not_before_s,
        array_job_id,
        array_limit,
        signal,
        interactive,
        private,
        image,
        image_cmd,
        memory_bytes,
    ) in fetched.pending:
        dependency = deps.get(job_id, none)
        throttled = False
        if array_limit is not None and not held and dependency in runnable:
            room = array_room.get(array_job_id, 0) + array_limit
            throttled = room <= 0
            array_room[array_job_id] = array_room.get(array_job_id, 0) - (0 if throttled else 1)
        pending.append(
            PendingJob(
                job_id=job_id,
                org_id=org_id,
                user_id=user_id,
                gpus_per_node=gpus_per_node,
                nodes=num_nodes,
                time_limit_s=float(time_limit_s),
                submitted_at=submitted_s,
                gpu_type=gpu_type,
                site=site,
                priority_class=priority_class,
                preemptible=preemptible,
                held=held,
                dependency=dependency,
                needs_isolation=org_id in isolated,
                capabilities=capabilities_needed(
                    signal=bool(signal),
                    interactive=bool(interactive),
                    private=bool(private),
                    image=bool(image),
                    image_cmd=bool(image_cmd),
                ),
                not_before=not_before_s,
                array_throttled=throttled,
                memory_bytes=memory_bytes,
            )
        )
        if has_priority:
            explained.add(job_id)
    return tuple(pending), explained


def quota_maps(
    rows: Iterable[Any],
) -> tuple[dict[int, dict[str, int]], dict[int, dict[str, int]]]:
    """Guaranteed and limit per org and GPU type from (org id, GPU type, guaranteed, limit)
    rows, as `Org` holds them: a type without a limit is left out of `limit`."""
    guaranteed: dict[int, dict[str, int]] = defaultdict(dict)
    limit: dict[int, dict[str, int]] = defaultdict(dict)
    for org_id, gpu_type, quota_guaranteed, quota_limit in rows:
        guaranteed[org_id][gpu_type] = quota_guaranteed
        if quota_limit is not None:
            limit[org_id][gpu_type] = quota_limit
    return guaranteed, limit


def _orgs(fetched: _Fetched, usage: Mapping[int, float]) -> tuple[tuple[Org, ...], dict[int, str]]:
    guaranteed, limit = quota_maps(fetched.quotas)
    orgs: list[Org] = []
    names: dict[int, str] = {}
    for org_id, name, parent_id, shares, _ in fetched.orgs:
        names[org_id] = name
        orgs.append(
            Org(
                id=org_id,
                name=name,
                parent_id=parent_id,
                shares=shares,
                guaranteed=guaranteed.get(org_id, {}),
                limit=limit.get(org_id, {}),
                usage=usage.get(org_id, 0.0),
            )
        )
    return tuple(orgs), names


def _build(fetched: _Fetched, *, now: datetime, config: PolicyConfig) -> Loaded:
    nodes = _nodes(fetched)
    running, held = _running(fetched)
    pending, explained = _pending(fetched)
    previous = {org_id: (value, as_of_s) for org_id, value, as_of_s in fetched.usage}
    closed = [
        HeldInterval(alloc_id, org_id, gpu_type, started_s, ended_s)
        for alloc_id, org_id, gpu_type, started_s, ended_s in fetched.closed
    ]
    now_s = epoch(now)
    usage = fold_usage(
        previous,
        [*held, *closed],
        now_s,
        half_life_s=config.half_life_s,
        gpu_weights=config.gpu_weights,
    )
    orgs, names = _orgs(fetched, usage)
    for org in orgs:
        usage.setdefault(org.id, 0.0)
    snapshot = Snapshot(
        now=now_s, nodes=nodes, orgs=orgs, running=running, pending=pending, config=config
    )
    return Loaded(
        snapshot=snapshot,
        explained=explained,
        org_usage={k: v for k, v in usage.items() if k in names},
        open_allocation_ids=frozenset(h.allocation_id for h in held),
        org_names=names,
    )


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
    fetched = await _fetch(session, previously_open)
    # Tens of thousands of rows become frozen dataclasses: off the loop, which keeps serving.
    return await asyncio.to_thread(_build, fetched, now=now, config=config)
