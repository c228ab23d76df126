"""Node lifecycle and the server's own time-limit check, run by the leader before each cycle.

A node that has not reported for `node_timeout_s` is `down`: its active tasks end NODE_FAIL,
their GPUs are released, and their jobs requeue when preemptible (else end NODE_FAIL; see
scheduling/tasks.py). When the node reports again it becomes `ready`, and any task it still
runs that the server has ended is stopped as stale by the heartbeat. A `draining` node with no
active task left is `drained`. A RUNNING task past its time limit plus the grace period gets a
stop with STOP_TIMEOUT (the agent enforces the limit itself; this covers an agent that does not).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import BigInteger, cast, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Event, Job, Task
from scheduler.db import Node as NodeRow
from scheduler.services.heartbeat.events import node_state_event
from scheduler.services.jobstate import STOP_NODE_LOST, STOP_TIMEOUT
from scheduler.services.scheduling.sqltime import epoch_us
from scheduler.services.scheduling.tasks import (
    ACTIVE_STATES,
    EndEffects,
    RequeuePolicy,
    end_task,
    request_stop,
)
from scheduler.settings import Settings
from scheduler.states import NodeState

ACTOR = "scheduler"
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)
_LIVE_NODE_STATES = (NodeState.READY, NodeState.DRAINING, NodeState.DRAINED, NodeState.UNHEALTHY)


@dataclass
class LifecycleWork:
    """Rows the leader has to change; found by a cheap read before any write is opened."""

    stale_nodes: list[int] = field(default_factory=list)
    drained_nodes: list[int] = field(default_factory=list)
    overdue_tasks: list[int] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.stale_nodes or self.drained_nodes or self.overdue_tasks)


async def find_work(session: AsyncSession, *, now: datetime, settings: Settings) -> LifecycleWork:
    cutoff = now - timedelta(seconds=settings.node_timeout_s)
    stale = await session.scalars(
        select(NodeRow.id).where(
            NodeRow.state.in_(_LIVE_NODE_STATES),
            func.coalesce(NodeRow.last_heartbeat_at, NodeRow.registered_at) < cutoff,
        )
    )
    busy_nodes = select(Task.node_id).where(
        Task.state.in_(ACTIVE_STATES), Task.node_id.is_not(None)
    )
    drained = await session.scalars(
        select(NodeRow.id).where(NodeRow.state == NodeState.DRAINING, NodeRow.id.not_in(busy_nodes))
    )
    # Past started_at + time limit + grace, in whole microseconds as datetimes add up: computed
    # by the database, so that thousands of running tasks are not read back every cycle.
    grace_us = timedelta(seconds=settings.policy.preemption_grace_s) // _US
    overdue = await session.scalars(
        select(Task.id)
        .join(Job, Job.id == Task.job_id)
        .where(
            Task.state == JobState.RUNNING,
            Task.stop_requested_at.is_(None),
            Task.started_at.is_not(None),
            epoch_us(Task.started_at) + cast(Job.time_limit_s, BigInteger) * 1_000_000
            < (now - _EPOCH) // _US - grace_us,
        )
    )
    return LifecycleWork(list(stale), list(drained), list(overdue))


def _node_event(node: NodeRow, to_state: NodeState, reason: str, now: datetime) -> Event:
    event = node_state_event(node.id, node.state, to_state, actor=ACTOR, reason=reason, at=now)
    node.state = to_state
    node.state_reason = reason
    return event


async def lose_node(
    session: AsyncSession,
    node: NodeRow,
    reason: str,
    *,
    actor: str,
    now: datetime,
    settings: Settings,
    effects: EndEffects,
) -> None:
    """The node is `down`; its active tasks end NODE_FAIL (their jobs requeue or end)."""
    event = _node_event(node, NodeState.DOWN, reason, now)
    event.actor = actor
    session.add(event)
    rows = await session.execute(
        select(Task, Job)
        .join(Job, Job.id == Task.job_id)
        .where(Task.node_id == node.id, Task.state.in_(ACTIVE_STATES))
        .order_by(Job.id)  # end_task locks jobs: in id order, as heartbeats do
    )
    for task, job in rows.all():
        await end_task(
            session,
            task,
            job,
            JobState.NODE_FAIL,
            actor=actor,
            at=now,
            grace_s=settings.policy.preemption_grace_s,
            gpu_weights=dict(settings.policy.gpu_weights),
            requeue=RequeuePolicy.of(settings),
            reason=f"node {node.name} lost: {reason}",
            effects=effects,
        )
        task.stop_reason = task.stop_reason or STOP_NODE_LOST


async def apply_work(
    session: AsyncSession, work: LifecycleWork, *, now: datetime, settings: Settings
) -> EndEffects:
    """Apply `work` in the caller's (fenced) transaction, re-checking each row as it is now."""
    effects = EndEffects()
    cutoff = now - timedelta(seconds=settings.node_timeout_s)
    if work.stale_nodes:
        nodes = await session.scalars(
            select(NodeRow).where(
                NodeRow.id.in_(work.stale_nodes),
                NodeRow.state.in_(_LIVE_NODE_STATES),
                or_(
                    NodeRow.last_heartbeat_at < cutoff,
                    NodeRow.last_heartbeat_at.is_(None) & (NodeRow.registered_at < cutoff),
                ),
            )
        )
        for node in nodes:
            await lose_node(
                session,
                node,
                f"no heartbeat for {settings.node_timeout_s:g} s",
                actor=ACTOR,
                now=now,
                settings=settings,
                effects=effects,
            )
    if work.drained_nodes:
        busy = select(Task.node_id).where(Task.state.in_(ACTIVE_STATES), Task.node_id.is_not(None))
        for node in await session.scalars(
            select(NodeRow).where(
                NodeRow.id.in_(work.drained_nodes),
                NodeRow.state == NodeState.DRAINING,
                NodeRow.id.not_in(busy),
            )
        ):
            session.add(_node_event(node, NodeState.DRAINED, "drained: no task left", now))
    if work.overdue_tasks:
        for task in await session.scalars(
            select(Task).where(Task.id.in_(work.overdue_tasks), Task.state == JobState.RUNNING)
        ):
            stopped = request_stop(
                task, STOP_TIMEOUT, at=now, grace_s=settings.policy.preemption_grace_s
            )
            if stopped and task.node_id is not None:
                effects.wake_nodes.add(task.node_id)
    await session.flush()
    return effects
