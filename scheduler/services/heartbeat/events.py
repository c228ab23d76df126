"""The one writer of node-state and GPU-health events.

Whoever changes a node's state (the heartbeat bringing a node back, the lifecycle marking it
down or drained, an admin draining or resuming it) or a GPU's health (a full heartbeat, the
flush of buffered samples) records it with these, so the events read the same whoever wrote
them.
"""

from __future__ import annotations

from datetime import datetime

from protocol.states import GpuHealth
from scheduler.db import Event
from scheduler.states import NodeState

NODE_STATE = "node.state"
GPU_HEALTH = "gpu.health"


def node_state_event(
    node_id: int,
    was: NodeState | str,
    to: NodeState,
    *,
    actor: str,
    reason: str | None,
    at: datetime,
) -> Event:
    return Event(
        at=at,
        kind=NODE_STATE,
        node_id=node_id,
        from_state=str(was),
        to_state=str(to),
        actor=actor,
        reason=reason,
    )


def gpu_health_event(
    node_id: int,
    *,
    gpu_index: int,
    uuid: str | None,
    was: GpuHealth,
    to: GpuHealth,
    reason: str | None,
    xids: list[int],
    actor: str,
    at: datetime,
) -> Event:
    return Event(
        at=at,
        kind=GPU_HEALTH,
        node_id=node_id,
        from_state=str(was),
        to_state=str(to),
        actor=actor,
        reason=reason or None,
        details={"gpu_index": gpu_index, "uuid": uuid, "xids": xids},
    )
