"""Node use cases for operators: list with GPUs and health, drain and resume.

Draining stops new work from landing on a node; running tasks finish. A node with nothing
running is `drained` at once; otherwise the scheduling service moves it from `draining` to
`drained` when its last task ends.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Allocation, Event, Gpu, Job, Node, Site, Task
from scheduler.db.types import utcnow
from scheduler.services.errors import Conflict, NotFound
from scheduler.services.heartbeat.events import node_state_event
from scheduler.states import NodeState


@dataclass(frozen=True, slots=True)
class NodeView:
    node: Node
    site: str
    gpus: list[Gpu]
    allocated: dict[int, int]  # gpu id -> job id
    allocated_orgs: dict[int, int]  # gpu id -> org id of that job


async def list_nodes(
    session: AsyncSession,
    node_id: int | None = None,
    *,
    name: str | None = None,
    after_name: str | None = None,
    limit: int | None = None,
) -> list[NodeView]:
    """Nodes by name (one by `node_id` or `name`), after `after_name`, at most `limit` (None:
    all; ask for one more to learn whether a next page exists)."""
    stmt = select(Node, Site.name).join(Site, Site.id == Node.site_id).order_by(Node.name)
    if node_id is not None:
        stmt = stmt.where(Node.id == node_id)
    if name is not None:
        stmt = stmt.where(Node.name == name)
    if after_name is not None:
        stmt = stmt.where(Node.name > after_name)
    if limit is not None:
        stmt = stmt.limit(limit)
    rows = (await session.execute(stmt)).all()
    ids = [n.id for n, _ in rows]
    gpus: dict[int, list[Gpu]] = {}
    allocated: dict[int, int] = {}
    allocated_orgs: dict[int, int] = {}
    if ids:
        gpu_stmt = select(Gpu).where(Gpu.node_id.in_(ids)).order_by(Gpu.node_id, Gpu.index)
        for g in (await session.scalars(gpu_stmt)).all():
            gpus.setdefault(g.node_id, []).append(g)
        alloc_stmt = (
            select(Allocation.gpu_id, Allocation.job_id, Job.org_id)
            .join(Gpu, Gpu.id == Allocation.gpu_id)
            .join(Job, Job.id == Allocation.job_id)
            .where(Allocation.ended_at.is_(None), Gpu.node_id.in_(ids))
        )
        for row in (await session.execute(alloc_stmt)).all():
            allocated[row.gpu_id] = row.job_id
            allocated_orgs[row.gpu_id] = row.org_id
    return [NodeView(n, site, gpus.get(n.id, []), allocated, allocated_orgs) for n, site in rows]


async def get_node(session: AsyncSession, node_id: int) -> Node:
    node = await session.get(Node, node_id) if 0 < node_id < 2**31 else None
    if node is None:
        raise NotFound(f"node {node_id} not found")
    return node


def _event(node: Node, to: NodeState, actor: str, reason: str | None, at: datetime) -> Event:
    return node_state_event(node.id, node.state, to, actor=actor, reason=reason, at=at)


async def drain_node(
    session: AsyncSession, node: Node, *, reason: str, actor: str, now: datetime | None = None
) -> Node:
    now = now or utcnow()
    if node.state in (NodeState.DRAINING, NodeState.DRAINED):
        return node
    busy = await session.scalar(
        select(Task.id)
        .where(Task.node_id == node.id, Task.state.in_([JobState.STARTING, JobState.RUNNING]))
        .limit(1)
    )
    to = NodeState.DRAINING if busy is not None else NodeState.DRAINED
    session.add(_event(node, to, actor, reason, now))
    node.state = to
    node.state_reason = reason
    await session.flush()
    return node


async def resume_node(
    session: AsyncSession, node: Node, *, actor: str, now: datetime | None = None
) -> Node:
    """Back to `ready` from draining or drained. A down or unhealthy node recovers by itself
    when its agent reports in healthy; resuming it by hand is refused."""
    if node.state is NodeState.READY:
        return node
    if node.state not in (NodeState.DRAINING, NodeState.DRAINED):
        raise Conflict(
            f"node {node.name} is {node.state}; only draining or drained nodes can be resumed",
            state=str(node.state),
        )
    session.add(_event(node, NodeState.READY, actor, "resumed", now or utcnow()))
    node.state = NodeState.READY
    node.state_reason = None
    await session.flush()
    return node
