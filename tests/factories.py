"""Small builders for database rows, so tests read as the scenario they set up."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime

from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Allocation, Gpu, Job, Node, Org, Quota, Site, Task, User
from scheduler.states import Role

_seq = itertools.count(1)


async def org(session: AsyncSession, name: str | None = None, **kw: object) -> Org:
    row = Org(name=name or f"org{next(_seq)}", **kw)
    session.add(row)
    await session.flush()
    return row


async def user(session: AsyncSession, org_row: Org, role: Role = Role.MEMBER) -> User:
    row = User(name=f"user{next(_seq)}", org_id=org_row.id, role=role)
    session.add(row)
    await session.flush()
    return row


async def node(
    session: AsyncSession, gpus: int = 8, model: str = "H100", site: str = "dc1"
) -> tuple[Node, list[Gpu]]:
    site_row = Site(name=f"{site}-{next(_seq)}")
    session.add(site_row)
    await session.flush()
    node_row = Node(name=f"node{next(_seq)}", site_id=site_row.id)
    session.add(node_row)
    await session.flush()
    gpu_rows = [
        Gpu(node_id=node_row.id, index=i, uuid=f"GPU-{node_row.id}-{i}", model=model)
        for i in range(gpus)
    ]
    session.add_all(gpu_rows)
    await session.flush()
    return node_row, gpu_rows


async def job(session: AsyncSession, org_row: Org, user_row: User, **kw: object) -> Job:
    fields: dict[str, object] = {
        "name": "train",
        "command": ["python", "train.py"],
        "gpus_per_node": 1,
        "time_limit_s": 3600,
    }
    fields.update(kw)
    row = Job(org_id=org_row.id, user_id=user_row.id, **fields)
    session.add(row)
    await session.flush()
    return row


async def running_task(
    session: AsyncSession, job_row: Job, node_row: Node, gpu_rows: list[Gpu]
) -> Task:
    """A RUNNING task of `job_row` holding `gpu_rows` through open allocations."""
    task_row = Task(job_id=job_row.id, node_rank=0, node_id=node_row.id, state=JobState.RUNNING)
    session.add(task_row)
    await session.flush()
    now = datetime.now(UTC)
    session.add_all(
        Allocation(
            task_id=task_row.id,
            job_id=job_row.id,
            org_id=job_row.org_id,
            user_id=job_row.user_id,
            gpu_id=g.id,
            gpu_type=g.model,
            started_at=now,
        )
        for g in gpu_rows
    )
    await session.flush()
    return task_row


async def quota(
    session: AsyncSession,
    org_row: Org,
    gpu_type: str = "H100",
    guaranteed: int = 0,
    limit: int | None = None,
) -> Quota:
    row = Quota(org_id=org_row.id, gpu_type=gpu_type, guaranteed=guaranteed, limit=limit)
    session.add(row)
    await session.flush()
    return row


async def attempt(
    session: AsyncSession,
    job_row: Job,
    node_row: Node,
    gpu_rows: list[Gpu],
    *,
    start: datetime,
    end: datetime | None,
    number: int = 0,
    borrowed: bool = False,
    state: JobState = JobState.COMPLETED,
) -> Task:
    """A past run of `job_row` on one node: a task that held `gpu_rows` from `start` to `end`.

    `end=None` leaves the task RUNNING with its allocations open.
    """
    task_row = Task(
        job_id=job_row.id,
        attempt=number,
        node_rank=0,
        node_id=node_row.id,
        state=JobState.RUNNING if end is None else state,
        created_at=start,
        started_at=start,
        ended_at=end,
    )
    session.add(task_row)
    await session.flush()
    session.add_all(
        Allocation(
            task_id=task_row.id,
            job_id=job_row.id,
            org_id=job_row.org_id,
            user_id=job_row.user_id,
            gpu_id=g.id,
            gpu_type=g.model,
            borrowed=borrowed,
            started_at=start,
            ended_at=end,
        )
        for g in gpu_rows
    )
    await session.flush()
    return task_row
