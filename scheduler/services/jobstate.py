"""The one place a job or task changes state, so that every transition leaves an event row."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from protocol.states import JobState
from scheduler.db import Event, Job, Task
from scheduler.db.types import utcnow

# Why a task is asked to stop; the agent's exit report turns it into the job's end state.
STOP_CANCEL = "cancel"
STOP_PREEMPT = "preempt"
STOP_TIMEOUT = "timeout"
STOP_NODE_LOST = "node-lost"
STOP_STALE = "stale"  # the server no longer knows the task (e.g. after a node came back)


REASON_MAX_CHARS = 1024


def _clip(reason: str | None) -> str | None:
    return reason[:REASON_MAX_CHARS] if reason else None


def _stamp(row: Job | Task, to_state: JobState, at: datetime) -> None:
    """The start and end times a state implies, shared by jobs and tasks."""
    if to_state is JobState.RUNNING and row.started_at is None:
        row.started_at = at
    if to_state.is_terminal:
        row.ended_at = at


def transition_job(
    session: AsyncSession,
    job: Job,
    to_state: JobState,
    *,
    actor: str,
    reason: str | None = None,
    at: datetime | None = None,
    details: dict[str, Any] | None = None,
) -> Event:
    """Move `job` to `to_state` and record who did it and why. The caller commits."""
    at = at or utcnow()
    event = Event(
        at=at,
        kind="job.state",
        job_id=job.id,
        org_id=job.org_id,
        from_state=str(job.state) if job.state is not None else None,
        to_state=str(to_state),
        actor=actor,
        reason=_clip(reason),
        details=details,
    )
    job.state = to_state
    job.state_reason = _clip(reason)
    _stamp(job, to_state, at)
    session.add(event)
    return event


def transition_task(
    session: AsyncSession,
    task: Task,
    to_state: JobState,
    *,
    actor: str,
    reason: str | None = None,
    at: datetime | None = None,
) -> Event:
    at = at or utcnow()
    event = Event(
        at=at,
        kind="task.state",
        job_id=task.job_id,
        node_id=task.node_id,
        from_state=str(task.state) if task.state is not None else None,
        to_state=str(to_state),
        actor=actor,
        reason=_clip(reason),
        details={"task_id": task.id, "node_rank": task.node_rank, "attempt": task.attempt},
    )
    task.state = to_state
    task.reason = _clip(reason)
    _stamp(task, to_state, at)
    session.add(event)
    return event
