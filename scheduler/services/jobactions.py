"""What is done to a job once it is queued: who may act on it, cancel, and a preemption's grace."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from protocol.signals import parse_signal
from protocol.states import JobState
from scheduler.core.types import PolicyConfig
from scheduler.db import Event, Job, Task
from scheduler.db.types import utcnow
from scheduler.services.errors import Conflict, Forbidden
from scheduler.services.jobstate import STOP_CANCEL, transition_job
from scheduler.services.rowlocks import lock_owner_row

DEFAULT_MAX_GRACE_S = PolicyConfig().max_preemption_grace_s


def check_may_act(job: Job, *, user_id: int, may_admin_org: bool) -> None:
    """Members act on their own jobs; org admins and platform admins on every job they see."""
    if not may_admin_org and job.user_id != user_id:
        raise Forbidden("only the job's owner or an org admin may change this job")


async def cancel_job(
    session: AsyncSession,
    job: Job,
    *,
    actor: str,
    reason: str | None,
    grace_s: float,
    now: datetime | None = None,
) -> list[int]:
    """Cancel at once when pending; otherwise ask each active task to stop (the job becomes
    CANCELLED when its agent reports the exit). Returns the node ids whose agents to wake.

    The job's row is locked and read again first: `job` was read before, and a scheduler
    cycle may have started it since. Cancelling it as still pending would overwrite STARTING
    with CANCELLED and leave its tasks to run on the GPUs they hold.
    """
    now = now or utcnow()
    await lock_owner_row(session, Job, job.id)
    await session.refresh(job)
    if job.state.is_terminal:
        raise Conflict(f"job {job.id} already ended ({job.state})", state=str(job.state))
    why = reason or "cancelled"
    if job.state is JobState.PENDING:
        transition_job(session, job, JobState.CANCELLED, actor=actor, reason=why, at=now)
        await session.flush()
        return []
    tasks = (
        await session.scalars(
            select(Task).where(
                Task.job_id == job.id,
                Task.state.in_([JobState.STARTING, JobState.RUNNING]),
            )
        )
    ).all()
    nodes: list[int] = []
    for task in tasks:
        if task.stop_requested_at is None:
            task.stop_requested_at = now
            task.stop_reason = STOP_CANCEL
            task.stop_grace_s = grace_s
        if task.node_id is not None:
            nodes.append(task.node_id)
    session.add(
        Event(
            at=now,
            kind="job.cancel",
            job_id=job.id,
            org_id=job.org_id,
            actor=actor,
            reason=why[:1024],
            details={"tasks": [t.id for t in tasks]},
        )
    )
    await session.flush()
    return sorted(set(nodes))


def preemption_grace_of(job_signal: str | None, grace_s: float, max_grace_s: float) -> float:
    """A preempted job's grace: the configured one, or its `--signal` lead time when longer
    (up to `max_grace_s`)."""
    if job_signal is None:
        return grace_s
    return max(grace_s, min(float(parse_signal(job_signal).lead_s), max_grace_s))
