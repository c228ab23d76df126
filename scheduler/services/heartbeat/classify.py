"""Whether a heartbeat is quiet (answered from one read, no transaction) or needs the full path.

A heartbeat usually reports the same running tasks and healthy GPUs as the one before and has
nothing to receive. The node's stored state and its active tasks (read.py) prove that; such a
heartbeat is QUIET: its liveness and samples go to the buffer (buffer.py), flushed in batches.
Anything else (the node is down, a task report that changes something, a task to start or stop,
a GPU whose health or uuid differs from what this process knows, log chunks, an isolation mode
to store) is FULL: the transactional path (full.py). Pure: no I/O, no state.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence

from protocol.agent import Heartbeat
from protocol.states import TERMINAL_TASK_STATES, JobState
from scheduler.services.heartbeat.read import NodeTaskRow
from scheduler.states import NodeState


class Verdict(enum.Enum):
    QUIET = "quiet"  # nothing changes and nothing is due: buffer it and answer
    FULL = "full"  # the full transactional path
    UNKNOWN_NODE = "unknown-node"  # the node is no longer registered


def body_may_be_quiet(body: Heartbeat, *, gpus_as_known: bool) -> bool:
    """What the body alone says: no logs, no task ended, no isolation mode or capabilities to
    store, and (`gpus_as_known`, the buffer's knowledge) its GPUs as this process knows them."""
    if body.logs or body.isolation is not None or body.capabilities is not None:
        return False
    if body.samples and not gpus_as_known:
        return False
    return not any(r.state in TERMINAL_TASK_STATES for r in body.tasks)


def classify(body: Heartbeat, node: Sequence[NodeTaskRow], *, gpus_as_known: bool) -> Verdict:
    """QUIET when the node's stored state (`node`: its rows, one per active task) needs
    nothing of this heartbeat and the heartbeat changes nothing."""
    if not node:
        return Verdict.UNKNOWN_NODE
    if not body_may_be_quiet(body, gpus_as_known=gpus_as_known):
        return Verdict.FULL
    if NodeState(node[0].node_state) is NodeState.DOWN:
        return Verdict.FULL
    active: dict[int, JobState] = {}
    for row in node:
        if row.task_id is None or row.task_state is None:
            continue  # the node has no active task
        if not row.started or row.stopping:
            return Verdict.FULL  # a task to start or to stop: the reply carries it
        active[row.task_id] = JobState(row.task_state)
    for report in body.tasks:
        state = active.get(report.task_id)
        if state is None:
            return Verdict.FULL  # unknown or ended here: a stale stop
        if report.state == "running" and state is not JobState.RUNNING:
            return Verdict.FULL  # STARTING → RUNNING
    return Verdict.QUIET
