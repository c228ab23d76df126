"""Reading a window of the server's history for `fairgpu simulate --from-db`.

`read_history` runs a handful of SELECTs in the caller's transaction and returns plain data; the
caller keeps that transaction short and read-only, and simulates with nothing open.

Which jobs are replayed: those submitted in [since, until) that held GPUs. A job's attempts
come from its allocations (GPUs given to released), grouped by task attempt; every attempt but
the last was requeued (preempted, or its node failed). A job still holding GPUs at read time is
replayed as if it ended then (censored). Jobs still pending, jobs that ended without ever
holding a GPU (cancelled while pending, say) and jobs of no GPUs are left out and counted.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, datetime

from sqlalchemy import case, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.core.types import Node, Org
from scheduler.db import Allocation, Gpu, Job, Quota, Site, Task
from scheduler.db import Node as NodeRow
from scheduler.db import Org as OrgRow
from scheduler.sim.history import History, RecordedAttempt, RecordedJob


def epoch(when: datetime) -> float:
    return when.astimezone(UTC).timestamp()


async def read_history(session: AsyncSession, *, since: datetime, until: datetime) -> History:
    orgs = await _orgs(session)
    nodes = await _nodes(session)
    jobs, left_out = await _jobs(session, since, until, {o.id: o.name for o in orgs})
    return History(epoch(since), epoch(until), orgs, nodes, jobs, left_out)


async def _orgs(session: AsyncSession) -> tuple[Org, ...]:
    guaranteed: dict[int, dict[str, int]] = defaultdict(dict)
    limit: dict[int, dict[str, int]] = defaultdict(dict)
    for q in await session.execute(
        select(Quota.org_id, Quota.gpu_type, Quota.guaranteed, Quota.limit)
    ):
        guaranteed[q.org_id][q.gpu_type] = q.guaranteed
        if q.limit is not None:
            limit[q.org_id][q.gpu_type] = q.limit
    rows = await session.execute(
        select(OrgRow.id, OrgRow.name, OrgRow.parent_id, OrgRow.shares).order_by(OrgRow.id)
    )
    return tuple(
        Org(
            id=o.id,
            name=o.name,
            parent_id=o.parent_id,
            shares=o.shares,
            guaranteed=guaranteed.get(o.id, {}),
            limit=limit.get(o.id, {}),
        )
        for o in rows
    )


async def _nodes(session: AsyncSession) -> tuple[Node, ...]:
    """Every registered node with all its GPUs, whatever its state now: outages are not replayed.

    A node's type is its most common GPU model (nodes are homogeneous in practice).
    """
    gpus: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for g in await session.execute(select(Gpu.node_id, Gpu.index.label("i"), Gpu.model)):
        gpus[g.node_id].append((g.i, g.model))
    rows = await session.execute(
        select(NodeRow.id, NodeRow.name, NodeRow.domain, Site.name.label("site"))
        .join(Site, Site.id == NodeRow.site_id)
        .order_by(NodeRow.id)
    )
    nodes: list[Node] = []
    for row in rows:
        mine = sorted(gpus.get(row.id, []))
        if not mine:
            continue
        model = Counter(m for _, m in mine).most_common(1)[0][0]
        nodes.append(
            Node(
                id=len(nodes) + 1,
                name=row.name,
                site=row.site,
                domain=row.domain or row.site,
                gpu_type=model,
                gpus=tuple(i for i, _ in mine),
            )
        )
    return tuple(nodes)


async def _jobs(
    session: AsyncSession, since: datetime, until: datetime, org_names: dict[int, str]
) -> tuple[tuple[RecordedJob, ...], dict[str, int]]:
    in_window = (Job.submitted_at >= since) & (Job.submitted_at < until)
    attempts: dict[int, list[RecordedAttempt]] = defaultdict(list)
    stmt = (
        select(
            Allocation.job_id,
            Task.attempt,
            func.min(Allocation.started_at).label("start"),
            func.max(Allocation.ended_at).label("end"),
            func.count().label("gpus"),
            func.count(Allocation.ended_at).label("closed"),
            func.max(case((Allocation.borrowed, 1), else_=0)).label("borrowed"),
        )
        .join(Task, Task.id == Allocation.task_id)
        .where(Allocation.job_id.in_(select(Job.id).where(in_window)))
        .group_by(Allocation.job_id, Task.attempt)
        .order_by(Allocation.job_id, Task.attempt)
    )
    for a in await session.execute(stmt):
        end = a.end if a.closed == a.gpus and a.end is not None else until
        start_s = epoch(a.start)
        attempts[a.job_id].append(
            RecordedAttempt(start_s, max(epoch(min(end, until)), start_s), bool(a.borrowed))
        )
    rows = await session.execute(
        select(
            Job.id,
            Job.org_id,
            Job.submitted_at,
            Job.gpus_per_node,
            Job.num_nodes,
            Job.time_limit_s,
            Job.state,
            Job.gpu_type,
            Job.site,
            Job.preemptible,
            Job.priority_class,
        )
        .where(in_window)
        .order_by(Job.submitted_at, Job.id)
    )
    jobs: list[RecordedJob] = []
    left_out: Counter[str] = Counter()
    for j in rows:
        ran = attempts.get(j.id, [])
        state = JobState(j.state)
        if j.gpus_per_node == 0:
            left_out["no_gpus"] += 1
        elif state is JobState.PENDING:
            left_out["pending_at_read"] += 1
        elif not ran:
            left_out["never_held_gpus"] += 1
        else:
            jobs.append(
                RecordedJob(
                    job_id=j.id,
                    org=org_names[j.org_id],
                    submitted_s=epoch(j.submitted_at),
                    gpus_per_node=j.gpus_per_node,
                    nodes=j.num_nodes,
                    time_limit_s=float(j.time_limit_s),
                    attempts=_in_order(epoch(j.submitted_at), ran),
                    state=str(state) if state.is_terminal else str(JobState.RUNNING),
                    gpu_type=j.gpu_type,
                    site=j.site,
                    preemptible=j.preemptible,
                    priority_class=j.priority_class,
                )
            )
    return tuple(jobs), dict(sorted(left_out.items()))


def _in_order(submitted_s: float, attempts: list[RecordedAttempt]) -> tuple[RecordedAttempt, ...]:
    """Attempts that start no earlier than the submission and the previous attempt's end.

    A cycle stamps allocations with the `now` it read before loading the queue, so a job
    submitted during that load can show GPUs given a few milliseconds before it was submitted.
    """
    out: list[RecordedAttempt] = []
    floor_s = submitted_s
    for a in attempts:
        start_s = max(a.start_s, floor_s)
        out.append(RecordedAttempt(start_s, max(a.end_s, start_s), a.borrowed))
        floor_s = out[-1].end_s
    return tuple(out)
