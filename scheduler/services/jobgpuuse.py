"""How busy a job's GPUs on its other nodes have been, for the idle timeout of a multi-node
interactive session (agents/idle.py): its terminal is on rank 0, but the work the person started
from it may run on the other ranks only.

Services take a session and never commit (the caller owns the transaction).
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Allocation, Task, UsageRecord
from scheduler.services.errors import NotFound


async def other_ranks_busy_s(session: AsyncSession, *, node_id: int, task_id: int) -> float:
    """The busy GPU-seconds in the usage ledger of the GPUs the task's job holds (or held) on
    other tasks than this one. Only the node running the task may ask: for any other node's
    task the answer is 404, as if it did not exist (an agent learns nothing of other nodes)."""
    task = await session.get(Task, task_id)
    if task is None or task.node_id != node_id:
        raise NotFound(f"no task {task_id} on this node")
    others = select(Allocation.id).where(
        Allocation.job_id == task.job_id, Allocation.task_id != task.id
    )
    busy = await session.scalar(
        select(func.coalesce(func.sum(UsageRecord.gpu_seconds_busy), 0.0)).where(
            UsageRecord.allocation_id.in_(others)
        )
    )
    return float(busy or 0.0)
