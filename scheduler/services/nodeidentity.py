"""Who may speak for a node: approve a takeover, revoke its credential, delete it.

A node's identity is its credential (docs/OPERATIONS.md, "Node identity"). A join token only
creates new nodes; an operator approves the one re-registration of an existing name that has
lost its credential. Revoking ends the credential at once and handles the node as lost.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from scheduler.db import Allocation, ApiToken, Event, Gpu, Node, Task
from scheduler.services.errors import Conflict
from scheduler.services.scheduling.lifecycle import lose_node
from scheduler.services.scheduling.tasks import ACTIVE_STATES, EndEffects
from scheduler.settings import Settings
from scheduler.states import NodeState, TokenKind


async def approve_takeover(
    session: AsyncSession, node: Node, *, actor: str, now: datetime, settings: Settings
) -> datetime:
    """The next join-token registration of this name (within a join token's lifetime) takes
    the node over. Returns until when."""
    until = now + timedelta(seconds=settings.join_token_ttl_s)
    node.takeover_approved_until = until
    session.add(
        Event(
            at=now,
            kind="node.approve",
            node_id=node.id,
            actor=actor,
            reason=f"one join-token registration may take the node over until {until.isoformat()}",
        )
    )
    await session.flush()
    return until


async def revoke_node(
    session: AsyncSession, node: Node, *, actor: str, now: datetime, settings: Settings
) -> EndEffects:
    """Every credential of the node stops working; the node is down and its tasks end as on a
    node loss (NODE_FAIL, requeued when preemptible). It comes back only by an approved
    re-registration."""
    await session.execute(
        update(ApiToken)
        .where(
            ApiToken.node_id == node.id,
            ApiToken.kind == TokenKind.AGENT,
            ApiToken.revoked_at.is_(None),
        )
        .values(revoked_at=now)
        .execution_options(synchronize_session=False)
    )
    node.takeover_approved_until = None
    effects = EndEffects()
    reason = f"credential revoked by {actor}"
    await lose_node(session, node, reason, actor=actor, now=now, settings=settings, effects=effects)
    await session.flush()
    return effects


async def delete_node(session: AsyncSession, node: Node) -> None:
    """Remove a node with no running task, with its GPUs and credentials. History stays: its
    tasks, events and closed allocations keep their rows with the node (or GPU) reference
    cleared; reasons and `gpu_type` still say what they were."""
    busy = await session.scalar(
        select(Task.id).where(Task.node_id == node.id, Task.state.in_(ACTIVE_STATES)).limit(1)
    )
    if busy is not None:
        raise Conflict(
            f"node {node.name} still runs tasks; drain it (or revoke it) and delete it once "
            "they have ended",
            node=node.name,
        )
    if node.state not in (NodeState.DRAINED, NodeState.DOWN):
        raise Conflict(
            f"node {node.name} is {node.state}; drain it (or revoke it) before deleting it",
            state=str(node.state),
        )
    gpu_ids = select(Gpu.id).where(Gpu.node_id == node.id).scalar_subquery()
    for statement in (
        update(Allocation).where(Allocation.gpu_id.in_(gpu_ids)).values(gpu_id=None),
        update(Task).where(Task.node_id == node.id).values(node_id=None),
        update(Event).where(Event.node_id == node.id).values(node_id=None),
        delete(ApiToken).where(ApiToken.node_id == node.id),
        delete(Gpu).where(Gpu.node_id == node.id),
        delete(Node).where(Node.id == node.id),
    ):
        await session.execute(statement.execution_options(synchronize_session=False))
