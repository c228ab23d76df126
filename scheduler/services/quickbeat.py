"""The common heartbeat, "nothing changed", answered with one indexed read and no write.

A heartbeat usually reports the same running tasks and healthy GPUs as the one before and has
nothing to receive. One read of the node's state and active tasks proves that; liveness and
samples then go to the process's `LiveBuffer`, flushed in batches. Anything else (the node is
down, a task report that changes something, a task to start or stop, a GPU whose health or uuid
differs from what this process knows, log chunks, an isolation mode to store) takes the full
transactional path in scheduler/services/agents.py, which this never replaces, only skips.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, and_, bindparam, or_, select
from sqlalchemy.ext.asyncio import AsyncConnection

from protocol.agent import Heartbeat
from protocol.states import TERMINAL_TASK_STATES, JobState
from scheduler.db import Node, Task
from scheduler.services.livebuffer import LiveBuffer
from scheduler.services.scheduling.tasks import ACTIVE_STATES
from scheduler.states import NodeState

_NODES: Table = Node.__table__  # type: ignore[assignment]
_TASKS: Table = Task.__table__  # type: ignore[assignment]

# A task of the node that holds GPUs on it (or is about to).
ACTIVE_TASK_OF_NODE = and_(
    _TASKS.c.node_id == _NODES.c.id,
    # Not IN (...): an expanding parameter is re-rendered on every execution.
    or_(*(_TASKS.c.state == state for state in ACTIVE_STATES)),
)
# What `decide` reads: the node's state and its active tasks, one row per task (one row with
# NULLs when it has none).
NODE_AND_TASK_COLUMNS = (
    _NODES.c.state,
    _TASKS.c.id,
    _TASKS.c.state,
    _TASKS.c.started_at.is_not(None),
    _TASKS.c.stop_requested_at.is_not(None),
)
_NODE_AND_TASKS = (
    select(*NODE_AND_TASK_COLUMNS)
    .select_from(_NODES.outerjoin(_TASKS, ACTIVE_TASK_OF_NODE))
    .where(_NODES.c.id == bindparam("node_id"))
)


class Quick(enum.Enum):
    DONE = "done"  # answered: nothing to do, liveness and samples buffered
    FULL = "full"  # needs the full path
    UNKNOWN_NODE = "unknown-node"


async def quick_heartbeat(
    conn: AsyncConnection, *, node_id: int, body: Heartbeat, buffer: LiveBuffer, now: datetime
) -> Quick:
    """Answer the heartbeat here when nothing changes and nothing is due; else say FULL."""
    if not may_be_quick(body, buffer, node_id):
        return Quick.FULL
    rows = (await conn.execute(_NODE_AND_TASKS, {"node_id": node_id})).all()
    return decide(rows, body=body, buffer=buffer, node_id=node_id, now=now)


def may_be_quick(body: Heartbeat, buffer: LiveBuffer, node_id: int) -> bool:
    """What the body alone says: no logs, no task ended, no isolation mode to store, GPUs as
    this process knows them."""
    if (
        body.logs
        or body.isolation is not None
        or (body.samples and not buffer.matches(node_id, body.samples))
    ):
        return False
    return not any(r.state in TERMINAL_TASK_STATES for r in body.tasks)


# (node state, task id, task state, start acknowledged, stop requested, ...): a read's row.
NodeTaskRow = Sequence[Any]


def decide(
    rows: Sequence[NodeTaskRow],
    *,
    body: Heartbeat,
    buffer: LiveBuffer,
    node_id: int,
    now: datetime,
) -> Quick:
    """DONE (and the heartbeat buffered) when the node's stored state needs nothing of it."""
    if not rows:
        return Quick.UNKNOWN_NODE
    if NodeState(rows[0][0]) is NodeState.DOWN:
        return Quick.FULL
    active: dict[int, JobState] = {}
    for row in rows:
        task_id, state, acknowledged, stopping = row[1], row[2], row[3], row[4]
        if task_id is None:
            continue
        if not acknowledged or stopping:
            return Quick.FULL  # a task to start or to stop: the reply carries it
        active[task_id] = JobState(state)
    for report in body.tasks:
        state = active.get(report.task_id)
        if state is None:
            return Quick.FULL  # unknown or ended here: a stale stop
        if report.state == "running" and state is not JobState.RUNNING:
            return Quick.FULL  # STARTING → RUNNING
    buffer.note(node_id, now, body.samples)
    return Quick.DONE
