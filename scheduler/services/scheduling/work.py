"""What a node must do now: tasks to start (not yet acknowledged) and to stop (not yet ended).

Read by every heartbeat and by every re-check of a held long-poll, so it is one indexed query
on `tasks.node_id` when there is nothing to do, and a few more only when there is.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.agent import HeartbeatReply, TaskSpec, TaskStop
from scheduler.db import Allocation, Gpu, Job, Org, Task
from scheduler.db import Node as NodeRow
from scheduler.db.types import utcnow
from scheduler.services.scheduling.tasks import ACTIVE_STATES
from scheduler.settings import Settings

MASTER_PORT_BASE = 29_500  # torchrun's default; offset per job so gangs sharing a node differ
MASTER_PORT_SPAN = 10_000


def reply(
    settings: Settings,
    now: datetime,
    starts: list[TaskSpec] | None = None,
    stops: list[TaskStop] | None = None,
) -> HeartbeatReply:
    return HeartbeatReply(
        start=starts or [],
        stop=stops or [],
        heartbeat_interval_s=settings.heartbeat_interval_s,
        server_time=now,
    )


async def node_work(
    session: AsyncSession, *, node_id: int, settings: Settings
) -> tuple[list[TaskSpec], list[TaskStop]]:
    """Tasks the node must start (not yet acknowledged) and stop (asked, not yet ended)."""
    starts, stops, _ = await node_work_and_unreported(session, node_id=node_id, settings=settings)
    return starts, stops


async def node_work_and_unreported(
    session: AsyncSession, *, node_id: int, settings: Settings
) -> tuple[list[TaskSpec], list[TaskStop], list[tuple[Task, Job]]]:
    """`node_work`, plus the tasks asked to stop that the agent has never reported."""
    rows = (
        await session.execute(
            select(Task, Job)
            .join(Job, Job.id == Task.job_id)
            .where(
                Task.node_id == node_id,
                Task.state.in_(ACTIVE_STATES),
                or_(Task.stop_requested_at.is_not(None), Task.started_at.is_(None)),
            )
            .order_by(Task.id)
        )
    ).all()
    if not rows:
        return [], [], []
    stops = [
        TaskStop(
            task_id=t.id,
            reason=t.stop_reason or "",
            grace_s=t.stop_grace_s if t.stop_grace_s is not None else settings.preemption_grace_s,
        )
        for t, _ in rows
        if t.stop_requested_at is not None
    ]
    to_start = [(t, j) for t, j in rows if t.stop_requested_at is None]
    unreported = [
        (t, j) for t, j in rows if t.stop_requested_at is not None and t.started_at is None
    ]
    return await _task_specs(session, to_start), stops, unreported


async def _task_specs(session: AsyncSession, pairs: list[tuple[Task, Job]]) -> list[TaskSpec]:
    if not pairs:
        return []
    task_ids = [t.id for t, _ in pairs]
    gpus: dict[int, list[tuple[int, str]]] = {}
    for task_id, index, uuid in await session.execute(
        select(Allocation.task_id, Gpu.index, Gpu.uuid)
        .join(Gpu, Gpu.id == Allocation.gpu_id)
        .where(Allocation.task_id.in_(task_ids), Allocation.ended_at.is_(None))
    ):
        gpus.setdefault(task_id, []).append((index, uuid))
    gang_jobs = {j.id: j.requeue_count for _, j in pairs if j.num_nodes > 1}
    masters: dict[int, str] = {}
    if gang_jobs:
        for job_id, attempt, address in await session.execute(
            select(Task.job_id, Task.attempt, NodeRow.address)
            .join(NodeRow, NodeRow.id == Task.node_id)
            .where(Task.job_id.in_(list(gang_jobs)), Task.node_rank == 0)
        ):
            if gang_jobs.get(job_id) == attempt:
                masters[job_id] = address
    org_ids = {j.org_id for _, j in pairs}
    orgs = dict((await session.execute(select(Org.id, Org.name).where(Org.id.in_(org_ids)))).all())
    specs: list[TaskSpec] = []
    for task, job in pairs:
        held = sorted(gpus.get(task.id, []))
        gang = job.num_nodes > 1
        specs.append(
            TaskSpec(
                task_id=task.id,
                job_id=job.id,
                org=orgs.get(job.org_id, ""),
                org_id=job.org_id,
                node_rank=task.node_rank,
                num_nodes=job.num_nodes,
                gpus=[i for i, _ in held],
                gpu_uuids=[u for _, u in held],
                command=list(job.command),
                env=dict(job.env or {}),
                workdir=job.workdir,
                image=job.image,
                time_limit_s=float(job.time_limit_s),
                master_addr=masters.get(job.id) if gang else None,
                master_port=MASTER_PORT_BASE + job.id % MASTER_PORT_SPAN if gang else None,
                memory_bytes=job.memory_bytes,
                job_secret=job.job_secret,
            )
        )
    return specs


async def pending_reply(
    session: AsyncSession, *, node_id: int, settings: Settings
) -> HeartbeatReply | None:
    """For a held heartbeat: a reply when the node has work now, else None. Read only."""
    starts, stops = await node_work(session, node_id=node_id, settings=settings)
    if not starts and not stops:
        return None
    return reply(settings, utcnow(), starts, stops)
